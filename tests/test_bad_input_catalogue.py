"""The catalogue of bad input, run as a user runs it: `python -m monai.bundle run` in a subprocess.

Each case asserts the exit status, that the last line of stderr is the project's message (naming the file or
setting and what to do), and that what an earlier run left in the output folder is byte-identical afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


@dataclass(frozen=True)
class Case:
    config: str  # bundle/configs file, or several joined by ","
    args: tuple[str, ...]
    expected: str  # in the last line of stderr; "{tmp}" is the case's folder
    status: int = 1


PRETRAIN = "mdm_pretrain/train.json"
GLAS = "mdm_glas_fewshot/train.json"
CASES = {
    "pretrain typo": Case(PRETRAIN, ("--max_iteration", "3"), "Did you mean --max_iterations? (To add", 2),
    "pretrain text boolean": Case(PRETRAIN, ("--resume", "false"), "Write --resume False", 2),
    "pretrain zero iterations": Case(PRETRAIN, ("--max_iterations", "0"), "--max_iterations must be an integer >= 1"),
    "pretrain crop size": Case(PRETRAIN, ("--image_size", "50"), "--image_size 50 is not a multiple of"),
    "pretrain no data": Case(PRETRAIN, ("--dataset_dir", "{tmp}/nothing"), "dataset_dir '{tmp}/nothing' does not exist"),
    "pretrain preset": Case(PRETRAIN, ("--preset", "huge"), "unknown MDMUNet preset 'huge'"),
    "pretrain unwritable output": Case(PRETRAIN, ("--max_iterations", "2", "--output_dir", "{tmp}/page.pt/run"),
                                       "--output_dir: cannot write to '{tmp}/page.pt/run/models'"),
    "pretrain loss not finite": Case(PRETRAIN, ("--max_iterations", "20", "--learning_rate", "1e30", "--image_size", "32"),
                                     "the training loss is nan at iteration"),
    "weights missing": Case(GLAS, ("--pretrained_weights", "{tmp}/none.pt"), "pretrained weights '{tmp}/none.pt' not found"),
    "weights web page": Case(GLAS, ("--pretrained_weights", "{tmp}/page.pt"), "'{tmp}/page.pt' is a web page"),
    "weights empty": Case(GLAS, ("--pretrained_weights", "{tmp}/empty.pt"), "'{tmp}/empty.pt' is empty"),
    "random with weights": Case(GLAS, ("--pretrained_weights", "random", "--weights", "ema"), "has nothing to pick"),
    "weights choice": Case(GLAS, ("--pretrained_weights", "random", "--weights", "emma"), "--weights must be one of"),
    "budget zero": Case(GLAS, ("--pretrained_weights", "random", "--label_budget", "0"), "--label_budget 0"),
    "budget too large": Case(GLAS, ("--pretrained_weights", "random", "--label_budget", "1000"),
                             "--label_budget 1000 is larger than the 3 labelled images"),
    "budget typo": Case(GLAS, ("--lable_budget", "2"), "Did you mean --label_budget", 2),
    "labels all background": Case(GLAS, ("--pretrained_weights", "random", "--dataset_dir", "{blank}",
                                         "--label_budget", "2"), "every pixel is background (0) in all 2 of them"),
    "glas no data": Case(GLAS, ("--pretrained_weights", "random", "--dataset_dir", "{tmp}/nothing"), "{tmp}/nothing"),
    "evaluate no model": Case("mdm_glas_fewshot/evaluate.json", ("--model_path", "{tmp}/none.pt"),
                              "trained model '{tmp}/none.pt' not found"),
    "evaluate web page": Case("mdm_glas_fewshot/evaluate.json", ("--model_path", "{tmp}/page.pt"),
                              "'{tmp}/page.pt' is a web page"),
    "monuseg no data": Case("mdm_monuseg_fewshot/train.json",
                            ("--pretrained_weights", "random", "--dataset_dir", "{tmp}/nothing"), "{tmp}/nothing"),
    "faces no data": Case("mdm_face_parts_fewshot/train.json",
                          ("--pretrained_weights", "random", "--preset", "tiny", "--blocks", "[5,6,7,8]", "--dataset_dir",
                           "{tmp}/nothing"),
                          "{tmp}/nothing"),
    "volume no data": Case("mdm_volume_fewshot/train.json",
                           ("--pretrained_weights", "random", "--dataset_dir", "{tmp}/nothing"), "{tmp}/nothing"),
}


@pytest.fixture(scope="module")
def glas_data(tmp_path_factory) -> Path:
    from monai_mdm.data import synthetic

    return synthetic.write_glas(tmp_path_factory.mktemp("data") / "GlaS", n_train=3, n_test_a=1, n_test_b=1, seed=0)


@pytest.fixture(scope="module")
def blank_glas(glas_data, tmp_path_factory) -> Path:
    """The same images with every annotation blank (all background)."""
    import shutil

    import numpy as np
    from PIL import Image

    root = Path(shutil.copytree(glas_data, tmp_path_factory.mktemp("blank") / "GlaS"))
    for anno in root.glob("*_anno.bmp"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(anno)))).save(anno)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_the_cause_last(name, tmp_path, glas_data, request):
    case = CASES[name]
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(b"an earlier run's model")
    (out / "notes.txt").write_text("earlier output\n")
    before = snapshot(out)

    configs = [str(BUNDLES / c.split("/")[0] / "configs" / c.split("/")[1]) for c in case.config.split(",")]
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    if "{blank}" in args:
        args[args.index("{blank}")] = str(request.getfixturevalue("blank_glas"))
    if "--dataset_dir" not in args:
        args += ["--dataset_dir", str(glas_data)]
    if "--output_dir" not in args:
        args += ["--output_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", ",".join(configs) if len(configs) == 1
         else str(configs), *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    print(f"{name}: exit {proc.returncode}\n  {last}")
    assert proc.returncode == case.status, proc.stderr[-3000:]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert case.expected.replace("{tmp}", str(tmp_path)) in last, proc.stderr[-3000:]
    assert "Failed to evaluate" not in last and "Failed to instantiate" not in last
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before, "an earlier output was changed"

