"""Choosing the few-shot UNet's weights: EMA or raw from a pretraining run (auto / ema / raw), or a random control."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import run

from helpers import BUNDLES
from monai_mdm.inferers import MDMSegmenter
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble, load_pretrained
from monai_mdm.utils import atomic_torch_save

PRETRAIN = str(BUNDLES / "mdm_pretrain" / "configs" / "train.json")
KEY = "input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def pretrain_models(demo_data, tmp_path_factory) -> Path:
    """A 4-iteration run: its EMA (warm-up) keeps 0.14 % of the initialisation, so auto takes it."""
    out = tmp_path_factory.mktemp("pretrain")
    run(config_file=PRETRAIN, dataset_dir=str(demo_data["glas"]), output_dir=str(out), max_iterations=4,
        image_size=32, batch_size=2, num_workers=0, progress_bar=False, save_interval=4, grid_interval=0)  # fmt: skip
    return out / "models"


def _weights(path: Path, key: str = "model") -> torch.Tensor:
    return torch.load(path, weights_only=False)[key][KEY]


def _copy_with_init_weight(models: Path, folder: Path, init_weight: float, files=("model.pt", "model_ema.pt")) -> Path:
    """The run's model files with another recorded initialisation weight (as a shorter run would leave)."""
    folder.mkdir()
    for name in files:
        state = torch.load(models / name, weights_only=True)
        state["pretraining"]["ema"]["init_weight"] = init_weight
        atomic_torch_save(state, folder / name)
    return folder


@pytest.mark.parametrize("name", ["model.pt", "model_ema.pt", "checkpoint_4.pt"])
def test_auto_takes_the_ema_once_it_has_left_the_initialisation(pretrain_models, name, caplog):
    with caplog.at_level(logging.INFO, logger="monai_mdm.networks.interchange"):
        net = load_pretrained(pretrain_models / name, "tiny")
    assert torch.equal(net.state_dict()[KEY], _weights(pretrain_models / "model_ema.pt"))
    info = net.pretraining
    assert info["weights"] == "ema" and info["requested"] == "auto" and info["iteration"] == 4
    assert info["ema_updates"] == 4 and info["ema_init_weight"] < 0.01 and "left the initialisation" in info["reason"]
    expected = "checkpoint_4.pt" if name == "checkpoint_4.pt" else "model_ema.pt"
    assert Path(info["source"]).name == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "monai_mdm.networks.interchange"]
    assert len(lines) == 1 and expected in lines[0] and "ema weights" in lines[0] and "left" in lines[0]


@pytest.mark.parametrize("name", ["model.pt", "model_ema.pt"])
def test_auto_takes_the_raw_weights_while_the_ema_is_mostly_the_initialisation(pretrain_models, tmp_path, name):
    folder = _copy_with_init_weight(pretrain_models, tmp_path / "short", 0.985)
    net = load_pretrained(folder / name, "tiny")
    assert torch.equal(net.state_dict()[KEY], _weights(folder / "model.pt"))
    assert net.pretraining["weights"] == "raw" and Path(net.pretraining["source"]).name == "model.pt"
    assert "98.5%" in net.pretraining["reason"]


def test_auto_uses_the_set_that_is_there_when_the_other_file_is_missing(pretrain_models, tmp_path):
    folder = _copy_with_init_weight(pretrain_models, tmp_path / "alone", 0.985, files=["model_ema.pt"])
    net = load_pretrained(folder / "model_ema.pt", "tiny")
    assert net.pretraining["weights"] == "ema" and "only the ema weights" in net.pretraining["reason"]


@pytest.mark.parametrize("choice", ["ema", "raw"])
@pytest.mark.parametrize("name", ["model.pt", "model_ema.pt", "checkpoint_4.pt"])
def test_ema_and_raw_pick_that_set_from_any_file_of_the_run(pretrain_models, name, choice):
    net = load_pretrained(pretrain_models / name, "tiny", weights=choice)
    expected = _weights(pretrain_models / ("model_ema.pt" if choice == "ema" else "model.pt"))
    assert torch.equal(net.state_dict()[KEY], expected)
    assert net.pretraining["weights"] == choice and net.pretraining["requested"] == choice


