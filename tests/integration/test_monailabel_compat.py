"""The few-shot bundles against what MONAI Label's bundle app reads, without MONAI Label installed.

Each step below stands for one thing ``monailabel.tasks.infer.bundle.BundleInferTask`` (MONAI Label 0.8.5)
and its base ``BasicInferTask`` do with a bundle; ``scripts/monailabel_smoke.sh`` runs the real server.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, SaveImaged
from PIL import Image

from helpers import BUNDLES

FEWSHOT = ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot"]


@pytest.fixture(scope="module")
def trained_model(demo_data, tiny_pretrained, tmp_path_factory) -> Path:
    """A tiny GlaS segmenter written by the bundle's own train.json (2 pretraining steps, 2 head steps)."""
    out = tmp_path_factory.mktemp("head")
    run(config_file=str(BUNDLES / "mdm_glas_fewshot" / "configs" / "train.json"), dataset_dir=str(demo_data["glas"]),
        output_dir=str(out), pretrained_weights=str(tiny_pretrained / "model_ema.pt"), label_budget=1,
        crop_size=32, crops_per_image=2, max_steps=2, epoch_length=2, warmup_epochs=0)  # fmt: skip
    return out / "models" / "model.pt"


def install_in_app(bundle: str, model: Path, app: Path) -> Path:
    """What a labeller does (bundle docs): the configs under ``<app>/model/<name>``, the weights in its models/."""
    root = app / "model" / bundle
    shutil.copytree(BUNDLES / bundle / "configs", root / "configs")
    (root / "models").mkdir()
    shutil.copy(model, root / "models" / "model.pt")
    return root


def load_task(root: Path) -> dict:
    """BundleInferTask.__init__: config, network_def, metadata keys, labels, dimension."""
    # configs/inference.json is the config it looks for (BundleConstants.configs); without it the bundle is ignored
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(root)})  # _load_bundle_config points bundle_root at the app's copy
    # models/model.pt present -> network_def is instantiated (model.ts would be torch.jit-loaded instead)
    assert (root / "models" / "model.pt").is_file()
    network = parser.get_parsed_content("network_def", instantiate=True)
    assert isinstance(network, torch.nn.Module)
    # metadata: the first input/output names feed Restored(keys=pred, ref_image=image), while BasicInferTask
    # keeps its defaults input_key="image", output_label_key="pred": the names must be exactly these
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    key_image, image = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(meta["network_data_format"]["outputs"].items()))
    assert (key_image, key_pred) == ("image", "pred")
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    dimension = len(image["spatial_shape"]) if image.get("spatial_shape") else 3
    return {"parser": parser, "network": network, "labels": labels, "dimension": dimension, "meta": meta}


def load_weights(network: torch.nn.Module, model_path: Path) -> torch.nn.Module:
    """BasicInferTask._get_network: deepcopy of network_def, torch.load (weights only by default in torch >= 2.6),
    the "model" entry (or the whole file), load_state_dict(strict=False) as BundleInferTask passes load_strict=False."""
    checkpoint = torch.load(model_path, map_location="cpu")
    state = checkpoint.get("model", checkpoint)
    # strict=False would silently skip mismatched names, so the names must match exactly for the weights to load
    assert set(state) == set(network.state_dict())
    net = copy.deepcopy(network)
    net.load_state_dict(state, strict=False)
    return net.eval()


def transforms_of(parser: ConfigParser, key: str, drop: tuple = ()) -> list:
    """pre_transforms / post_transforms: the Compose's list, less the filtered classes."""
    c = parser.get_parsed_content(key, instantiate=True)
    items = list(c.transforms) if isinstance(c, Compose) else c
    return [t for t in items if not isinstance(t, drop)]


def restore_and_write(data: dict, out: Path) -> Path:
    """Restored(keys="pred", ref_image="image") then Writer/write_itk, as BasicInferTask ends every request."""
    import itk

    pred = data["pred"]
    current = tuple(pred.shape[1:])  # Restored assumes a channel first
    spatial = tuple(int(s) for s in data["image"].meta["spatial_shape"])[-len(current):]
    # a mismatch here makes Restored resize the mask (nearest) to the image's recorded shape: a distorted mask
    assert current == spatial, f"Restored would resize {tuple(pred.shape)} to {spatial}"
    array = pred.array if isinstance(pred, MetaTensor) else np.asarray(pred)
    # write_itk: a 2-D result goes without affine, transposed, to a file with the image's own extension
    assert array.ndim == 2, "a 2-D image needs a 2-D label (no channel) for write_itk"
    itk.imwrite(itk.image_from_array(array.transpose().copy()), str(out), False)
    return out


@pytest.mark.parametrize("bundle", FEWSHOT)
def test_bundle_parts_that_monailabel_reads(bundle, trained_model, tmp_path):
    task = load_task(install_in_app(bundle, trained_model, tmp_path / "app"))
    assert task["dimension"] == 2 and "background" not in task["labels"] and task["labels"]
    # post_filter=[SaveImaged]: the bundle's own saver goes; what is left must not write files anyway
    post = transforms_of(task["parser"], "postprocessing", drop=(SaveImaged,))
    assert post and not any(isinstance(t, SaveImaged) for t in post)
    pre = transforms_of(task["parser"], "preprocessing")
    assert isinstance(pre[0], LoadImaged)  # replaced by LoadImageTensord(load_image_d=...) around it
    inferer = task["parser"].get_parsed_content("inferer", instantiate=True)
    assert callable(inferer)


def test_monailabel_request_returns_a_mask_of_the_image(demo_data, trained_model, tmp_path):
    root = install_in_app("mdm_glas_fewshot", trained_model, tmp_path / "app")
    task = load_task(root)
    task["parser"].config.update({"window_size": 32})  # CPU-sized windows; as --conf would leave it at 64
    network = load_weights(task["network"], root / "models" / "model.pt")
    # a small non-square crop of a test image (a square one would hide swapped axes)
    image_path = tmp_path / "new_image.bmp"
    Image.open(demo_data["glas"] / "testA_1.bmp").crop((0, 0, 56, 40)).save(image_path)
    width, height = Image.open(image_path).size

    pre = transforms_of(task["parser"], "preprocessing")
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False  # BundleInferTask.pre_transforms sets this on every LoadImaged
    data = {"image": str(image_path), "image_path": str(image_path)}
    for t in pre:  # run_transforms(..., use_compose=False): one by one
        data = t(data)
    # run_inferer: add the batch dimension, inferer(inputs, network), drop it again
    inferer = task["parser"].get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    for t in transforms_of(task["parser"], "postprocessing", drop=(SaveImaged,)):
        data = t(data)
    mask = np.asarray(Image.open(restore_and_write(data, tmp_path / "result.bmp")))

    assert mask.shape == (height, width)
    assert set(np.unique(mask)) <= {0, *task["labels"].values()}
    # the same pixels as segmenting the row-major image directly: no transposition or flip on the way
    image = np.asarray(Image.open(image_path).convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    with torch.no_grad():
        direct = inferer(torch.from_numpy(image)[None], network).argmax(1)[0].numpy()
    np.testing.assert_array_equal(mask, direct)
