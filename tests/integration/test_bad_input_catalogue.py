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

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
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
    "pretrain typo": Case(PRETRAIN, ("--max_iteration", "3"), "Did you mean --max_iterations or --mask_ratio? (To add", 2),
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
    "evaluate no model": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/evaluate.json", ("--model_path", "{tmp}/none.pt"),
                              "trained model '{tmp}/none.pt' not found"),
    "evaluate web page": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/evaluate.json", ("--model_path", "{tmp}/page.pt"),
                              "'{tmp}/page.pt' is a web page"),
    "monuseg no data": Case("mdm_monuseg_fewshot/train.json",
                            ("--pretrained_weights", "random", "--dataset_dir", "{tmp}/nothing"), "{tmp}/nothing"),
    "faces no data": Case("mdm_face_parts_fewshot/train.json",
                          ("--pretrained_weights", "random", "--preset", "tiny", "--blocks", "[5,6,7,8]", "--dataset_dir",
                           "{tmp}/nothing"),
                          "{tmp}/nothing"),
    "volume no data": Case("mdm_volume_fewshot/train.json",
                           ("--pretrained_weights", "random", "--dataset_dir", "{tmp}/nothing"), "{tmp}/nothing"),
    "monuseg evaluate instances": Case("mdm_monuseg_fewshot/train.json,mdm_monuseg_fewshot/evaluate.json",
                                       ("--instances", "watershedd"),
                                       "--instances must be one of watershed, connected_components, got 'watershedd'"),
    "monuseg inference instances": Case("mdm_monuseg_fewshot/inference.json", ("--instances", "stardist"),
                                        "--instances must be one of watershed, connected_components, got 'stardist'"),
    # every bundle refuses typos and text booleans before anything runs
    "monuseg typo": Case("mdm_monuseg_fewshot/train.json", ("--label_budjet", "2"), "Did you mean --label_budget", 2),
    "faces text boolean": Case("mdm_face_parts_fewshot/train.json", ("--augment", "true"), "Write --augment True", 2),
    "volume typo": Case("mdm_volume_fewshot/train.json", ("--max_step", "5"), "Did you mean --max_steps", 2),
    "glas text boolean": Case(GLAS, ("--cache_fp16", "false"), "Write --cache_fp16 False", 2),
    "evaluate typo": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/evaluate.json", ("--window_sise", "64"), "Did you mean --window_size", 2),
    "inference typo": Case("mdm_glas_fewshot/inference.json", ("--model_pth", "x.pt"), "Did you mean --model_path", 2),
    "finetune overlay typo": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/finetune.json",
                                  ("--finetune_lr_scal", "1.0"), "Did you mean --finetune_lr_scale", 2),
    "unet overlay typo": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/train_unet.json",
                              ("--unet_batch", "2"), "Did you mean --unet_batch_size", 2),
    # settings out of range, named with their bound
    "budget fraction above one": Case(GLAS, ("--pretrained_weights", "random", "--label_budget", "1.5"),
                                      "--label_budget 1.5: a fraction must be in (0, 1]"),
    "budget unknown name": Case(GLAS, ("--pretrained_weights", "random", "--label_budget", "['train_1','trian_2']"),
                                "--label_budget names an unknown image 'trian_2'"),
    "head steps zero": Case(GLAS, ("--pretrained_weights", "random", "--max_steps", "0"),
                            "--max_steps must be an integer >= 1"),
    "head epoch length zero": Case(GLAS, ("--pretrained_weights", "random", "--epoch_length", "0"),
                                   "--epoch_length must be an integer >= 1"),
    "holdout too large": Case(GLAS, ("--pretrained_weights", "random", "--holdout_fraction", "0.9"),
                              "--holdout_fraction must lie in [0, 0.5]"),
    # damaged weight files in every place that reads one
    "weights lfs pointer": Case(GLAS, ("--pretrained_weights", "{tmp}/lfs.pt"), "'{tmp}/lfs.pt' is a Git LFS pointer"),
    "weights truncated": Case(GLAS, ("--pretrained_weights", "{tmp}/truncated.pt"),
                              "'{tmp}/truncated.pt' is truncated or damaged"),
    "evaluate empty model": Case("mdm_glas_fewshot/train.json,mdm_glas_fewshot/evaluate.json", ("--model_path", "{tmp}/empty.pt"),
                                 "trained model '{tmp}/empty.pt' is empty"),
    "volume weights web page": Case("mdm_volume_fewshot/train.json", ("--pretrained_weights", "{tmp}/page.pt"),
                                    "'{tmp}/page.pt' is a web page"),
    "faces weights missing": Case("mdm_face_parts_fewshot/train.json", ("--pretrained_weights", "{tmp}/none.pt"),
                                  "pretrained weights '{tmp}/none.pt' not found"),
    # pretraining objectives: unknown names and ratios refused before training; checkpoints whose objective the
    # few-shot bundle cannot read features for
    "pretrain objective unknown": Case(PRETRAIN, ("--objective", "simmim"),
                                       "--objective 'simmim' is not known; choose one of mdm, mae, umd, diffmae, ddpm"),
    "pretrain mask ratio": Case(PRETRAIN, ("--objective", "mae", "--mask_ratio", "1.5"),
                                "--mask_ratio must lie in (0, 1)"),
    "weights unknown objective": Case(GLAS, ("--pretrained_weights", "{tmp}/simmim.pt"),
                                      "was pretrained with objective 'simmim', which this version cannot read"),
    # pretraining data that cannot be used
    "pretrain only label folders": Case(PRETRAIN, ("--dataset_dir", "{tmp}/labels_only"), "holds only label images"),
    "pretrain truncated image": Case(PRETRAIN, ("--dataset_dir", "{tmp}/broken_images"), "cannot read image"),
}


@pytest.fixture(scope="module")
def glas_data(tmp_path_factory) -> Path:
    from monai_mdm.data import synthetic

    return synthetic.write_glas(tmp_path_factory.mktemp("data") / "GlaS", n_train=3, n_test_a=1, n_test_b=1, seed=0)


@pytest.fixture(scope="module")
def blank_glas(glas_data, tmp_path_factory) -> Path:
    """The same images with every annotation blank (all background)."""
    import shutil

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
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "labels_only" / "labelcol").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "labels_only" / "labelcol" / "a_anno.png")
    (tmp_path / "broken_images").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "broken_images" / "a.png")
    png = (tmp_path / "broken_images" / "a.png").read_bytes()
    (tmp_path / "broken_images" / "b.png").write_bytes(png[: len(png) // 2])
    for file, objective in (("simmim.pt", {"name": "simmim"}),):  # the unit tests cover the other records
        if file in " ".join(case.args):
            from monai_mdm.networks import MDMUNet

            unet = MDMUNet.from_preset("tiny")
            torch.save({"state_dict": unet.state_dict(), "network_config": unet.to_guided_diffusion_config(),
                        "pretraining": {"iteration": 2, "weights": "ema", "objective": objective}}, tmp_path / file)
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