def test_files_without_a_record_are_used_as_before(pretrain_models, tmp_path):
    flat = tmp_path / "model_ema.pt"  # as written before model files recorded anything: a bare state dict
    torch.save(torch.load(pretrain_models / "model_ema.pt", weights_only=True)["model"], flat)
    net = load_pretrained(flat, "tiny")
    assert torch.equal(net.state_dict()[KEY], _weights(pretrain_models / "model_ema.pt"))
    assert net.pretraining["weights"] == "as given" and "records no EMA state" in net.pretraining["reason"]
    assert load_pretrained(flat, "tiny", weights="raw").pretraining["weights"] == "as given"


def test_ema_asked_of_a_file_without_ema_weights_names_the_setting_and_the_fix(pretrain_models, tmp_path):
    flat = tmp_path / "weights.pt"
    torch.save(torch.load(pretrain_models / "model.pt", weights_only=True)["model"], flat)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(pretrain_models / "model.pt", alone / "model.pt")  # raw weights without model_ema.pt beside
    for path in (flat, alone / "model.pt"):
        before = path.read_bytes()
        with pytest.raises(ValueError, match=r"--weights ema: .* holds no ema weights.*Use --weights auto or raw"):
            load_pretrained(path, "tiny", weights="ema")
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["model.pt", "weights.pt"]


def test_unknown_weights_value_is_refused(pretrain_models):
    with pytest.raises(ValueError, match=r"--weights must be one of auto, ema, raw, got 'best'"):
        load_pretrained(pretrain_models / "model_ema.pt", "tiny", weights="best")


def test_random_control_builds_the_preset_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    net = load_pretrained("random", "tiny", seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # the rest of the run draws what it would have drawn
    torch.manual_seed(7)
    reference = MDMUNet.from_preset("tiny")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in net.state_dict().items())
    assert not torch.equal(load_pretrained("random", "tiny", seed=8).state_dict()[KEY], net.state_dict()[KEY])
    assert net.pretraining["source"] == "random" and net.pretraining["weights"] == "random"
    assert "seed 7" in net.pretraining["reason"]


@pytest.mark.parametrize("choice", ["ema", "raw"])
def test_random_control_refuses_an_explicit_weights_choice(choice):
    match = rf"--pretrained_weights random .* --weights {choice} .* leave --weights at auto"
    with pytest.raises(ValueError, match=match):
        load_pretrained("random", "tiny", weights=choice)


def test_segmenter_saves_the_pretraining_choice_and_reads_files_without_it(pretrain_models, tmp_path):
    net = load_pretrained(pretrain_models / "model_ema.pt", "tiny", weights="raw")
    extractor = MDMFeatureExtractor(net, blocks=(5, 6))
    segmenter = MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2))
    segmenter.save(tmp_path / "seg.pt")
    loaded = MDMSegmenter.load(tmp_path / "seg.pt")
    assert loaded.pretraining == net.pretraining and loaded.pretraining["weights"] == "raw"
    state = segmenter.to_state()
    del state["pretraining"]  # a model saved before the choice was recorded
    assert MDMSegmenter.from_state(state).pretraining is None


def test_converted_files_offer_the_set_the_converter_named(pretrain_models, tmp_path):
    state = torch.load(pretrain_models / "model_ema.pt", weights_only=True)
    # the converter's layout before the model-file version 1 (weights under "state_dict") still loads
    converted = {"network_config": state["network_config"], "state_dict": state["model"], "weights": "ema"}
    atomic_torch_save(converted, tmp_path / "ema.pt")
    atomic_torch_save({**converted, "weights": "raw"}, tmp_path / "raw.pt")
    assert load_pretrained(tmp_path / "ema.pt", None, weights="ema").pretraining["weights"] == "ema"
    assert load_pretrained(tmp_path / "raw.pt", "tiny").pretraining["weights"] == "raw"
    with pytest.raises(ValueError, match=r"--weights ema: .*raw\.pt' holds no ema weights \(it has: raw"):
        load_pretrained(tmp_path / "raw.pt", "tiny", weights="ema")


def test_random_control_needs_a_preset():
    with pytest.raises(ValueError, match=r"--pretrained_weights random needs --preset"):
        load_pretrained("random", None)
