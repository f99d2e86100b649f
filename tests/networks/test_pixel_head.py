"""PixelMLPHead / PixelHeadEnsemble: shapes, init, hidden-width rule, majority vote and entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from monai_mdm.networks import PixelHeadEnsemble, PixelMLPHead


def test_head_shapes_and_layer_order():
    head = PixelMLPHead(40, 3)
    assert head.hidden_channels == (128, 32)
    assert head(torch.randn(2, 40, 8, 12)).shape == (2, 3, 8, 12)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d]
    head3 = PixelMLPHead(10, 2, spatial_dims=3)
    assert head3(torch.randn(1, 10, 4, 4, 4)).shape == (1, 2, 4, 4, 4)


def test_hidden_rule_for_many_classes():
    assert PixelMLPHead(16, 29).hidden_channels == (128, 32)
    assert PixelMLPHead(16, 34).hidden_channels == (256, 128)
    assert PixelMLPHead(16, 5, hidden_channels=(8,)).hidden_channels == (8,)


def test_init_std():
    torch.manual_seed(0)
    head = PixelMLPHead(1728, 2)
    first = head.layers[0]
    assert abs(first.weight.std().item() - 0.02) < 0.002
    assert abs(first.weight.mean().item()) < 0.002
    assert all(float(m.bias.abs().max()) == 0 for m in head.layers if isinstance(m, nn.Conv2d))


class _Fixed(PixelMLPHead):
    """A head that returns fixed logits (for hand-made voting cases)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__(1, logits.shape[1], hidden_channels=())
        self.register_buffer("fixed", logits)

    def forward(self, x):
        return self.fixed


def _ensemble(*logits):
    heads = [_Fixed(torch.tensor(lg, dtype=torch.float32).view(1, -1, 1, 2)) for lg in logits]
    return PixelHeadEnsemble.from_heads(heads)


def test_majority_vote_and_tie_break():
    x = torch.zeros(1, 1, 1, 2)
    # 3 classes, 2 pixels. Pixel 0: votes 2 x class 0, 1 x class 2 (with very high prob) -> class 0 wins.
    # Pixel 1: votes class 1, class 2, and class 0: a 3-way tie broken by mean probability (class 2).
    ens = _ensemble(
        [[5.0, 0.0], [0.0, 3.0], [0.0, 0.0]],
        [[5.0, 0.0], [0.0, 0.0], [0.0, 9.0]],
        [[0.0, 1.0], [0.0, 0.0], [20.0, 0.0]],
    )
    scores = ens(x)
    assert scores.shape == (1, 3, 1, 2)
    assert torch.allclose(scores.sum(dim=1), torch.ones(1, 1, 2))
    assert torch.allclose(scores[0, :, 0, 0], torch.tensor([2 / 3, 0, 1 / 3]), atol=1e-3)
    assert scores.argmax(dim=1).tolist() == [[[0, 2]]]
    ent = ens.uncertainty(x)
    assert ent.shape == (1, 1, 1, 2)
    assert math.isclose(ent[0, 0, 0, 1].item(), math.log(3), rel_tol=1e-6)


def test_entropy_unanimous_and_split():
    x = torch.zeros(1, 1, 1, 2)
    unanimous = _ensemble(*[[[3.0, 0.0], [0.0, 2.0]]] * 4)
    scores, ent = unanimous.predict_with_uncertainty(x)
    assert torch.equal(ent, torch.zeros(1, 1, 1, 2))
    assert scores.argmax(dim=1).tolist() == [[[0, 1]]]
    split = _ensemble([[3.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [3.0, 3.0]])
    assert torch.allclose(split.uncertainty(x), torch.full((1, 1, 1, 2), math.log(2)))
    single = PixelHeadEnsemble(4, 2).eval()
    p = single(torch.randn(2, 4, 3, 3))
    assert torch.allclose(p.sum(dim=1), torch.ones(2, 3, 3))
    assert torch.allclose(single.uncertainty(torch.zeros(1, 4, 1, 1)), torch.tensor(math.log(2)), atol=1e-2)


def test_ensemble_heads_trainable_separately():
    ens = PixelHeadEnsemble(8, 3, num_heads=3)
    assert isinstance(ens.heads, nn.ModuleList) and ens.num_heads == 3
    assert ens.config() == dict(in_channels=8, num_classes=3, hidden_channels=[128, 32], spatial_dims=2, num_heads=3)
    opt = torch.optim.Adam(ens.heads[1].parameters(), lr=1e-2)
    before = [p.clone() for p in ens.heads[0].parameters()]
    loss = nn.functional.cross_entropy(ens.heads[1](torch.randn(2, 8, 4, 4)), torch.randint(0, 3, (2, 4, 4)))
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ens.heads[0].parameters()))
    with pytest.raises(ValueError):
        PixelHeadEnsemble(8, 3, num_heads=0)


