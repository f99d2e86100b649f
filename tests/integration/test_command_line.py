"""What a user of `python -m monai.bundle run` reads: the real error last, refused typos and text booleans."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from monai_mdm.command_line import UnknownSettingError, split_config_files, check_overrides, parse_bundle_argv

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "bundles" / "mdm_pretrain" / "configs" / "train.json"
GLAS = REPO / "bundles" / "mdm_glas_fewshot" / "configs"


def bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )


def last_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def test_parse_bundle_argv_reads_values_as_python_fire_does():
    pairs = parse_bundle_argv(["--config_file", "a.json", "--max_iterations=3", "--resume", "false", "--amp",
                               "--blocks", "[1,2]", "--resume_b", "False"])
    assert pairs == {"config_file": "a.json", "max_iterations": 3, "resume": "false", "amp": True,
                     "blocks": [1, 2], "resume_b": False}


def test_check_overrides_accepts_nested_ids_and_overlays():
    files = [str(GLAS / "train.json"), str(GLAS / "finetune.json")]
    check_overrides(files, {"label_budget": 4, "finetune_lr_scale": 1.0, "train#handlers#0#patience": 3,
                            "head#num_classes": 2, "config_file": files, "version": "x"})


def test_check_overrides_names_the_closest_setting_and_the_fix():
    with pytest.raises(UnknownSettingError) as err:
        check_overrides([str(PRETRAIN)], {"max_iteration": 3})
    assert "--max_iteration is not a setting" in str(err.value)
    assert "Did you mean --max_iterations" in str(err.value)
    with pytest.raises(UnknownSettingError, match="--resume False"):
        check_overrides([str(PRETRAIN)], {"resume": "false"})
    with pytest.raises(UnknownSettingError, match="train#handlers#40"):
        check_overrides([str(GLAS / "train.json")], {"train#handlers#40": 1})


def test_tracking_settings_are_known_when_tracking_is_on():
    check_overrides([str(PRETRAIN)], {"tracking": "mlflow", "tracking_uri": "http://127.0.0.1:5000"})
    with pytest.raises(UnknownSettingError, match="tracking_uri"):
        check_overrides([str(PRETRAIN)], {"tracking_uri": "http://127.0.0.1:5000"})


def test_documented_commands_use_only_defined_settings():
    """Every `python -m monai.bundle run` line in the bundles' READMEs passes the check a user's run gets."""
    checked = 0
    for doc in sorted((REPO / "bundles").glob("*/docs/README.md")):
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if "monai.bundle run" not in line or line.lstrip().startswith("#"):
                continue
            words = shlex.split(line.split("monai.bundle run", 1)[1].split(" # ")[0])
            pairs = parse_bundle_argv(words)
            if "config_file" not in pairs:
                continue
            files = [str(REPO / f) for f in split_config_files(pairs["config_file"])]
            check_overrides(files, pairs)
            checked += 1
    print(f"{checked} documented commands checked")
    assert checked >= 20


def test_check_overrides_allows_new_settings_on_request(monkeypatch):
    monkeypatch.setenv("MONAI_MDM_ALLOW_NEW_SETTINGS", "1")
    check_overrides([str(PRETRAIN)], {"my_extra_setting": 3})


def test_typo_and_text_boolean_are_refused_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    proc = bundle_run("--config_file", str(PRETRAIN), "--max_iteration", "3", "--resume", "false",
                      "--output_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    tail = last_lines(proc.stderr, 3)
    print(tail)
    assert "--max_iteration is not a setting" in tail and "--max_iterations" in tail
    assert "--resume False" in tail
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_the_cause_of_a_failed_run_is_the_last_thing_printed(tmp_path):
    missing = tmp_path / "nowhere" / "model_ema.pt"
    proc = bundle_run("--config_file", str(GLAS / "train.json"), "--pretrained_weights", str(missing),
                      "--dataset_dir", str(tmp_path / "no_data"), "--output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode != 0
    tail = last_lines(proc.stderr, 1)
    print(tail)
    assert tail.startswith("error: ")
    assert "Failed to instantiate" not in tail
    # the full traceback is still there, above it, MONAI's wrapper included
    assert "Traceback (most recent call last)" in proc.stderr
    assert "Failed to instantiate component 'monai_mdm.networks.load_pretrained'" in proc.stderr
