"""Few-shot bundles end to end on tiny synthetic data: head training, baseline, evaluation, inference."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from PIL import Image

from helpers import BUNDLES, error_chain

PRETRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
# small enough for CPU: 32 px crops and windows, a couple of crops and epochs
HEAD = dict(crop_size=32, crops_per_image=2, max_steps=8, epoch_length=4, warmup_epochs=0)


@pytest.fixture(scope="module")
def pretrained(tiny_pretrained) -> Path:
    return tiny_pretrained / "model_ema.pt"


@pytest.fixture(scope="module")
def mdm_run(demo_data, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mdm")
    run(
        config_file=str(GLAS / "train.json"),
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(out),
        pretrained_weights=str(pretrained),
        label_budget=0.2,
        **HEAD,
    )
    return out


def test_head_training_saves_segmenter_and_budget(mdm_run, demo_data, pretrained):
    from monai_mdm.inferers import MDMSegmenter, load_segmentation_model

    model = load_segmentation_model(mdm_run / "models" / "model.pt")
    assert isinstance(model, MDMSegmenter)
    assert model.class_names == ["background", "gland"]
    assert list(model.extractor.blocks) == list(range(9))  # all decoder blocks of the tiny preset
    budget = json.loads((mdm_run / "label_budget.json").read_text())
    # 12 synthetic training images, 20% -> 2, recorded by name
    assert budget["count"] == 2 and len(budget["names"]) == 2 and budget["seed"] == 0
    from monai_mdm.transforms import PatchMasking

    assert isinstance(model.extractor.corruption, PatchMasking)
    assert all(re.fullmatch(r"train_\d+", n) for n in budget["names"])
    state = torch.load(mdm_run / "models" / "model.pt", weights_only=True)
    # MONAI Label and bundles load network_def weights from the "model" key
    assert set(state["model"]) == set(model.state_dict())
    # a 2-iteration pretraining leaves 1.8 % of the initialisation in the EMA: auto took model.pt beside it
    assert state["pretraining"]["weights"] == "raw" and state["pretraining"]["requested"] == "auto"
    assert Path(state["pretraining"]["source"]) == pretrained.parent / "model.pt"
    assert model.pretraining == state["pretraining"]


def test_evaluation_writes_tables_predictions_and_overlays(mdm_run, demo_data):
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "evaluate.json")],
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(mdm_run),
        window_size=32,
        save_nifti=True,
    )
    ev = mdm_run / "evaluation"
    doc = json.loads((ev / "metrics.json").read_text())
    names = sorted(r["name"] for r in doc["rows"])
    assert names == ["testA_1", "testA_2", "testA_3", "testA_4", "testB_1", "testB_2"]
    for row in doc["rows"]:
        assert 0.0 <= row["paper_dice"] <= 1.0 and 0.0 <= row["object_dice"] <= 1.0
        assert row["paper_iou"] == pytest.approx(row["paper_dice"] / (2 - row["paper_dice"]))
    header = (ev / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[:2] == ["name", "run"] and "object_hausdorff" in header
    for name in names:
        image = Image.open(demo_data["glas"] / f"{name}.bmp")
        pred = Image.open(ev / "predictions" / f"{name}.png")
        assert pred.size == image.size  # full-size prediction from sliding windows
        overlay = Image.open(ev / "overlays" / f"{name}.png")
        assert overlay.size[1] == image.size[1]
        assert (ev / "predictions" / f"{name}.nii.gz").is_file()


def test_recompute_mode_and_ddpm_features_train(demo_data, pretrained, tmp_path):
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "online_features.json")],
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(tmp_path),
        pretrained_weights=str(pretrained),
        label_budget=["train_1"],
        corruption="ddpm",
        **HEAD,
    )
    from monai_mdm.inferers import load_segmentation_model
    from monai_mdm.transforms import GaussianNoise

    # the DDPM baseline's features: Gaussian noise at t with one shared noise sample instead of masking
    corruption = load_segmentation_model(tmp_path / "models" / "model.pt").extractor.corruption
    assert isinstance(corruption, GaussianNoise) and corruption.shared_noise


def test_unet_baseline_trains_and_evaluates(demo_data, tmp_path):
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "train_unet.json")],
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(tmp_path),
        label_budget=0.2,
        **HEAD,
    )
    from monai.networks.nets import BasicUNet

    from monai_mdm.inferers import load_segmentation_model

    assert isinstance(load_segmentation_model(tmp_path / "models" / "model.pt"), BasicUNet)
    run(
        config_file=[str(GLAS / "train.json"), str(GLAS / "evaluate.json")],
        dataset_dir=str(demo_data["glas"]),
        output_dir=str(tmp_path),
        window_size=32,
        run_name="unet",
        test_split="testB",
    )
    doc = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["testB_1", "testB_2"] and doc["rows"][0]["run"] == "unet"


def test_inference_bundle_segments_a_folder(mdm_run, demo_data, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes((mdm_run / "models" / "model.pt").read_bytes())
    images = tmp_path / "images"
    images.mkdir()
    for name in ("testA_1", "testB_2"):
        (images / f"{name}.bmp").write_bytes((demo_data["glas"] / f"{name}.bmp").read_bytes())
    run(
        config_file=str(GLAS / "inference.json"),
        bundle_root=str(bundle),
        dataset_dir=str(images),
        window_size=32,
    )
    outputs = sorted((bundle / "eval").glob("*.png"))
    assert [p.name for p in outputs] == ["testA_1_seg.png", "testB_2_seg.png"]
    for out in outputs:
        source = Image.open(images / out.name.replace("_seg.png", ".bmp"))
        mask = np.asarray(Image.open(out))
        assert mask.shape == (source.size[1], source.size[0])  # (H, W): same orientation as the image
        assert set(np.unique(mask)) <= {0, 255}


def test_label_budget_larger_than_set_is_refused(demo_data, pretrained, tmp_path):
    with pytest.raises(Exception) as info:
        run(
            config_file=str(GLAS / "train.json"),
            dataset_dir=str(demo_data["glas"]),
            output_dir=str(tmp_path),
            pretrained_weights=str(pretrained),
            label_budget=500,
            **HEAD,
        )
    assert re.search(r"500.*12|larger", error_chain(info.value))


def test_missing_pretrained_weights_say_what_to_run(demo_data, tmp_path):
    with pytest.raises(Exception) as info:
        run(
            config_file=str(GLAS / "train.json"),
            dataset_dir=str(demo_data["glas"]),
            output_dir=str(tmp_path),
            pretrained_weights=str(tmp_path / "nope.pt"),
            **HEAD,
        )
    text = error_chain(info.value)
    assert "nope.pt" in text and "mdm_pretrain" in text


def test_random_control_trains_a_head_on_an_untrained_unet(demo_data, tmp_path):
    from monai_mdm.inferers import load_segmentation_model
    from monai_mdm.networks import MDMUNet

    run(config_file=str(GLAS / "train.json"), dataset_dir=str(demo_data["glas"]), output_dir=str(tmp_path),
        pretrained_weights="random", seed=3, label_budget=0.2, **HEAD)  # fmt: skip
    model = load_segmentation_model(tmp_path / "models" / "model.pt")
    assert model.pretraining["source"] == "random" and model.pretraining["weights"] == "random"
    torch.manual_seed(3)
    reference = MDMUNet.from_preset("tiny").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.extractor.network.state_dict().items())


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(pretrained_weights="random", weights="ema"), r"--pretrained_weights random .*leave --weights at auto"),
        (dict(weights="latest"), r"--weights must be one of auto, ema, raw"),
        (dict(weights="ema"), r"--weights ema: .*holds no ema weights.*Use --weights auto or raw"),
    ],
)
def test_bad_weights_settings_are_refused_with_the_fix(demo_data, pretrained, tmp_path, settings, match):
    flat = tmp_path / "weights.pt"  # one set of weights that does not say it is an EMA
    torch.save(torch.load(pretrained.parent / "model.pt", weights_only=True)["model"], flat)
    settings = {"pretrained_weights": str(flat), **settings}
    with pytest.raises(Exception) as info:
        run(config_file=str(GLAS / "train.json"), dataset_dir=str(demo_data["glas"]), output_dir=str(tmp_path / "out"),
            **settings, **HEAD)  # fmt: skip
    assert re.search(match, error_chain(info.value), re.S)
    assert not (tmp_path / "out" / "models").exists()


@pytest.mark.parametrize("bundle", ["mdm_glas_fewshot", "mdm_monuseg_fewshot", "mdm_face_parts_fewshot", "mdm_volume_fewshot"])  # fmt: skip
def test_logged_settings_name_the_weights_used(bundle):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser.update({"device": "$torch.device('cpu')", "pretrained_weights": "random"})
    if parser["preset"] is None:  # face parts reads the settings from its converted file; random needs a preset
        parser["preset"] = "tiny"
    (log,) = [h for h in parser["train"]["handlers"] if h.get("_target_", "").endswith("LogSettings")]
    assert log["settings"]["weights"] == "@weights" and log["settings"]["weights_used"] == "@weights_used"
    assert parser.get_parsed_content("weights") == "auto" and parser.get_parsed_content("weights_used") == "random"


MONUSEG = BUNDLES / "mdm_monuseg_fewshot" / "configs"


@pytest.fixture(scope="module")
def monuseg_run(demo_data, pretrained, tmp_path_factory) -> Path:
    """A tiny MoNuSeg head trained on the nucleus boundary target (one labelled tile)."""
    out = tmp_path_factory.mktemp("monuseg")
    run(config_file=str(MONUSEG / "train.json"), dataset_dir=str(demo_data["monuseg"]), output_dir=str(out),
        pretrained_weights=str(pretrained), label_budget=1, batch_size=2, **HEAD)  # fmt: skip
    return out


def _monuseg_evaluation(demo_data, out: Path, **settings) -> dict:
    run(config_file=[str(MONUSEG / "train.json"), str(MONUSEG / "evaluate.json")], dataset_dir=str(demo_data["monuseg"]),
        output_dir=str(out), window_size=32, **settings)  # fmt: skip
    return json.loads((out / "evaluation" / "metrics.json").read_text())


def test_monuseg_bundle_trains_and_reports_instance_metrics(monuseg_run, demo_data):
    import tifffile

    from monai_mdm.data import geojson_to_instances
    from monai_mdm.inferers import load_segmentation_model

    assert load_segmentation_model(monuseg_run / "models" / "model.pt").class_names == [
        "background", "nucleus", "nucleus boundary"]  # fmt: skip
    doc = _monuseg_evaluation(demo_data, monuseg_run)
    assert len(doc["rows"]) == 2 and doc["extra"]["instances"] == "watershed"
    assert set(doc["rows"][0]) >= {"paper_dice", "paper_aji_binary", "aji", "pq", "dq", "sq"}
    assert "aji" in (monuseg_run / "evaluation" / "metrics.csv").read_text().splitlines()[0].split(",")
    folder = monuseg_run / "evaluation" / "instances"
    for row in doc["rows"]:
        labels = tifffile.imread(folder / f"{row['name']}.tif")
        assert labels.dtype == np.uint16 and labels.shape == (250, 250)
        polygons = json.loads((folder / f"{row['name']}.geojson").read_text())
        assert polygons["type"] == "FeatureCollection" and len(polygons["features"]) == int(labels.max())
        np.testing.assert_array_equal(geojson_to_instances(polygons, labels.shape), labels)
    # connected components of the same predictions: same semantic metrics, other instances
    cc = _monuseg_evaluation(demo_data, monuseg_run, instances="connected_components")
    assert cc["extra"]["instances"] == "connected_components"
    for a, b in zip(doc["rows"], cc["rows"]):
        assert a["paper_dice"] == b["paper_dice"] and a["paper_aji_binary"] == b["paper_aji_binary"]


def test_monuseg_inference_writes_masks_label_tiffs_and_geojson(monuseg_run, demo_data, tmp_path):
    import tifffile

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes((monuseg_run / "models" / "model.pt").read_bytes())
    (tile,) = sorted((demo_data["monuseg"] / "MoNuSegTestData").glob("*.tif"))[:1]
    images = tmp_path / "images"
    images.mkdir()
    (images / tile.name).write_bytes(tile.read_bytes())
    run(config_file=str(MONUSEG / "inference.json"), bundle_root=str(bundle), dataset_dir=str(images), window_size=32)
    out = bundle / "eval"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{tile.stem}{suffix}" for suffix in ("_seg.png", "_nuclei.tif", "_nuclei.geojson"))  # fmt: skip
    mask = np.asarray(Image.open(out / f"{tile.stem}_seg.png"))
    assert set(np.unique(mask)) <= {0, 255}  # nucleus = interior and boundary
    labels = tifffile.imread(out / f"{tile.stem}_nuclei.tif")
    assert labels.shape == mask.shape
    np.testing.assert_array_equal(labels > 0, mask > 0)
    assert len(json.loads((out / f"{tile.stem}_nuclei.geojson").read_text())["features"]) == int(labels.max())


@pytest.mark.parametrize("config", ["evaluate.json", "inference.json"])
def test_unknown_instance_method_is_refused_naming_the_setting(monuseg_run, demo_data, tmp_path, config):
    with pytest.raises(Exception) as info:
        if config == "evaluate.json":
            _monuseg_evaluation(demo_data, monuseg_run, instances="stardist")
        else:
            run(config_file=str(MONUSEG / "inference.json"), bundle_root=str(monuseg_run), dataset_dir=str(tmp_path),
                instances="stardist")  # fmt: skip
    assert "--instances must be one of watershed, connected_components, got 'stardist'" in error_chain(info.value)


def test_watershed_on_a_two_class_model_says_what_to_do(monuseg_run, demo_data, tmp_path):
    two_class = tmp_path / "two_class"
    run(config_file=str(MONUSEG / "train.json"), dataset_dir=str(demo_data["monuseg"]), output_dir=str(two_class),
        pretrained_weights="random", label_budget=1, batch_size=2, class_names=["background", "nucleus"],
        **{"preprocessing#transforms#5": "$monai.transforms.Identityd('label')"}, **HEAD)  # fmt: skip
    with pytest.raises(Exception) as info:
        _monuseg_evaluation(demo_data, two_class)
    assert re.search(r"--instances watershed needs a model trained on the nucleus boundary target.*predicts 2.*"
                     r"--instances connected_components", error_chain(info.value), re.S)  # fmt: skip
    doc = _monuseg_evaluation(demo_data, two_class, instances="connected_components")
    assert len(doc["rows"]) == 2


def test_cache_dir_keeps_the_features_on_disk_and_trains_the_same_head(mdm_run, demo_data, pretrained, tmp_path):
    """``--cache_dir``: the cached features live in a temporary file there (gone after the run), same training."""
    cache = tmp_path / "cache"
    cache.mkdir()
    out = tmp_path / "disk"
    run(config_file=str(GLAS / "train.json"), dataset_dir=str(demo_data["glas"]), output_dir=str(out),
        pretrained_weights=str(pretrained), label_budget=0.2, cache_dir=str(cache), **HEAD)  # fmt: skip
    disk = torch.load(out / "models" / "model.pt", weights_only=True)["head_state"]
    memory = torch.load(mdm_run / "models" / "model.pt", weights_only=True)["head_state"]
    assert set(disk) == set(memory) and all(torch.equal(disk[k], memory[k]) for k in memory)
    gc.collect()  # the run's objects are garbage once run() returns; a command-line run removes it at exit
    assert not list(cache.iterdir())  # the cache file is removed with the cache