# ----------------------------------------------------------------------------- forward_blocks (factorised layer 1)


def _extractor(spatial_dims: int, normalize: bool = True):
    from monai_mdm.networks import MDMFeatureExtractor, MDMUNet

    torch.manual_seed(0)
    if spatial_dims == 2:
        # interleaved resolutions (32x48, 16x24, 32x48, 16x24): the weight columns of a resolution group are not
        # contiguous, and two blocks need no upsampling at all
        return MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(5, 2, 8, 3), normalize=normalize), (32, 48)
    return MDMFeatureExtractor(MDMUNet.from_preset("tiny3d"), blocks=(3, 2, 4), normalize=normalize), (16, 16, 16)


def _head_with_bias(in_channels: int, spatial_dims: int, seed: int = 1) -> PixelMLPHead:
    torch.manual_seed(seed)
    head = PixelMLPHead(in_channels, 3, spatial_dims=spatial_dims)
    for m in head.modules():  # trained heads have biases; the init has none
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.bias, 0.0, 0.05)
    return head


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_forward_blocks_equals_forward_on_assembled(spatial_dims, normalize, training):
    ex, size = _extractor(spatial_dims, normalize)
    x = torch.rand(2, ex.network.in_channels, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    blocks = ex.extract_blocks(x)
    assert len({tuple(b.shape[2:]) for b in blocks}) == 2 and any(tuple(b.shape[2:]) == size for b in blocks)
    norms = ex.assemble_norms(blocks, size) if normalize else None
    head = _head_with_bias(ex.out_channels, spatial_dims).train(training)
    if not training:  # non-trivial running statistics
        for m in head.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)

    # exact in float64: the factorisation is an identity, not an approximation
    h64 = copy.deepcopy(head).double()
    b64 = [b.double() for b in blocks]
    n64 = None if norms is None else norms.double()
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    ups = [
        b if tuple(b.shape[2:]) == size else nn.functional.interpolate(b, size, mode=mode, align_corners=False)
        for b in b64
    ]
    feats64 = torch.cat(ups, dim=1)  # the assembled map, as MDMFeatureExtractor.assemble builds it
    if n64 is not None:
        feats64 = feats64 / n64.view(-1, *([1] * (spatial_dims + 1)))
    ref = h64(feats64)
    got64 = h64.forward_blocks(b64, size, n64)
    assert got64.shape == (2, 3, *size)
    assert torch.allclose(got64, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))

    # float32: rounding only. In training mode BatchNorm subtracts the batch mean of ``W f + b``, where the
    # normalised signal ``W f`` is tiny next to the bias; the assembled path rounds ``W f + b`` over all channels
    # at once and loses more of the signal (~1e-4 of the output scale) than forward_blocks, which adds the bias
    # to the summed signal last (~1e-5): compare both with the float64 result.
    scale = float(ref.abs().max())
    assembled = head(ex.assemble(blocks, size, norms=norms))
    blockwise = head.forward_blocks(blocks, size, norms)
    assert blockwise.dtype == torch.float32
    err_blockwise = float((blockwise.double() - ref).abs().max())
    err_assembled = float((assembled.double() - ref).abs().max())
    assert err_blockwise < 1e-4 * scale and err_blockwise <= 1.5 * err_assembled + 1e-6 * scale
    assert torch.allclose(blockwise, assembled, rtol=1e-4, atol=5e-4 * scale)
    # fp16 blocks (as cached) are computed in the head's dtype
    half = head.forward_blocks([b.half() for b in blocks], size, norms)
    assert half.dtype == torch.float32
    assert torch.allclose(half, head(ex.assemble([b.half() for b in blocks], size, norms=norms)), atol=1e-3)


