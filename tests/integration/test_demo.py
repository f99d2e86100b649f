"""The README's main job, shrunk: the whole pipeline chained through the bundles, with its comparison table."""

from __future__ import annotations

import json

from PIL import Image

from monai_mdm.demo import main

TINY = ["--set", "crop_size=32", "--set", "crops_per_image=2", "--set", "max_steps=2", "--set", "epoch_length=2", "--set", "warmup_epochs=0"]


def test_demo_pipeline_prints_unet_frozen_and_finetuned_scores(tmp_path, capsys):
    assert main(
        [
            "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"),
            "--pretrain-iterations", "2", "--pretrain-size", "32", "--n-train", "10", *TINY,
        ]
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "comparison.json").read_text())
    for label in ("BasicUNet from scratch", "MDM frozen features + head", "MDM fine-tuned end to end"):
        assert label in printed
    assert "mean +- std over test images" in printed
    assert summary["budget"]["count"] == 1  # 10% of 10 training images
    assert set(summary["results"]) == {"unet", "mdm_frozen", "mdm_finetune"}
    for by_seed in summary["results"].values():
        rows = by_seed["0"]  # JSON keys are text
        assert len(rows) == 6 and all(0.0 <= r["paper_dice"] <= 1.0 for r in rows)
    assert (tmp_path / "runs" / "comparison.txt").read_text().startswith("GlaS (synthetic) test set")
    assert (tmp_path / "data" / "GlaS" / "Grade.csv").is_file()
    with Image.open(tmp_path / "runs" / "label_efficiency.png") as png:
        assert png.format == "PNG"
