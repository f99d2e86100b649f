"""Every model the project saves has one layout: format, version, network_config, model (weights), metadata."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from monai_mdm.convert import convert_checkpoint
from monai_mdm.inferers import MDMSegmenter, load_segmentation_model, save_segmentation_model
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble, load_pretrained
from monai_mdm.networks.interchange import MODEL_FILE_VERSION, model_file
from monai_mdm.utils import atomic_torch_save

LAYOUT = {"format", "version", "network_config", "model"}


def _baseline() -> tuple[BasicUNet, dict]:
    config = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "features": (4, 4, 8, 8, 16, 4)}
    return BasicUNet(**config), config


def _segmenter() -> MDMSegmenter:
    unet = MDMUNet.from_preset("tiny")
    extractor = MDMFeatureExtractor(unet, blocks=[2, 3])
    return MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2, 1, [8]), ["background", "gland"])


def test_the_pretrained_unet_the_converter_output_the_segmenter_and_the_baseline_share_the_layout(
    tiny_pretrained, tmp_path
):
    files = {"pretrained": tiny_pretrained / "model_ema.pt"}
    unet = torch.load(files["pretrained"], weights_only=True)
    converted = tmp_path / "converted.pt"
    convert_checkpoint(files["pretrained"], converted, log=lambda s: None)
    save_segmentation_model(_segmenter(), tmp_path / "segmenter.pt")
    network, config = _baseline()
    save_segmentation_model(network, tmp_path / "baseline.pt", config)
    formats = {}
    for name, path in {**files, "converted": converted, "segmenter": tmp_path / "segmenter.pt",
                       "baseline": tmp_path / "baseline.pt"}.items():  # fmt: skip
        state = torch.load(path, weights_only=True)
        assert LAYOUT <= set(state), name
        assert state["version"] == MODEL_FILE_VERSION
        formats[name] = state["format"]
    assert formats == {"pretrained": "monai_mdm.unet", "converted": "monai_mdm.unet",
                       "segmenter": "monai_mdm.segmenter", "baseline": "monai_mdm.baseline"}  # fmt: skip
    assert unet["pretraining"]["weights"] == "ema"  # the record is metadata beside the four entries
    baseline = torch.load(tmp_path / "baseline.pt", weights_only=True)
    assert baseline["network_config"]["_target_"] == "monai.networks.nets.basic_unet.BasicUNet"
    # each reads back into its network
    assert isinstance(load_pretrained(converted, None), MDMUNet)
    assert isinstance(load_segmentation_model(tmp_path / "segmenter.pt"), MDMSegmenter)
    rebuilt = load_segmentation_model(tmp_path / "baseline.pt")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), network.state_dict().values()))


def test_a_file_of_a_newer_version_is_refused_naming_the_file(tiny_pretrained, tmp_path):
    newer = torch.load(tiny_pretrained / "model_ema.pt", weights_only=True)
    newer["version"] = MODEL_FILE_VERSION + 1
    atomic_torch_save(newer, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=r"newer\.pt.*newer monai_mdm \(model-file version 2"):
        load_pretrained(tmp_path / "newer.pt", None)
    segmenter = _segmenter().to_state()
    segmenter["version"] = MODEL_FILE_VERSION + 1
    atomic_torch_save(segmenter, tmp_path / "segmenter.pt")
    with pytest.raises(ValueError, match=r"segmenter\.pt.*newer monai_mdm"):
        load_segmentation_model(tmp_path / "segmenter.pt")


def test_a_pretrained_unet_given_as_a_segmentation_model_is_refused_with_the_setting_to_use(tiny_pretrained):
    with pytest.raises(ValueError, match="pretrained UNet: point --pretrained_weights at it"):
        load_segmentation_model(tiny_pretrained / "model.pt")


def test_baseline_files_of_the_first_layout_still_load(tmp_path):
    network, config = _baseline()
    old = {"format": "monai_mdm.baseline", "target": "monai.networks.nets.BasicUNet", "config": config,
           "model": network.state_dict()}  # fmt: skip
    atomic_torch_save(old, tmp_path / "old.pt")
    rebuilt = load_segmentation_model(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), network.state_dict().values()))


def test_metadata_cannot_take_the_layout_names():
    with pytest.raises(ValueError, match="cannot be named"):
        model_file("monai_mdm.unet", {}, {}, version=2)
