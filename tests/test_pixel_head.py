"""PixelMLPHead / PixelHeadEnsemble: shapes, init, hidden-width rule, majority vote and entropy."""

from __future__ import annotations

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
