"""What the few-shot bundles do differently inside MONAI Label, and the active-learning scorer (no MONAI Label)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BUNDLES
from monai_mdm.apps.monailabel import EnsembleEntropyScorer, pretrained_weights, trains_in_app
from monai_mdm.inferers import MDMSegmenter
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble


def test_only_the_apps_copy_of_the_bundle_counts_as_monailabel(monkeypatch, tmp_path):
    app, elsewhere = tmp_path / "app", tmp_path / "bundles" / "mdm_glas_fewshot"
    monkeypatch.delenv("MONAI_LABEL_APP_DIR", raising=False)
    assert not trains_in_app(app / "model" / "mdm_glas_fewshot")
    monkeypatch.setenv("MONAI_LABEL_APP_DIR", str(app))
    assert trains_in_app(app / "model" / "mdm_glas_fewshot")
    assert not trains_in_app(elsewhere)  # a command-line run beside a server keeps its own paths
    assert pretrained_weights(elsewhere, "runs/x/model_ema.pt") == "runs/x/model_ema.pt"


def test_pretrained_weights_in_the_app(monkeypatch, tmp_path):
    root = tmp_path / "app" / "model" / "b"
    monkeypatch.setenv("MONAI_LABEL_APP_DIR", str(tmp_path / "app"))
    with pytest.raises(FileNotFoundError, match="neither pretrained.pt nor model.pt"):
        pretrained_weights(root, "runs/x/model_ema.pt")
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(b"x")
    assert pretrained_weights(root, "ignored") == str(root / "models" / "model.pt")
    (root / "models" / "pretrained.pt").write_bytes(b"x")
    assert pretrained_weights(root, "ignored") == str(root / "models" / "pretrained.pt")


class FakeDatastore:
    """The four calls of MONAI Label's datastore that the scorer makes."""

    def __init__(self, images):
        self.images, self.info = images, {k: {} for k in images}

    def get_unlabeled_images(self):
        return list(self.images)

    def get_image_uri(self, image_id):
        return self.images[image_id]

    def get_image_info(self, image_id):
        return self.info[image_id]

    def update_image_info(self, image_id, info):
        self.info[image_id].update(info)


def test_scorer_scores_unlabelled_images_and_rescores_only_for_a_new_model(tmp_path):
    root = tmp_path / "mdm_glas_fewshot"
    shutil.copytree(BUNDLES / "mdm_glas_fewshot" / "configs", root / "configs")
    torch.manual_seed(0)
    extractor = MDMFeatureExtractor(MDMUNet.from_preset("tiny"), blocks=(5, 6, 7, 8), seed=3)
    MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2, num_heads=3)).save(root / "models" / "model.pt")
    rng = np.random.default_rng(0)
    images = {}
    for name in ("flat", "noisy"):
        pixels = np.full((64, 72, 3), 128, np.uint8) if name == "flat" else rng.integers(0, 256, (64, 72, 3), np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        images[name] = str(tmp_path / f"{name}.png")
    datastore = FakeDatastore(images)
    scorer = EnsembleEntropyScorer(root)

    result = scorer({}, datastore)
    assert result["scored"] == 2
    for name in images:
        info = datastore.info[name]
        assert 0 <= info["mdm_entropy_disagreement"] <= info["mdm_entropy"] <= np.log(2) + 1e-5
    assert scorer({}, datastore)["scored"] == 0  # same model: nothing to redo
    os.utime(root / "models" / "model.pt", ns=(1, 1))  # a new model.pt, as a training writes
    assert scorer({}, datastore)["scored"] == 2


def test_scorer_without_a_trained_model_says_so(tmp_path):
    result = EnsembleEntropyScorer(tmp_path)({}, FakeDatastore({}))
    assert result["scored"] == 0 and "no trained model" in result["reason"]
