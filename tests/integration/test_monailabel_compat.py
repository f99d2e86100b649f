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

from helpers import BUNDLES, error_chain

FEWSHOT = ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot"]


@pytest.fixture(scope="module")
def trained_model(tiny_glas_model) -> Path:
    """The session's tiny GlaS segmenter, written by the bundle's own train.json."""
    return tiny_glas_model


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


# ------------------------------------------------------------------------------------------- the training side
# monailabel.tasks.train.bundle.BundleTrainTask (MONAI Label 0.8.5) with the monaibundle app's trainer


def save_labels(demo_data, studies: Path, names: list[str], values: dict[str, int] | None = None) -> list[dict]:
    """What the labeller's PUT /datastore/label leaves behind: the image in the studies folder and its label
    image (one class index per pixel, PNG) in labels/final/, listed by datastore.datalist() as image/label."""
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    datalist = []
    for name in names:
        image = studies / f"{name}.bmp"
        shutil.copy(demo_data["glas"] / f"{name}.bmp", image)
        classes = (np.asarray(Image.open(demo_data["glas"] / f"{name}_anno.bmp")) > 0).astype(np.uint8)
        if values and name in values:
            classes[:4, :4] = values[name]
        Image.fromarray(classes).save(final / f"{name}.png")
        datalist.append({"image": str(image), "label": str(final / f"{name}.png")})
    return datalist


def monailabel_train(root: Path, datalist: list[dict], max_epochs: int, val_split: float = 0.2, **small):
    """BundleTrainTask.__call__ on one device: the app's train.json with bundle_root pointing at the app's copy,
    its train#handlers read back (plus the CheckpointLoader of models/model.pt that "pretrained" adds), the
    datalist split by partition_dataset, and monai.bundle.run(run_id="run", init_id=None, final_id=None)."""
    from monai.data import partition_dataset

    config = root / "configs" / "train.json"
    assert config.is_file()  # BundleConstants.configs: train.json or train.yaml, else the bundle has no trainer
    parser = ConfigParser()
    parser.read_config(str(config))
    handlers = parser.get("train#handlers", [])
    model_pt = root / "models" / "model.pt"
    if model_pt.exists():  # _load_checkpoint with request "pretrained": True
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(model_pt),
                            "load_dict": {"model": "$@network"}, "strict": False})  # fmt: skip
    train, val = partition_dataset(datalist, ratios=[1 - val_split, val_split], shuffle=False)
    overrides = {"bundle_root": str(root), "train#trainer#max_epochs": max_epochs, "train#dataset#data": train,
                 "device": torch.device("cpu"), "train#handlers": handlers, "validate#dataset#data": val}  # fmt: skip
    # the settings MONAI Label cannot set, shrunk for the CPU as a hand-edited app copy would
    return run(run_id="run", init_id=None, final_id=None, meta_file=str(root / "configs" / "metadata.json"),
               config_file=str(config), **overrides, **small)  # fmt: skip


SMALL = dict(crop_size=32, crops_per_image=2, max_steps=4, epoch_length=2, warmup_epochs=0)


@pytest.fixture
def in_app(monkeypatch, tmp_path):
    """The app folder, exported to the training as `monailabel start_server` does (MONAI_LABEL_APP_DIR)."""
    app = tmp_path / "app"
    app.mkdir()
    monkeypatch.setenv("MONAI_LABEL_APP_DIR", str(app))
    return app


def test_monailabel_training_writes_the_model_its_inference_reads(demo_data, trained_model, in_app, tmp_path):
    root = install_in_app("mdm_glas_fewshot", trained_model, in_app)
    before = (root / "models" / "model.pt").stat().st_mtime_ns
    datalist = save_labels(demo_data, tmp_path / "studies", ["train_1", "train_2", "train_3"])
    monailabel_train(root, datalist, max_epochs=2, output_dir=str(tmp_path / "records"), **SMALL)

    model_pt = root / "models" / "model.pt"
    assert model_pt.stat().st_mtime_ns != before  # replaced, so BasicInferTask reloads it
    assert not (tmp_path / "records" / "models").exists()  # not the command line's place
    # the labelled images (the validation one included: it trains too), not the label budget's pick
    names = json.loads((tmp_path / "records" / "label_budget.json").read_text())["names"]
    assert sorted(names) == ["train_1", "train_2", "train_3"]
    # the UNet came from the served model: the new model holds the same frozen UNet
    old, new = torch.load(trained_model)["model"], torch.load(model_pt)["model"]
    unet = [k for k in old if k.startswith("extractor.network.")]
    assert unet and all(torch.equal(old[k], new[k]) for k in unet)
    # and the inference side loads it as before
    task = load_task(root)
    load_weights(task["network"], model_pt)


def test_monailabel_label_outside_the_classes_names_the_file(demo_data, trained_model, in_app, tmp_path):
    root = install_in_app("mdm_glas_fewshot", trained_model, in_app)
    datalist = save_labels(demo_data, tmp_path / "studies", ["train_1", "train_2"], values={"train_2": 2})
    with pytest.raises(Exception) as raised:
        monailabel_train(root, datalist, max_epochs=1, output_dir=str(tmp_path / "records"), **SMALL)
    message = error_chain(raised.value)
    assert "train_2.png" in message and "outside the 2 classes" in message
    assert torch.load(root / "models" / "model.pt")["model"].keys()  # the served model is left as it was


def test_monailabel_ignore_value_255_is_kept(demo_data, in_app, tmp_path):
    from monai_mdm.apps.monailabel import label_preprocessing

    studies = tmp_path / "studies"
    datalist = save_labels(demo_data, studies, ["train_1"], values={"train_1": 255})
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "mdm_glas_fewshot" / "configs" / "train.json"))
    pre = label_preprocessing(parser.get_parsed_content("preprocessing"), num_classes=2)
    label = pre(datalist[0])["label"]
    assert set(np.unique(np.asarray(label)).tolist()) == {0, 1, 255}
