"""MDMFeatureExtractor: channels, sizes, normalisation, hook/early-stop correctness, determinism, 2D/3D."""

from __future__ import annotations

import pytest
import torch

from monai_mdm.networks import MDMFeatureExtractor, MDMUNet
from monai_mdm.transforms.corruption import PatchMasking

BLOCKS = (4, 5, 6, 7, 8)  # the tiny preset has 9 decoder blocks


@pytest.fixture(scope="module")
def net() -> MDMUNet:
    torch.manual_seed(0)
    return MDMUNet.from_preset("tiny")


def _images(b=2, size=(32, 48), seed=1):
    return torch.rand(b, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _full_forward_blocks(net, x, t):
    """Block outputs captured by hooks on an ordinary, complete forward pass."""
    got = {}
    hs = [net.output_blocks[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o)) for i in range(9)]
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        for h in hs:
            h.remove()
    return got


def test_paper_channel_count():
    with torch.device("meta"):
        paper = MDMUNet.from_preset("paper")
    assert MDMFeatureExtractor(paper).out_channels == 1728
    assert MDMFeatureExtractor(paper, blocks=range(5, 13)).out_channels == 3264


def test_shape_channels_and_norm(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS)
    x = _images()
    f = ex(x)
    assert ex.out_channels == sum(net.decoder_channels[i] for i in BLOCKS) == 2 * 64 + 3 * 32
    assert f.shape == (2, ex.out_channels, 32, 48)
    assert torch.allclose(f.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)
    blocks = ex.extract_blocks(x)
    assert [tuple(b.shape[1:]) for b in blocks] == ex.native_shapes((32, 48))


def test_hooks_match_full_forward_and_stop_early(net):
    ex = MDMFeatureExtractor(net, blocks=(2, 5, 3))
    x = _images()
    calls = {"out": 0, "later": 0}
    h1 = net.out.register_forward_hook(lambda *a: calls.__setitem__("out", calls["out"] + 1))
    h2 = net.output_blocks[6].register_forward_hook(lambda *a: calls.__setitem__("later", calls["later"] + 1))
    try:
        blocks = ex.extract_blocks(x)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"out": 0, "later": 0}  # stopped after block 5
    # the same corruption, applied by hand, then a complete forward with the extractor's timestep
    corrupted = ex.corrupt(x)
    assert not torch.equal(corrupted, x)
    full = _full_forward_blocks(net, corrupted, torch.full((2,), 50))
    for b, i in zip(blocks, (2, 5, 3)):
        assert torch.equal(b, full[i])
    # no hooks are left behind
    assert all(len(net.output_blocks[i]._forward_hooks) == 0 for i in range(9))


def test_seed_determinism_and_batch_independence(net):
    x = _images(3)
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, seed=7)
    a, b = ex(x), ex(x)
    assert torch.equal(a, b)
    # an image's mask does not depend on its neighbours in the batch
    assert torch.equal(ex.corrupt(x)[1:2], ex.corrupt(x[1:2]))
    # explicit per-image seeds override the extractor seed
    assert not torch.equal(ex.corrupt(x, seeds=[1, 2, 3]), ex.corrupt(x))
    fresh = MDMFeatureExtractor(net, blocks=BLOCKS, seed=None)
    assert not torch.equal(fresh.corrupt(x), fresh.corrupt(x))
    # PatchMasking at t=50 blanks exactly floor(L * 0.95) kept patches: 24 patches -> 22 kept -> 2 blanked
    masked = ex.corrupt(torch.ones(1, 3, 32, 48))
    assert int((masked == 0).all(dim=1).sum()) == 2 * 64


def test_no_corruption(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, corruption=None, seed=None)
    x = _images()
    assert torch.equal(ex.corrupt(x), x)
    full = _full_forward_blocks(net, x, torch.full((2,), 50))
    for b, i in zip(ex.extract_blocks(x), BLOCKS):
        assert torch.equal(b, full[i])


def test_normalize_off_and_assemble_with_norms(net):
    x = _images()
    ex = MDMFeatureExtractor(net, blocks=BLOCKS)
    raw = MDMFeatureExtractor(net, blocks=BLOCKS, normalize=False)
    blocks = ex.extract_blocks(x)
    norms = ex.assemble_norms(blocks, (32, 48))
    assert torch.allclose(raw.assemble(blocks, (32, 48)) / norms.view(-1, 1, 1, 1), ex.assemble(blocks, (32, 48)))
    assert torch.equal(ex.assemble(blocks, (32, 48), norms=norms), ex.assemble(blocks, (32, 48)))