def test_forward_blocks_same_loss_and_gradients():
    """One training step's loss and gradients: forward_blocks vs the head on the assembled features (fp32)."""
    ex, size = _extractor(2)
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    blocks = ex.extract_blocks(x)
    norms = ex.assemble_norms(blocks, size)
    labels = torch.randint(0, 3, (3, *size), generator=torch.Generator().manual_seed(5))
    labels[:, :2] = 255  # ignored pixels, as in the cache's padding
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)

    def step(head, blockwise, dtype=torch.float32):
        head = copy.deepcopy(head).to(dtype).train()
        bl = [b.to(dtype) for b in blocks]
        n = norms.to(dtype)
        logits = head.forward_blocks(bl, size, n) if blockwise else head(ex.assemble(blocks, size, norms=norms))
        loss = loss_fn(logits, labels)
        loss.backward()
        return loss, head

    # the first step of training: a freshly initialised head (zero biases)
    torch.manual_seed(1)
    fresh = PixelMLPHead(ex.out_channels, 3)
    loss_a, head_a = step(fresh, blockwise=False)
    loss_b, head_b = step(fresh, blockwise=True)
    assert torch.allclose(loss_a, loss_b, rtol=1e-4)
    for (name, pa), pb in zip(head_a.named_parameters(), head_b.parameters()):
        scale = float(pa.grad.abs().max())
        assert scale > 0, name
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-4 * scale), name
    for ma, mb in zip(head_a.modules(), head_b.modules()):  # the running statistics move the same way
        if isinstance(ma, nn.BatchNorm2d):
            assert torch.allclose(ma.running_mean, mb.running_mean, rtol=1e-4, atol=1e-7)
            assert torch.allclose(ma.running_var, mb.running_var, rtol=1e-4, atol=1e-7)

    # a head with biases (as after some training): forward_blocks stays within 1e-4 of the float64 gradients
    biased = _head_with_bias(ex.out_channels, 2)
    loss_b, head_b = step(biased, blockwise=True)
    loss_r, head_r = step(biased, blockwise=True, dtype=torch.float64)
    assert torch.allclose(loss_b.double(), loss_r, rtol=1e-5)
    for (name, pb), pr in zip(head_b.named_parameters(), head_r.parameters()):
        scale = float(pr.grad.abs().max())
        assert torch.allclose(pb.grad.double(), pr.grad, rtol=1e-4, atol=1e-4 * scale), name


def test_forward_blocks_ensemble_and_wrapper():
    from monai_mdm.networks import BlockwiseHead

    ex, size = _extractor(2)
    blocks = ex.extract_blocks(torch.rand(2, 3, *size) * 2 - 1)
    norms = ex.assemble_norms(blocks, size)
    feats = ex.assemble(blocks, size, norms=norms)
    torch.manual_seed(3)
    ens = PixelHeadEnsemble(ex.out_channels, 2, num_heads=3).eval()
    assert torch.allclose(ens.forward_blocks(blocks, size, norms), ens(feats), atol=1e-5)

    head = _head_with_bias(ex.out_channels, 2).eval()
    wrapper = BlockwiseHead(head)
    assert [p is q for p, q in zip(wrapper.parameters(), head.parameters())] == [True] * len(list(head.parameters()))
    assert torch.allclose(wrapper(blocks, spatial_size=size, norms=norms), head(feats), rtol=1e-4, atol=1e-6)
    wrapper.train()
    assert head.training  # the trainer's network.train() reaches the head
    with pytest.raises(TypeError, match="list of native-resolution blocks"):
        wrapper(feats, spatial_size=size)
    with pytest.raises(TypeError, match="forward_blocks"):
        BlockwiseHead(nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("path", ["forward_blocks", "infer_blocks"])
def test_blockwise_paths_refuse_the_same_bad_blocks(path):
    head = PixelMLPHead(10, 2) if path == "forward_blocks" else PixelHeadEnsemble(10, 2, num_heads=2).eval()
    run = getattr(head, path)
    good = [torch.randn(2, 6, 4, 4), torch.randn(2, 4, 8, 8)]
    assert run(good, (8, 8)).shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="expects 10"):
        run([torch.randn(2, 6, 4, 4)], (8, 8))
    with pytest.raises(ValueError, match="one batch size"):
        run([torch.randn(2, 6, 4, 4), torch.randn(3, 4, 8, 8)], (8, 8))
    with pytest.raises(ValueError, match="2 spatial dims"):
        run([torch.randn(2, 6, 4, 4, 4), torch.randn(2, 4, 8, 8)], (8, 8))
    with pytest.raises(ValueError, match="2 dims"):
        run(good, (8, 8, 8))
    with pytest.raises(ValueError, match="3 norms"):
        run(good, (8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="at least one block"):
        run([], (8, 8))
