"""End-to-end fine-tuning overlays (configs/finetune.json): UNet + head trained together, served like a frozen head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, run
from monai.data import load_net_with_metadata
from PIL import Image

from helpers import BUNDLES, error_chain
from monai_mdm.inferers import load_segmentation_model, make_sliding_window_inferer
from monai_mdm.networks import MDMUNet

GLAS = BUNDLES / "mdm_glas_fewshot" / "configs"
WINDOW = 32
BLOCKS = [3, 4, 5]  # the tiny preset has 9 decoder blocks: 6..8 and `out` never run
TINY = dict(crop_size=WINDOW, crops_per_image=2, max_epochs=1, warmup_epochs=0, blocks=BLOCKS)
FINETUNED = ["mdm_glas_fewshot", "mdm_monuseg_fewshot"]


def _configs(bundle: str) -> list[str]:
    configs = BUNDLES / bundle / "configs"
    return [str(configs / "train.json"), str(configs / "finetune.json")]


def _check_tuned(model_path: Path, pretrained: Path, deepest: int) -> dict:
    """The saved network differs from the pretrained one in every part that computes decoder blocks 0..deepest
    and equals it in the later blocks and `out`, which never ran; returns the saved state."""
    state = torch.load(model_path, weights_only=True)
    before = torch.load(pretrained, weights_only=True)
    prefix = "extractor.network."
    after = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    assert after.keys() == before.keys()
    late = tuple(f"output_blocks.{i}." for i in range(deepest + 1, 99))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("out.", *late)))
    for part in ("time_embed.", "input_blocks.", "middle_block.", *(f"output_blocks.{i}." for i in range(deepest + 1))):
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith(part)), part
    assert state["features"]["finetuned"] is True
    return state


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet") / "unet.pt"  # an untrained tiny UNet stands in for pretrained weights
    torch.manual_seed(0)
    torch.save(MDMUNet.from_preset("tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def finetuned(demo_data, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune")
    run(config_file=_configs("mdm_glas_fewshot"), dataset_dir=str(demo_data["glas"]), output_dir=str(out),
        pretrained_weights=str(pretrained), label_budget=1, **TINY)  # fmt: skip
    return out


def test_finetuning_changes_the_blocks_that_ran_only(finetuned, pretrained):
    state = _check_tuned(finetuned / "models" / "model.pt", pretrained, max(BLOCKS))
    # the frozen head's file format, marked as fine-tuned
    model = load_segmentation_model(finetuned / "models" / "model.pt")
    assert state["format"] == "monai_mdm.segmenter" and set(state["model"]) == set(model.state_dict())
    assert state["features"]["blocks"] == BLOCKS and state["features"]["timestep"] == 0  # clean input
    assert model.finetuned and not model.extractor.trainable


@pytest.mark.parametrize("bundle", FINETUNED)
def test_pretrained_part_gets_the_scaled_learning_rate(bundle, pretrained, demo_data):
    parser = ConfigParser()
    parser.read_config(_configs(bundle))
    data = demo_data["glas" if "glas" in bundle else "monuseg"]
    parser.update({"pretrained_weights": str(pretrained), "blocks": BLOCKS, "finetune_lr_scale": 0.5,
                   "dataset_dir": str(data), "label_budget": 1})  # fmt: skip
    groups = parser.get_parsed_content("train#optimizer").param_groups
    extractor, head = parser.get_parsed_content("extractor"), parser.get_parsed_content("head")
    assert [g["lr"] for g in groups] == [1e-3, 5e-4]
    assert [len(g["params"]) for g in groups] == [len(list(head.parameters())), len(extractor.trainable_parameters())]
    assert extractor.trainable and not extractor.network.training
    # fresh online crops, flipped and rotated as for the UNet baseline, not the feature cache
    assert parser.get_parsed_content("train#dataloader").dataset is parser.get_parsed_content("train#online")
    names = [type(t).__name__ for t in parser.get_parsed_content("train#online").transform.transforms]
    assert {"RandSpatialCropd", "RandFlipd", "RandRotate90d"} <= set(names)
    # early stopping keeps and restores the UNet with the head, not the head alone
    assert parser.get_parsed_content("train#handlers#0").model is parser.get_parsed_content("segmenter")


def test_finetuned_model_evaluates_and_serves_through_pyfunc(finetuned, demo_data):
    import mlflow

    from monai_mdm.handlers import save_mlflow_model

    run(config_file=[str(GLAS / "train.json"), str(GLAS / "evaluate.json")], dataset_dir=str(demo_data["glas"]), output_dir=str(finetuned),
        window_size=WINDOW, test_split="testB", run_name="finetune")  # fmt: skip
    doc = json.loads((finetuned / "evaluation" / "metrics.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["testB_1", "testB_2"] and doc["rows"][0]["run"] == "finetune"
    pyfunc = save_mlflow_model(finetuned / "models" / "model.pt", finetuned / "pyfunc", window_size=WINDOW)
    image = np.asarray(Image.open(demo_data["glas"] / "testB_1.bmp").convert("RGB"))
    (mask,) = mlflow.pyfunc.load_model(str(pyfunc)).predict(image[None])
    predicted = np.asarray(Image.open(finetuned / "evaluation" / "predictions" / "testB_1.png")) > 0
    assert np.array_equal(mask > 0, predicted)


def test_exported_finetuned_model_reproduces_it(finetuned):
    configs = BUNDLES / "mdm_glas_fewshot" / "configs"
    bundle = finetuned / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes((finetuned / "models" / "model.pt").read_bytes())
    ckpt_export(
        "network_def", filepath=str(bundle / "models" / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
        key_in_ckpt="model", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
        bundle_root=str(bundle), use_trace=True, input_shape=[1, 3, WINDOW, WINDOW],
    )  # fmt: skip
    ts_model, _, _ = load_net_with_metadata(str(bundle / "models" / "model.ts"))
    eager = load_segmentation_model(bundle / "models" / "model.pt")
    torch.manual_seed(1)
    image = torch.rand(1, 3, 45, 70) * 2 - 1
    inferer = make_sliding_window_inferer(roi_size=WINDOW, sw_batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(inferer(image, ts_model), inferer(image, eager), rtol=1e-5, atol=1e-6)


def test_weights_of_another_width_are_refused_before_training(demo_data, tmp_path):
    wide = tmp_path / "wide.pt"
    torch.save(MDMUNet.from_preset("tiny", model_channels=64).state_dict(), wide)
    with pytest.raises(Exception) as info:
        run(config_file=_configs("mdm_glas_fewshot"), dataset_dir=str(demo_data["glas"]), preset="tiny",
            output_dir=str(tmp_path / "out"), pretrained_weights=str(wide), label_budget=1, **TINY)  # fmt: skip
    text = error_chain(info.value)
    assert "wide.pt" in text and "preset 'tiny'" in text and "model_channels" in text
    assert "--pretrained_weights" in text and "--preset" in text
    assert not (tmp_path / "out" / "models").exists()


def test_face_parts_and_volume_overlays_train_end_to_end(demo_data, tmp_path):
    from helpers import write_face_parts
    from monai_mdm.data.synthetic import write_volumes

    faces = tmp_path / "faces"
    write_face_parts(faces / "train", n=2, seed=0)
    volumes = write_volumes(tmp_path / "volumes", n_train=2, n_test=1, size=(16, 16, 12), seed=0)
    for bundle, preset, data, settings in (
        ("mdm_face_parts_fewshot", "tiny", faces, dict(num_heads=2, crop_size=WINDOW)),
        # batch 1 = two steps: the zero-initialised convs of an untrained UNet pass no gradient on the first
        ("mdm_volume_fewshot", "tiny3d", volumes, dict(label_budget=1, crop_size=16, batch_size=1)),
    ):
        weights = tmp_path / f"{preset}.pt"
        torch.manual_seed(0)
        torch.save(MDMUNet.from_preset(preset).state_dict(), weights)
        out = tmp_path / bundle
        run(config_file=_configs(bundle), dataset_dir=str(data), output_dir=str(out), pretrained_weights=str(weights),
            preset=preset, crops_per_image=2, max_epochs=1, warmup_epochs=0, blocks=[2, 3], **settings)  # fmt: skip
        _check_tuned(out / "models" / "model.pt", weights, 3)
        assert load_segmentation_model(out / "models" / "model.pt").finetuned
