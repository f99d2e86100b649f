"""The face-part bundle on a tiny generated set in the DDPM-seg layout: ensemble training, mIoU, DDPM mode."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from monai.bundle import run

from helpers import BUNDLES, write_face_parts

PRETRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
FACES = BUNDLES / "mdm_face_parts_fewshot" / "configs"
TINY = dict(preset="tiny", blocks=[3, 4, 5, 6, 7], crop_size=64, max_steps=4, epoch_length=2, warmup_epochs=0, num_heads=3)


@pytest.fixture(scope="module")
def face_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffhq34")
    write_face_parts(root / "train", n=3, seed=0)
    write_face_parts(root / "test", n=2, seed=1)
    return root


@pytest.fixture(scope="module")
def pretrained(face_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run(config_file=PRETRAIN, dataset_dir=str(face_data), output_dir=str(out), max_iterations=2,
        image_size=32, batch_size=2, num_workers=0, progress_bar=False, grid_interval=0)  # fmt: skip
    return out / "models" / "model_ema.pt"


@pytest.mark.parametrize("corruption", ["objective", "ddpm"])
def test_face_ensemble_trains_votes_and_reports_miou(face_data, pretrained, tmp_path, corruption):
    from monai_mdm.inferers import MDMSegmenter, load_segmentation_model
    from monai_mdm.transforms import GaussianNoise, PatchMasking

    run(config_file=str(FACES / "train.json"), dataset_dir=str(face_data), output_dir=str(tmp_path),
        pretrained_weights=str(pretrained), corruption=corruption, **TINY)  # fmt: skip
    model = load_segmentation_model(tmp_path / "models" / "model.pt")
    assert isinstance(model, MDMSegmenter) and model.head.num_heads == 3 and len(model.class_names) == 34
    expected = GaussianNoise if corruption == "ddpm" else PatchMasking
    assert isinstance(model.extractor.corruption, expected)
    scores = model(torch.zeros(1, 3, 64, 64))
    assert scores.shape == (1, 34, 64, 64)
    # majority-vote fractions (plus a tiny tie-break) sum to one per pixel
    assert torch.allclose(scores.sum(1), torch.ones(1, 64, 64), atol=1e-4)

    run(config_file=[str(FACES / "train.json"), str(FACES / "evaluate.json")], dataset_dir=str(face_data), output_dir=str(tmp_path),
        window_size=64)  # fmt: skip
    ev = tmp_path / "evaluation"
    doc = json.loads((ev / "metrics.json").read_text())
    assert doc["images"] == ["0", "1"] and 0.0 <= doc["mean_iou"] <= 1.0
    present = {"background", *(n for n, v in doc["per_class_iou"].items() if v is not None)}
    assert len(present) <= 34
    rows = list(csv.DictReader((ev / "class_iou.csv").open()))
    assert len(rows) == 34 and rows[0]["class_name"] == "background"
    for name in ("0", "1"):
        assert (ev / "overlays" / f"{name}.png").is_file() and (ev / "predictions" / f"{name}.png").is_file()
    assert (ev / "legend.png").is_file()


def test_face_class_map_beyond_class_count_is_refused(face_data, pretrained, tmp_path):
    import numpy as np

    from helpers import error_chain

    bad = write_face_parts(tmp_path / "bad" / "train", n=2)
    np.save(bad / "1.npy", np.full((64, 64), 40, np.uint8))
    with pytest.raises(Exception) as info:
        run(config_file=str(FACES / "train.json"), dataset_dir=str(tmp_path / "bad"), output_dir=str(tmp_path / "o"),
            pretrained_weights=str(pretrained), **TINY)  # fmt: skip
    text = error_chain(info.value)
    assert "1.npy" in text and "40" in text
