"""Few-shot bundles end to end on tiny synthetic data: head training, baseline, evaluation, inference."""

from __future__ import annotations

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
    torch.save(torch.load(pretrained.parent / "model.pt", weights_only=True)["state_dict"], flat)
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


def test_monuseg_bundle_trains_and_reports_instance_metrics(demo_data, pretrained, tmp_path):
    configs = BUNDLES / "mdm_monuseg_fewshot" / "configs"
    run(
        config_file=str(configs / "train.json"),
        dataset_dir=str(demo_data["monuseg"]),
        output_dir=str(tmp_path),
        pretrained_weights=str(pretrained),
        label_budget=1,
        batch_size=2,
        **HEAD,
    )
    run(
        config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
        dataset_dir=str(demo_data["monuseg"]),
        output_dir=str(tmp_path),
        window_size=32,
    )
    doc = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert len(doc["rows"]) == 2
    assert set(doc["rows"][0]) >= {"paper_dice", "paper_aji_binary", "aji", "pq", "dq", "sq"}


def test_monuseg_inference_bundle_reads_tif_tiles(demo_data, pretrained, tmp_path):
    configs = BUNDLES / "mdm_monuseg_fewshot" / "configs"
    bundle = tmp_path / "bundle"
    run(config_file=str(configs / "train.json"), dataset_dir=str(demo_data["monuseg"]),
        output_dir=str(bundle), pretrained_weights=str(pretrained), label_budget=1, batch_size=2, **HEAD)  # fmt: skip
    tiles = sorted((demo_data["monuseg"] / "MoNuSegTestData").glob("*.tif"))
    run(config_file=str(configs / "inference.json"), bundle_root=str(bundle),
        dataset_dir=str(demo_data["monuseg"] / "MoNuSegTestData"), window_size=32)  # fmt: skip
    outputs = sorted((bundle / "eval").glob("*_seg.png"))
    assert [p.name for p in outputs] == [f"{t.stem}_seg.png" for t in tiles]
    for tile, out in zip(tiles, outputs):
        assert Image.open(out).size == Image.open(tile).size


@pytest.mark.parametrize(
    "bundle, head_id",
    [
        ("mdm_glas_fewshot", "train#trainer#network"),
        ("mdm_monuseg_fewshot", "train#trainer#network"),
        ("mdm_face_parts_fewshot", "train#trainer#network"),
        ("mdm_volume_fewshot", "train#trainer#network"),
    ],
)
def test_trained_head_is_put_on_the_training_device(bundle, head_id, pretrained, tmp_path):
    """SupervisedTrainer does not move the network; the config must, or a GPU run mixes devices."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    # "meta" stands in for a GPU: only the device the parameters end up on matters here
    parser.update({"device": "$torch.device('meta')", "preset": "tiny", "pretrained_weights": str(pretrained)})
    parser["blocks"] = [3, 4, 5]  # decoder blocks both tiny networks have
    if bundle == "mdm_volume_fewshot":
        parser["network"] = "$monai_mdm.networks.MDMUNet.from_preset('tiny3d', spatial_dims=3, in_channels=1).to(@device)"
    head = parser.get_parsed_content(head_id)
    assert {p.device.type for p in head.parameters()} == {"meta"}


@pytest.mark.parametrize("overlays, built", [([], "FeatureCache"), (["online_features.json"], "Dataset")])
def test_only_the_chosen_training_set_is_built(overlays, built, demo_data, pretrained):
    """With the online-features overlay no feature cache is computed (it would cost a UNet pass per crop)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(GLAS / name) for name in ["train.json", *overlays]])
    parser.update({"dataset_dir": str(demo_data["glas"]), "pretrained_weights": str(pretrained)})
    parser.update(HEAD)
    assert type(parser.get_parsed_content("train#dataloader#dataset")).__name__ == built
    other = "train#cached" if overlays else "train#online"
    assert other not in parser.ref_resolver.resolved_content
