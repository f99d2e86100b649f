"""``inference_wsi.json`` of the GlaS and MoNuSeg bundles, run as a user runs it: ``python -m monai.bundle run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile

from helpers import BUNDLES, REPO
from monai_mdm.data import write_synthetic_slide


def bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip


@pytest.mark.parametrize("bundle, mpp", [("mdm_glas_fewshot", 0.62), ("mdm_monuseg_fewshot", 0.25)])
def test_a_slide_becomes_a_pyramidal_label_tiff_at_the_bundles_mpp(bundle, mpp, tiny_glas_model, tmp_path):
    slide = tmp_path / "case.tif"
    write_synthetic_slide(slide, (200, 300), mpp=mpp, cell=64, tile=64, seed=2)
    config = str(BUNDLES / bundle / "configs" / "inference_wsi.json")
    proc = bundle_run("run", "--config_file", config, "--slide", str(slide), "--model_path", str(tiny_glas_model),
                      "--output_dir", "out", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tifffile.TiffFile(tmp_path / "out" / "case_seg.tif") as tif:
        assert tif.series[0].levels[0].shape == (200, 300)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_seg.tif"]


def test_a_slide_without_resolution_names_mpp_last(tiny_glas_model, tmp_path):
    slide = tmp_path / "scan.tif"
    write_synthetic_slide(slide, (128, 128), mpp=None, cell=64, tile=64)
    config = str(BUNDLES / "mdm_glas_fewshot" / "configs" / "inference_wsi.json")
    proc = bundle_run("run", "--config_file", config, "--slide", str(slide), "--model_path", str(tiny_glas_model),
                      "--output_dir", "out", cwd=tmp_path)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: "), proc.stderr[-3000:]
    assert "--mpp 0.62: " in last and "scan.tif' records no resolution" in last and "--level" in last
    assert not (tmp_path / "out" / "scan_seg.tif").exists()
