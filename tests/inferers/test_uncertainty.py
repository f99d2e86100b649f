"""The active-learning score: confident heads score low, uncertain or disagreeing heads high."""

from __future__ import annotations

import math

import pytest
import torch

from monai_mdm.inferers import MDMSegmenter
from monai_mdm.inferers.uncertainty import ensemble_uncertainty, image_uncertainty
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble


def _probs(per_head: list[list[float]], size=(4, 4)) -> torch.Tensor:
    """(1, heads, classes, H, W): every pixel holds the same per-head distributions."""
    p = torch.tensor(per_head)[None, :, :, None, None]
    return p.expand(1, *p.shape[1:3], *size).clone()


def test_confident_heads_score_low_and_uncertain_heads_high():
    confident = ensemble_uncertainty(_probs([[0.99, 0.01], [0.98, 0.02], [0.99, 0.01]]))
    unsure = ensemble_uncertainty(_probs([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    assert confident["entropy"].item() < 0.1 < unsure["entropy"].item()
    assert unsure["entropy"].item() == pytest.approx(math.log(2))
    # each head unsure, but all alike: nothing the heads disagree on
    assert unsure["disagreement"].item() == pytest.approx(0.0, abs=1e-6)


def test_contradicting_heads_show_as_disagreement():
    split = ensemble_uncertainty(_probs([[1.0, 0.0], [0.0, 1.0]]))
    assert split["entropy"].item() == pytest.approx(math.log(2))
    assert split["disagreement"].item() == pytest.approx(math.log(2))  # every head sure, each of another class


def test_score_is_per_image():
    batch = torch.cat([_probs([[0.99, 0.01], [0.99, 0.01]]), _probs([[0.5, 0.5], [0.6, 0.4]])])
    scores = ensemble_uncertainty(batch)
    assert scores["entropy"].shape == (2,) and scores["entropy"][0] < scores["entropy"][1]


def test_whole_image_score_through_the_sliding_window():
    torch.manual_seed(0)
    extractor = MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(5, 6, 7, 8), seed=3)
    segmenter = MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2, num_heads=3)).eval()
    images = torch.rand(2, 3, 40, 56) * 2 - 1  # not a multiple of the window nor of the size multiple
    scores = image_uncertainty(segmenter, images, roi_size=32, overlap=0.25)
    assert scores["entropy"].shape == (2,)
    assert bool(((scores["entropy"] >= 0) & (scores["entropy"] <= math.log(2) + 1e-5)).all())
    assert bool((scores["disagreement"] <= scores["entropy"] + 1e-6).all())


def test_the_unet_baseline_has_no_ensemble_to_score():
    with pytest.raises(TypeError, match="UNet baseline"):
        image_uncertainty(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 8, 8))
