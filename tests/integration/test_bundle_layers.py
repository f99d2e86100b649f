"""The few-shot bundles are written from one base and small overlays (``configs/bundles/``), and each stays a
folder that runs on its own once copied away from the repository."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BUNDLES, REPO, SCHEMA

SCRIPT = REPO / "scripts" / "build_bundle_configs.py"
LONGEST_EXPRESSION = 90


def build_script():
    spec = importlib.util.spec_from_file_location("build_bundle_configs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_every_bundle_file_is_what_its_layers_give():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_names_a_hand_edited_bundle_file(tmp_path, monkeypatch):
    build = build_script()
    copy = Path(shutil.copytree(BUNDLES, tmp_path / "bundles"))
    monkeypatch.setattr(build, "BUNDLES", copy)
    assert build.stale_files() == []
    edited = copy / "mdm_monuseg_fewshot" / "configs" / "train.json"
    edited.write_text(edited.read_text().replace('"batch_size": 16', '"batch_size": 8'))
    (copy / "mdm_glas_fewshot" / "configs" / "online_features.json").unlink()
    assert set(build.stale_files()) == {edited, copy / "mdm_glas_fewshot" / "configs" / "online_features.json"}
    assert build.main([]) == 0  # rewrites them
    assert build.stale_files() == []


def test_a_layer_that_leaves_a_base_setting_unset_is_refused(tmp_path, monkeypatch):
    build = build_script()
    layers = Path(shutil.copytree(build.LAYERS, tmp_path / "layers"))
    monkeypatch.setattr(build, "LAYERS", layers)
    glas = json.loads((layers / "mdm_glas_fewshot.json").read_text())
    del glas["train.json"]["datalist"]
    (layers / "mdm_glas_fewshot.json").write_text(json.dumps(glas))
    with pytest.raises(SystemExit, match=r"mdm_glas_fewshot.json: section 'train.json' must set \['datalist'\]"):
        build.bundle_files("mdm_glas_fewshot")


def test_overlay_ids_nest_into_the_base_and_lists_stay_readable():
    build = build_script()
    base = {"train": {"loss": {"_target_": "A", "ignore_index": 255}}, "imports": ["$import torch"]}
    merged = build._apply(base, {"train#loss#_target_": "B", "+imports": ["$import monai"]}, complete=True)
    assert merged == {"train": {"loss": {"_target_": "B", "ignore_index": 255}}, "imports": ["$import torch",
                                                                                       "$import monai"]}
    # in an overlay, an id into train.json (which the overlay does not hold) stays for MONAI to apply at run time
    overlay = build._apply({"evaluate": {"handlers": [{"a": 1}]}}, {"evaluate#handlers#0#a": 2, "train#x": 3}, False)
    assert overlay == {"evaluate": {"handlers": [{"a": 2}]}, "train#x": 3}
    assert build._format({"keys": ["image", "label"]}) == '{\n    "keys": ["image", "label"]\n}'


def _expressions(value, where: str):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _expressions(item, f"{where}#{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from _expressions(item, f"{where}#{n}")
    elif isinstance(value, str) and value.startswith("$"):
        yield where, value


def test_no_config_expression_is_longer_than_a_line_should_be():
    files = [p for p in BUNDLES.glob("*/configs/*.json") if p.name != "metadata.json"]
    files += list((REPO / "configs" / "bundles").rglob("*.json"))
    long = [
        f"{path.relative_to(REPO)}{where}: {len(text)} characters"
        for path in files
        for where, text in _expressions(json.loads(path.read_text()), "")
        if len(text) > LONGEST_EXPRESSION
    ]
    assert not long, "\n".join(long)


def test_a_copied_bundle_trains_evaluates_and_infers_from_its_own_folder(demo_data, tiny_pretrained, tmp_path):
    """What a user who copies ``bundles/mdm_glas_fewshot`` elsewhere runs, from inside the copy."""
    bundle = Path(shutil.copytree(BUNDLES / "mdm_glas_fewshot", tmp_path / "elsewhere" / "mdm_glas_fewshot"))
    data = str(demo_data["glas"])
    small = ["--crop_size", "32", "--crops_per_image", "2", "--max_steps", "2", "--epoch_length", "2",
             "--warmup_epochs", "0", "--label_budget", "1"]  # fmt: skip
    train = bundle_run("run", "--config_file", "configs/train.json", "--bundle_root", ".", "--dataset_dir", data,
                       "--pretrained_weights", str(tiny_pretrained / "model_ema.pt"), "--output_dir", "out", *small,
                       cwd=bundle)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = bundle_run("run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--bundle_root",
                          ".", "--dataset_dir", data, "--output_dir", "out", "--window_size", "32", cwd=bundle)  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    rows = json.loads((bundle / "out" / "evaluation" / "metrics.json").read_text())["rows"]
    assert len(rows) == len(list(Path(data).glob("test*_anno.bmp")))
    shutil.copytree(bundle / "out" / "models", bundle / "models", dirs_exist_ok=True)  # where inference looks
    images = tmp_path / "to_segment"
    images.mkdir()
    for name in ("testA_1.bmp", "testB_1.bmp"):
        shutil.copy(Path(data) / name, images / name)
    infer = bundle_run("run", "--config_file", "configs/inference.json", "--bundle_root", ".", "--dataset_dir",
                       str(images), "--output_dir", "predicted", "--window_size", "32", cwd=bundle)  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert sorted(p.name for p in (bundle / "predicted").glob("*.png")) == ["testA_1_seg.png", "testB_1_seg.png"]
    verify = bundle_run("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA),
                        cwd=bundle)  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-3000:]


@pytest.mark.parametrize("bundle", ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot",
                                    "mdm_volume_fewshot"])  # fmt: skip
def test_monai_tracking_finds_every_engine_and_its_handlers(bundle):
    """``--tracking mlflow`` attaches its handler through fixed config ids; a renamed engine would lose it."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    configs = BUNDLES / bundle / "configs"
    ids = DEFAULT_MLFLOW_SETTINGS["handlers_id"]
    for files, kind in ((["train.json"], "trainer"), (["train.json", "evaluate.json"], "evaluator")):
        parser = ConfigParser(ConfigParser.load_config_files([str(configs / f) for f in files]))
        assert ids[kind]["id"] in parser and isinstance(parser[ids[kind]["handlers"]], list), (files, kind)
