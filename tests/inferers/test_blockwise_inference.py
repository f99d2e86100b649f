"""Inference from native-resolution blocks gives the predictions of the old concatenate-then-MLP path, without
building the assembled feature map, and shows a progress bar only where it helps."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from monai_mdm.inferers import MDMSegmenter, make_sliding_window_inferer
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble

BLOCKS = (3, 4, 5, 6, 7)  # the tiny preset's counterpart of the paper's 8..12: three resolutions
WINDOW = 32


def _fitted_head(features: torch.Tensor, num_heads: int, seed: int) -> PixelHeadEnsemble:
    """A head whose first layer standardises its outputs on ``features`` (assembled, (B, C, *spatial)), with
    BatchNorm statistics that are not the identity. An untrained head sees the features' common component
    only (one class everywhere, or ~0.5 scores where the argmax is a coin toss); this one, like a trained
    head, separates pixels."""
    g = torch.Generator().manual_seed(seed)
    head = PixelHeadEnsemble(features.shape[1], 2, num_heads=num_heads)
    pixels = features.movedim(1, -1).reshape(-1, features.shape[1])
    with torch.no_grad():
        for h in head.heads:
            convs = [m for m in h.layers if isinstance(m, torch.nn.Conv2d)]
            for conv in convs[1:]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(conv.weight.shape[1]))
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
            w = torch.randn(convs[0].weight.shape[:2], generator=g)
            # standardised, but no direction in which the features barely vary is blown up: such a weight would
            # turn float rounding (which differs with the thread count) into large score differences
            std = (pixels @ w.T).std(dim=0, keepdim=True).T
            w = w / std.clamp_min(std.median())
            convs[0].weight.copy_(w.view_as(convs[0].weight))
            convs[0].bias.copy_(-(pixels @ w.T).mean(dim=0))
            for bn in (m for m in h.layers if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.copy_(0.3 * torch.rand(bn.running_mean.shape, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
                bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=g))
                bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=g))
    return head.eval()


def _segmenter(net: MDMUNet, num_heads: int, seed: int, image: torch.Tensor) -> MDMSegmenter:
    extractor = MDMFeatureExtractor(net, blocks=BLOCKS, seed=0)
    with torch.no_grad():
        features = extractor(image[..., :WINDOW, :WINDOW])
    return MDMSegmenter(extractor, _fitted_head(features, num_heads, seed)).eval()


class AssembledReference(torch.nn.Module):
    """The path before blockwise inference, kept as the slow reference: upsample every block to the window,
    concatenate, divide by the L2 norm of the whole map, run the plain head on the 256-channel map."""

    def __init__(self, segmenter: MDMSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ex = self.segmenter.extractor
        size = images.shape[2:]
        blocks = ex.extract_blocks(images)
        ups = [b if b.shape[2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
               for b in blocks]  # fmt: skip
        feats = torch.cat(ups, dim=1)
        feats = feats / feats.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.segmenter.head(feats)


def _two_tissues(size, seed):
    """A bright disc on a dark background with noise, so that features (and the classes) differ across pixels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    disc = ((yy - size[0] / 2) ** 2 + (xx - size[1] / 3) ** 2 < (min(size) / 3) ** 2).float()
    return ((disc * 1.2 - 0.6).expand(1, 3, *size) + 0.2 * torch.randn(1, 3, *size, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def net() -> MDMUNet:
    torch.manual_seed(0)
    return MDMUNet.from_preset("tiny").eval()


@pytest.mark.parametrize("num_heads", [1, 3])
def test_predictions_identical_to_assembled_path(net, num_heads):
    image = _two_tissues((70, 90), seed=2)
    segmenter = _segmenter(net, num_heads, 1, image)
    reference = AssembledReference(segmenter)
    inferer = make_sliding_window_inferer(WINDOW, overlap=0.25, sw_batch_size=3, progress=False)
    with torch.no_grad():
        new, old = inferer(image, segmenter), inferer(image, reference)
        labels = segmenter.segment(image, inferer)
    assert new.shape == old.shape == (1, 2, 70, 90)
    # the stated tolerance of the scores: float32 rounding of sums taken in another order
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5)
    assert torch.equal(labels, old.argmax(dim=1, keepdim=True))  # the same prediction at every pixel
    assert 0.2 < labels.float().mean() < 0.8  # both classes occur: the comparison means something


def test_training_mode_and_grad_take_the_differentiable_path(net):
    windows = torch.rand(2, 3, WINDOW, WINDOW) * 2 - 1
    segmenter = _segmenter(net, 1, 3, windows)
    extractor = segmenter.extractor
    with torch.enable_grad():
        scores = segmenter(windows)
    assert scores.requires_grad  # the head's parameters get gradients (fine-tuning and evaluation share forward)
    with torch.no_grad():
        torch.testing.assert_close(segmenter(windows), scores.detach(), rtol=0, atol=2e-5)
    with pytest.raises(RuntimeError, match="eval"):
        segmenter.head.train().infer_blocks(extractor.extract_blocks(windows), (WINDOW, WINDOW))


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(e.cpu_memory_usage, 0) for e in prof.events())