def test_3d():
    torch.manual_seed(0)
    net3 = MDMUNet.from_preset("tiny3d")
    ex = MDMFeatureExtractor(net3, blocks=(2, 3, 4, 5))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    f = ex(x)
    assert f.shape == (1, 64 + 64 + 32 + 32, 16, 16, 16)
    assert torch.allclose(f.flatten(1).norm(dim=1), torch.ones(1), atol=1e-5)
    assert [tuple(b.shape[1:]) for b in ex.extract_blocks(x)] == ex.native_shapes((16, 16, 16))


def test_bad_blocks_and_sizes(net):
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.8"):
        MDMFeatureExtractor(net)  # the default 8..12 needs the paper network
    with pytest.raises(ValueError, match="duplicates"):
        MDMFeatureExtractor(net, blocks=(3, 3))
    ex = MDMFeatureExtractor(net, blocks=BLOCKS)
    with pytest.raises(ValueError, match="multiple of 8"):
        ex(torch.zeros(1, 3, 36, 36))


def test_frozen_and_eval(net):
    ex = MDMFeatureExtractor(net, blocks=BLOCKS, corruption=PatchMasking(4, 1000))
    ex.train()
    assert ex.training and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    net.train()  # even if someone flips the backbone, extraction runs it in eval mode
    ex.extract_blocks(_images(1))
    assert not net.training
    f = ex(_images(1))
    assert not f.requires_grad


def test_trainable_extractor_passes_gradients_to_the_blocks_that_run():
    torch.manual_seed(0)
    net = MDMUNet.from_preset("tiny")
    ex = MDMFeatureExtractor(net, blocks=(3, 5), trainable=True)
    ex.train()
    assert not net.training  # trainable, yet the backbone runs as at inference
    params = ex.trainable_parameters()
    beyond = [*net.output_blocks[6:].parameters(), *net.out.parameters()]
    assert {id(p) for p in params}.isdisjoint(id(p) for p in beyond)
    assert len(params) + len(beyond) == len(list(net.parameters()))
    ex(_images(1)).square().sum().backward()
    assert all(p.grad is None for p in beyond)
    assert all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in net.output_blocks[5].parameters())
    with torch.no_grad():  # caches and inference: no graph even when trainable
        assert not ex(_images(1)).requires_grad
    assert not MDMFeatureExtractor(net, blocks=(3, 5))(_images(1)).requires_grad  # frozen again by default


@pytest.mark.parametrize(
    "shape, size", [((2, 5, 8, 12), (16, 48)), ((2, 3, 7, 9), (32, 20)), ((1, 4, 4, 6, 8), (8, 12, 8))]
)
def test_norms_at_native_resolution_equal_upsampled(shape, size):
    """assemble_norms never upsamples, yet gives the norm of the upsampled blocks (any ratio, 2D and 3D)."""
    from monai_mdm.networks.features import _upsampled_sum_squares

    block = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mode = "bilinear" if block.ndim == 4 else "trilinear"
    upsampled = torch.nn.functional.interpolate(block, size=size, mode=mode, align_corners=False)
    expected = upsampled.square().flatten(1).sum(dim=1)
    torch.testing.assert_close(_upsampled_sum_squares(block.float(), size).double(), expected, rtol=1e-6, atol=0)


def test_bfloat16_network_features_stay_within_tolerance_of_float32():
    """The frozen network in bfloat16 (half the weights' memory while caching): the assembled features stay
    within 2 % (relative L2, per image) of float32's on the tiny preset; measured 0.3-0.5 %."""
    import copy

    torch.manual_seed(0)
    net = MDMUNet.from_preset("tiny").eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        full = MDMFeatureExtractor(net, blocks=(3, 4, 5, 6, 7), seed=0)(images)
        half_ex = MDMFeatureExtractor(copy.deepcopy(net).to(torch.bfloat16), blocks=(3, 4, 5, 6, 7), seed=0)
        blocks = half_ex.extract_blocks(images)
        half = half_ex.assemble(blocks, (64, 64))
    assert {b.dtype for b in blocks} == {torch.bfloat16} and half.dtype == torch.float32
    error = (half - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1)
    assert float(error.max()) < 2e-2, error
    assert float(error.max()) > 0  # really computed in another precision
