"""Shared pytest fixtures; plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The embedded synthetic GlaS and MoNuSeg sets, written once per test session."""
    from monai_mdm.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0)


@pytest.fixture(scope="session")
def tiny_pretrained(demo_data, tmp_path_factory) -> Path:
    """One tiny pretraining run (2 iterations at 32 px on the embedded GlaS set) through the bundle, shared by
    every test that needs pretrained weights: its ``models/`` folder (``model.pt``, ``model_ema.pt``)."""
    from monai.bundle import run

    from helpers import BUNDLES

    out = tmp_path_factory.mktemp("tiny_pretrain")
    run(config_file=str(BUNDLES / "mdm_pretrain" / "configs" / "train.json"), dataset_dir=str(demo_data["glas"]),
        output_dir=str(out), max_iterations=2, image_size=32, batch_size=2, num_workers=0, progress_bar=False,
        grid_interval=0)  # fmt: skip
    return out / "models"


@pytest.fixture(scope="session")
def tiny_glas_model(demo_data, tiny_pretrained, tmp_path_factory) -> Path:
    """A tiny GlaS segmenter (64 px crops, 10 head steps) written by the bundle's train.json: ``model.pt``."""
    from monai.bundle import run

    from helpers import BUNDLES

    out = tmp_path_factory.mktemp("glas_head")
    run(config_file=str(BUNDLES / "mdm_glas_fewshot" / "configs" / "train.json"), dataset_dir=str(demo_data["glas"]),
        output_dir=str(out), pretrained_weights=str(tiny_pretrained / "model_ema.pt"), label_budget=2,
        crop_size=64, crops_per_image=4, max_steps=10, epoch_length=2, warmup_epochs=0)  # fmt: skip
    return out / "models" / "model.pt"
