"""benchmarks/label_efficiency.py end to end on tiny data: runs, CSVs, table, plot, resume and bad budgets."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO

TINY = ["--set", "crop_size=32", "--set", "crops_per_image=2", "--set", "max_steps=2", "--set", "epoch_length=2", "--set", "warmup_epochs=0",
        "--set", "unet_batch_size=2"]


@pytest.fixture(scope="module")
def bench():
    from monai_mdm import label_efficiency

    return label_efficiency


@pytest.fixture(scope="module")
def tiny_glas(tmp_path_factory) -> Path:
    from monai_mdm.data.synthetic import write_glas

    return write_glas(tmp_path_factory.mktemp("le") / "GlaS", n_train=4, n_test_a=1, n_test_b=1, size=(64, 64))


@pytest.fixture(scope="module")
def finished(bench, tiny_glas, tmp_path_factory):
    out = tmp_path_factory.mktemp("le_out")
    argv = ["--data", str(tiny_glas), "--out", str(out), "--budgets", "1", "--seeds", "0", "1",
            "--methods", "mdm_frozen", "unet", "--pretrain-iterations", "2", "--pretrain-size", "32", *TINY]
    assert bench.main(argv) == 0
    return out


def test_runs_every_method_budget_and_seed(finished):
    rows = list(csv.DictReader((finished / "runs.csv").open()))
    assert {(r["method"], int(r["budget"]), int(r["seed"])) for r in rows} == {
        (m, 1, s) for m in ("mdm_frozen", "unet") for s in (0, 1)
    }
    for r in rows:
        assert 0.0 <= float(r["paper_dice"]) <= 1.0 and 0.0 <= float(r["object_dice"]) <= 1.0
    # the labelled images of one seed and budget are the same for both methods (the bundles' own record)
    import json

    runs = finished / "runs"
    names = {m: json.loads((runs / f"{m}_b1_s1" / "label_budget.json").read_text())["names"] for m in ("mdm_frozen", "unet")}
    assert names["mdm_frozen"] == names["unet"] and len(names["unet"]) == 1


def test_summary_is_mean_and_std_of_the_runs(finished):
    rows = list(csv.DictReader((finished / "runs.csv").open()))
    summary = list(csv.DictReader((finished / "summary.csv").open()))
    assert len(summary) == 2
    for s in summary:
        values = [float(r["paper_dice"]) for r in rows if r["method"] == s["method"] and r["budget"] == s["budget"]]
        mean = sum(values) / len(values)
        assert int(s["n"]) == 2
        assert math.isclose(float(s["paper_dice_mean"]), mean, abs_tol=1e-9)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        assert math.isclose(float(s["paper_dice_std"]), std, abs_tol=1e-9)
    text = (finished / "summary.txt").read_text()
    assert "paper_dice (mean +- std over seeds)" in text and "object_dice" in text


def test_plot_is_a_png(finished):
    with Image.open(finished / "label_efficiency.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_second_call_reuses_finished_runs(bench, finished, tiny_glas, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_run_bundle", lambda **kw: calls.append(kw))
    argv = ["--data", str(tiny_glas), "--out", str(finished), "--budgets", "1", "--seeds", "0", "1",
            "--methods", "mdm_frozen", "unet", "--pretrained", str(finished / "pretrain" / "models" / "model_ema.pt"),
            *TINY]
    assert bench.main(argv) == 0
    assert calls == []  # every run's folder held results for the same settings
    # another setting is another run
    assert bench.main(argv[:-2] + ["--set", "unet_batch_size=1", "--methods", "unet", "--budgets", "1",
                                   "--seeds", "0"]) == 0
    assert len(calls) == 2 and calls[0]["unet_batch_size"] == 1  # train, then evaluate


def _usage_error(capsys, call) -> str:
    """What the command line prints when it refuses its arguments the argparse way (exit status 2)."""
    with pytest.raises(SystemExit) as err:
        call()
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("budget", ["0", "5"])
def test_budget_outside_the_training_set_is_refused(bench, tiny_glas, tmp_path, budget, capsys):
    last = _usage_error(capsys, lambda: bench.main(["--data", str(tiny_glas), "--out", str(tmp_path), "--budgets",
                                                    "1", budget, "--methods", "unet"]))  # fmt: skip
    assert last.startswith("python -m monai_mdm.label_efficiency: error: --budgets") and "1..4" in last
    assert not (tmp_path / "runs").exists()


def test_bad_set_is_refused(bench, tmp_path, capsys):
    assert "KEY=VALUE" in _usage_error(capsys, lambda: bench.main(["--out", str(tmp_path), "--set", "timestep"]))


def test_set_of_an_undefined_setting_is_refused(bench, tmp_path, capsys):
    last = _usage_error(capsys, lambda: bench.main(["--out", str(tmp_path), "--set", "max_step=3", "--methods",
                                                    "mdm_frozen"]))  # fmt: skip
    assert re.search("--max_step is not a setting.*Did you mean --max_steps", last)
    assert not tmp_path.joinpath("runs").exists()


def test_set_values_parse_as_json(bench):
    assert bench.parse_settings(["timestep=0", "blocks=[1,2]", "amp=false", "weights=raw"]) == {
        "timestep": 0, "blocks": [1, 2], "amp": False, "weights": "raw"}


def test_script_is_the_module_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_efficiency.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--budgets" in out and "mdm_finetune" in out


def test_objectives_are_pretrained_alike_and_compared_under_the_same_head(bench, tiny_glas, tmp_path):
    import torch

    argv = ["--data", str(tiny_glas), "--out", str(tmp_path), "--budgets", "1", "--seeds", "0", "--methods",
            "mdm_frozen", "unet", "--objectives", "mdm", "mae", "--pretrain-iterations", "2", "--pretrain-size", "32",
            *TINY]  # fmt: skip
    assert bench.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [(r["method"], r["objective"]) for r in rows] == [
        ("mdm_frozen", "mdm"), ("mdm_frozen[mae]", "mae"), ("unet", "-")]  # the UNet does not depend on it
    from monai_mdm.inferers import load_segmentation_model

    # each objective pretrained alike, its checkpoint records which one it was
    for objective, folder in (("mdm", "pretrain"), ("mae", "pretrain_mae")):
        record = torch.load(tmp_path / folder / "models" / "model_ema.pt", weights_only=True)["pretraining"]
        assert record["objective"]["name"] == objective and record["iteration"] == 2
    # the few-shot runs read each checkpoint's features its way: MDM masks at t = 50, MAE takes the clean image
    mdm = load_segmentation_model(tmp_path / "runs" / "mdm_frozen_b1_s0" / "models" / "model.pt").extractor
    mae = load_segmentation_model(tmp_path / "runs" / "mdm_frozen_mae_b1_s0" / "models" / "model.pt").extractor
    assert (type(mdm.corruption).__name__, mdm.timestep) == ("PatchMasking", 50)
    assert (mae.corruption, mae.timestep) == (None, 0)
    assert "mdm_frozen[mae]" in (tmp_path / "summary.txt").read_text()


def test_pretrained_weights_with_several_objectives_are_refused(bench, tiny_glas, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    last = _usage_error(capsys, lambda: bench.main(["--data", str(tiny_glas), "--out", str(tmp_path), "--pretrained",
                                                    str(weights), "--objectives", "mdm", "umd"]))  # fmt: skip
    assert "--pretrained gives the weights of one objective" in last
    assert not (tmp_path / "runs").exists()
