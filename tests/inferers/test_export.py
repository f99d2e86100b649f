"""TorchScript export of trained segmenters (`python -m monai.bundle ckpt_export`) and `verify_net_in_out` for
every bundle, on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, run, verify_net_in_out
from monai.data import load_net_with_metadata
from PIL import Image

from helpers import BUNDLES, REPO, error_chain
from monai_mdm.inferers import MDMSegmenter, load_segmentation_model, make_sliding_window_inferer
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble
from monai_mdm.transforms import GaussianNoise

GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
WINDOW = 32
FEWSHOT = ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot"]


def _configs(bundle: str) -> tuple[str, str]:
    configs = BUNDLES / bundle / "configs"
    return str(configs / "metadata.json"), str(configs / "inference.json")


@pytest.fixture(scope="module")
def trained_bundle(demo_data, tmp_path_factory) -> Path:
    """A GlaS bundle folder holding a head trained by train.json (tiniest settings) in models/model.pt."""
    root = tmp_path_factory.mktemp("export")
    weights = root / "unet.pt"  # an untrained tiny UNet stands in for pretrained weights: export does not care
    torch.manual_seed(0)
    torch.save(MDMUNet.from_preset("tiny").state_dict(), weights)
    run_dir = root / "run"
    run(
        config_file=str(GLAS / "train.json"),
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(run_dir),
        pretrained_weights=str(weights),
        label_budget=1,
        crop_size=WINDOW,
        crops_per_image=1,
        max_epochs=1,
        warmup_epochs=0,
    )
    bundle = root / "bundle"
    (bundle / "models").mkdir(parents=True)
    shutil.copy(run_dir / "models" / "model.pt", bundle / "models" / "model.pt")
    return bundle


def test_ckpt_export_matches_eager_segmenter(trained_bundle):
    meta_file, config_file = _configs("mdm_glas_fewshot")
    ts_path = trained_bundle / "models" / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(ts_path), "--ckpt_file", str(trained_bundle / "models" / "model.pt"),
        "--key_in_ckpt", "model", "--meta_file", meta_file, "--config_file", config_file,
        "--bundle_root", str(trained_bundle), "--use_trace", "True", "--input_shape", f"[1, 3, {WINDOW}, {WINDOW}]",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ts_model, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("inference.json",))
    eager = load_segmentation_model(trained_bundle / "models" / "model.pt")
    # MONAI embeds the metadata and the config in the TorchScript file
    assert meta["name"] == json.loads(Path(meta_file).read_text())["name"]
    assert json.loads(extra["inference.json"]) == json.loads(Path(config_file).read_text())

    torch.manual_seed(1)
    windows = torch.rand(3, 3, WINDOW, WINDOW) * 2 - 1  # another batch size than the traced one
    image = torch.rand(1, 3, 45, 70) * 2 - 1
    inferer = make_sliding_window_inferer(roi_size=WINDOW, sw_batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(ts_model(windows), eager(windows), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(inferer(image, ts_model), inferer(image, eager), rtol=1e-5, atol=1e-6)
        # the seeded feature mask is stored for the traced size: other sizes are refused, not silently wrong
        with pytest.raises(Exception, match=rf"traced for images of spatial size \[{WINDOW}, {WINDOW}\]"):
            ts_model(torch.zeros(1, 3, WINDOW + 8, WINDOW))


def test_tracing_refuses_features_it_cannot_reproduce():
    torch.manual_seed(0)
    net = MDMUNet.from_preset("tiny")
    for corruption, seed in ((GaussianNoise(shared_noise=True), 0), ("default", None)):
        extractor = MDMFeatureExtractor(net, blocks=(7, 8), corruption=corruption, seed=seed)
        model = MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2)).eval()
        with pytest.raises(RuntimeError, match="cannot trace"):
            torch.jit.trace(model, torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One bundle folder per few-shot bundle with a tiny (untrained) segmenter of its class count."""
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    net = MDMUNet.from_preset("tiny")
    folders = {}
    for bundle in FEWSHOT:
        classes = json.loads(Path(_configs(bundle)[0]).read_text())["network_data_format"]["outputs"]["pred"]
        extractor = MDMFeatureExtractor(net, blocks=(6, 7, 8))
        head = PixelHeadEnsemble(extractor.out_channels, classes["num_channels"], hidden_channels=(8,))
        folders[bundle] = root / bundle
        MDMSegmenter(extractor, head).save(folders[bundle] / "models" / "model.pt")
    return folders


@pytest.mark.parametrize("bundle", FEWSHOT)
def test_verify_net_in_out_fewshot_bundles(bundle, tiny_models):
    meta_file, config_file = _configs(bundle)
    for size in (1, WINDOW):  # "*" in the metadata: any size, padded inside the segmenter
        verify_net_in_out(
            "network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(tiny_models[bundle]),
            device="cpu", any=size,
        )  # fmt: skip


def test_verify_net_in_out_pretrain_bundle():
    configs = BUNDLES / "mdm_pretrain" / "configs"
    verify_net_in_out(
        "network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "train.json"),
        device="cpu", extra_forward_args={"timesteps": 50},
    )  # fmt: skip


def test_missing_weights_say_what_to_run_and_keep_existing_files(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "eval").mkdir()
    kept = {bundle / "models" / "model.ts": b"an earlier export", bundle / "eval" / "old_seg.png": b"a result"}
    for path, data in kept.items():
        path.write_bytes(data)
    missing = str(bundle / "models" / "model.pt")
    meta_file, config_file = _configs("mdm_glas_fewshot")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (WINDOW, WINDOW)).save(images / "slide_1.png")

    with pytest.raises(Exception) as info:
        run(config_file=config_file, bundle_root=str(bundle), dataset_dir=str(images))
    assert missing in error_chain(info.value) and "configs/train.json" in error_chain(info.value)
    with pytest.raises(Exception) as info:
        verify_net_in_out("network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(bundle))
    assert missing in error_chain(info.value) and "configs/train.json" in error_chain(info.value)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        ckpt_export(
            "network_def", filepath=str(bundle / "models" / "model.ts"), ckpt_file=missing, key_in_ckpt="model",
            meta_file=meta_file, config_file=config_file, bundle_root=str(bundle), use_trace=True,
            input_shape=[1, 3, WINDOW, WINDOW],
        )  # fmt: skip
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in bundle.rglob("*")) == ["eval", "model.ts", "models", "old_seg.png"]
