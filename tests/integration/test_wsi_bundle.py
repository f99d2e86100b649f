"""``inference_wsi.json`` of the GlaS and MoNuSeg bundles, run as a user runs it: ``python -m monai.bundle run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from helpers import BUNDLES, REPO
from monai_mdm.data import geojson_to_instances, write_synthetic_slide


def bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip


@pytest.mark.parametrize("bundle, mpp, outputs", [
    ("mdm_glas_fewshot", 0.62, ["case_seg.tif"]),
    ("mdm_monuseg_fewshot", 0.25, ["case_nuclei.geojson", "case_seg.tif"]),
])  # fmt: skip
def test_a_slide_becomes_a_pyramidal_label_tiff_at_the_bundles_mpp(bundle, mpp, outputs, tiny_glas_model, tmp_path):
    slide = tmp_path / "case.tif"
    write_synthetic_slide(slide, (200, 300), mpp=mpp, cell=64, tile=64, seed=2)
    config = str(BUNDLES / bundle / "configs" / "inference_wsi.json")
    proc = bundle_run("run", "--config_file", config, "--slide", str(slide), "--model_path", str(tiny_glas_model),
                      "--output_dir", "out", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tifffile.TiffFile(tmp_path / "out" / "case_seg.tif") as tif:
        labels = tif.series[0].levels[0].asarray()
        assert labels.shape == (200, 300)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == outputs
    if "case_nuclei.geojson" in outputs:  # the nuclei are the watershed of the nucleus mask's pixels
        nuclei = geojson_to_instances(tmp_path / "out" / "case_nuclei.geojson", labels.shape)
        np.testing.assert_array_equal(nuclei > 0, labels > 0)
        # the tiny GlaS head finds no nucleus here (tests/inferers/test_slide_inference.py checks the nuclei)
        assert set(np.unique(labels)) <= {0, 1}


def test_a_bad_instances_setting_is_refused_naming_it(tiny_glas_model, tmp_path):
    slide = tmp_path / "case.tif"
    write_synthetic_slide(slide, (128, 128), mpp=0.25, cell=64, tile=64)
    config = str(BUNDLES / "mdm_monuseg_fewshot" / "configs" / "inference_wsi.json")
    proc = bundle_run("run", "--config_file", config, "--slide", str(slide), "--model_path", str(tiny_glas_model),
                      "--output_dir", "out", "--instances", "otsu", cwd=tmp_path)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "--instances must be one of watershed, connected_components, none" in last
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


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
