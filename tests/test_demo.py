"""The README's main job, shrunk: the whole pipeline chained through the bundles, with its comparison table."""

from __future__ import annotations

import json

from monai_mdm.demo import main


def test_demo_pipeline_prints_mdm_and_unet_scores(tmp_path, capsys):
    summary = main(
        [
            "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"),
            "--pretrain-iterations", "2", "--pretrain-size", "32", "--n-train", "10", "--head-steps", "4",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "MDM frozen features + pixel head" in printed and "supervised BasicUNet from scratch" in printed
    assert summary["budget"]["count"] == 1  # 10% of 10 training images
    for rows in summary["results"].values():
        assert len(rows) == 6 and all(0.0 <= r["paper_dice"] <= 1.0 for r in rows)
    saved = json.loads((tmp_path / "runs" / "comparison.json").read_text())
    assert saved["budget"] == summary["budget"]
    assert (tmp_path / "runs" / "comparison.txt").read_text().startswith("GlaS (synthetic) test set")
    assert (tmp_path / "data" / "GlaS" / "Grade.csv").is_file()