def test_window_never_allocates_the_assembled_map(net):
    windows = torch.rand(4, 3, WINDOW, WINDOW) * 2 - 1
    segmenter = _segmenter(net, 1, 4, windows)
    extractor = segmenter.extractor
    assembled = 4 * extractor.out_channels * WINDOW * WINDOW * 4  # bytes of the float32 assembled features
    with torch.no_grad():
        blocks = extractor.extract_blocks(windows)
        new = _largest_allocation(lambda: segmenter.scores_of_blocks(blocks, (WINDOW, WINDOW)))
        old = _largest_allocation(lambda: segmenter.head(extractor.assemble(blocks, (WINDOW, WINDOW))))
    assert old >= assembled  # the check sees the map when it is built
    assert new <= assembled // 2  # the widest map is the head's 128 hidden channels, not the 256 features


def _windows(inferer, image) -> int:
    """Windows the inferer runs over ``image``, counted by calling it on a counting network."""
    seen = [0]

    def network(x):
        seen[0] += x.shape[0]
        return x[:, :1]

    inferer(image, network)
    return seen[0]


@pytest.mark.parametrize("size", [(70, 90), (20, 24), (64, 64), (33, 200)])
def test_progress_bar_counts_every_window(size):
    stream = io.StringIO()
    inferer = make_sliding_window_inferer(WINDOW, overlap=0.2, sw_batch_size=3, progress=True)
    inferer.progress_file = stream
    image = torch.zeros(2, 3, *size)
    counted = _windows(make_sliding_window_inferer(WINDOW, overlap=0.2, sw_batch_size=3, progress=False), image)
    assert inferer.count_windows(image.shape[2:]) * 2 == counted
    with torch.no_grad():
        inferer(image, lambda x: x[:, :1])
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert f"{counted}/{counted}" in last, last


def test_progress_bar_auto_is_silent_off_a_terminal(capsys):
    inferer = make_sliding_window_inferer(WINDOW, overlap=0.2)  # progress="auto": a terminal and > 2 s only
    with torch.no_grad():
        inferer(torch.zeros(1, 3, 100, 100), lambda x: x[:, :1])
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress"):
        make_sliding_window_inferer(WINDOW, progress="sometimes")


def test_volumes_equal_the_assembled_path():
    torch.manual_seed(0)
    extractor = MDMFeatureExtractor(MDMUNet.from_preset("tiny3d").eval(), blocks=(2, 3, 4, 5), seed=0)
    head = PixelHeadEnsemble(extractor.out_channels, 3, spatial_dims=3).eval()
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert {tuple(b.shape[2:]) for b in extractor.extract_blocks(volumes)} == {(8, 8, 8), (16, 16, 16)}
        torch.testing.assert_close(MDMSegmenter(extractor, head).eval()(volumes), head(extractor(volumes)),
                                   rtol=0, atol=1e-5)  # fmt: skip
