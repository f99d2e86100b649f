"""python -m monai_mdm.convert: released guided-diffusion checkpoints -> self-describing pretrained files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from monai_mdm.convert import convert_checkpoint, main, parse_config
from monai_mdm.networks import PRESETS, MDMFeatureExtractor, MDMUNet, guided_diffusion_config_to_kwargs
from monai_mdm.networks import load_pretrained_unet
from monai_mdm.networks.interchange import match_architecture, preset_candidates

from helpers import FIXTURES

FIXTURE = FIXTURES / "guided_unet_reference.pt"
BLOCKS = (2, 5, 8)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=False)


def _config_args(config: dict) -> list[str]:
    """The fixture's config as --config key=value pairs (lists as JSON: attention given as downsample factors)."""
    out = []
    for k, v in config.items():
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, (list, tuple)):
            v = "[" + ",".join(str(x) for x in v) + "]"
        out.append(f"{k}={v}")
    return out


def _check_activations(path: Path, ref: dict, atol: float) -> MDMUNet:
    """The converted file, loaded with its stored config, reproduces the reference decoder blocks and output."""
    net = load_pretrained_unet(path, preset=None)
    for i, t in enumerate(ref["timesteps"].tolist()):  # one image per call: the extractor uses one timestep
        ex = MDMFeatureExtractor(net, blocks=BLOCKS, timestep=t, corruption=None, seed=None, normalize=False)
        for b, got in zip(BLOCKS, ex.extract_blocks(ref["x"][i : i + 1])):
            torch.testing.assert_close(got, ref["output_block_activations"][b][i : i + 1], atol=atol, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(net(ref["x"], ref["timesteps"]), ref["output"], atol=atol, rtol=0)
    return net


def test_fp16_module_prefixed_state_dict(ref, tmp_path, capsys):
    src = tmp_path / "ffhq.pt"
    torch.save({f"module.{k}": v.half() for k, v in ref["state_dict"].items()}, src)
    out = tmp_path / "bundle" / "models" / "pretrained.pt"
    assert main([str(src), "--out", str(out), "--config", *_config_args(ref["config"])]) == 0
    report = capsys.readouterr().out
    n_tensors = len(ref["state_dict"])
    n_params = sum(v.numel() for v in ref["state_dict"].values())
    assert "weights: raw" in report and "does not say whether it holds EMA" in report
    assert "precision: fp16 (written as fp32)" in report
    assert f"tensors: {n_tensors}, parameters: {n_params:,}" in report
    assert f"removed module./_orig_mod. prefixes from {n_tensors} keys" in report
    assert "matches the given --config" in report and f"wrote: {out}" in report

    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert set(saved) >= {"format", "version", "network_config", "model", "source", "weights"}
    assert saved["format"] == "monai_mdm.unet" and saved["version"] == 1
    assert saved["weights"] == "raw" and saved["source"] == os.path.abspath(src)
    assert set(saved["model"]) == set(ref["state_dict"])
    assert all(v.dtype == torch.float32 for v in saved["model"].values())
    assert saved["network_config"]["model_channels"] == 32
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left nothing behind
    _check_activations(out, ref, atol=1e-3)


def test_ema_wrapper_and_prefer(ref, tmp_path, capsys):
    sd = ref["state_dict"]
    src = tmp_path / "ckpt.pt"
    torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}, "step": 7}, src)
    args = ["--config", *_config_args(ref["config"])]
    assert main([str(src), "--out", str(tmp_path / "ema.pt"), *args]) == 0
    report = capsys.readouterr().out
    assert "weights: EMA (from entry 'ema')" in report and "also found: raw weights in entry 'model'" in report
    assert "precision: fp32" in report
    assert torch.load(tmp_path / "ema.pt", weights_only=True)["weights"] == "ema"
    _check_activations(tmp_path / "ema.pt", ref, atol=1e-5)

    assert main([str(src), "--out", str(tmp_path / "raw.pt"), "--prefer", "raw", *args]) == 0
    assert "weights: raw (from entry 'model')" in capsys.readouterr().out
    raw = torch.load(tmp_path / "raw.pt", weights_only=True)
    assert raw["weights"] == "raw" and all(not v.any() for v in raw["model"].values())

    # a bare state dict named the way guided-diffusion names its EMA files
    named = tmp_path / "ema_0.9999_050000.pt"
    torch.save(sd, named)
    record = convert_checkpoint(named, tmp_path / "named.pt", config=ref["config"], log=lambda s: None)
    assert record["weights"] == "ema"


def test_mismatching_preset_lists_keys(ref, tmp_path, capsys):
    src = tmp_path / "ffhq.pt"
    torch.save(ref["state_dict"], src)
    out = tmp_path / "out.pt"
    # the fixture is "tiny" plus attention at downsample 2
    assert main([str(src), "--out", str(out), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "do not match preset 'tiny'" in err
    assert "attention_resolutions" in err
    assert "keys in the checkpoint that tiny lacks (40)" in err
    assert "input_blocks.4.1: norm.weight, norm.bias, qkv.weight" in err
    assert "keys tiny has but the checkpoint lacks (10)" in err and "output_blocks.5.1: in_layers.0.weight" in err
    assert not out.exists()
    # no preset at all: every preset is tried, the closest is shown, the others are counted
    assert main([str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "do not match any preset" in err and "Closest: tiny with 50 differences" in err
    assert "ddpm_seg_ffhq (" in err and "--config" in err
    # a shape mismatch is listed with both shapes
    cfg = {**ref["config"], "model_channels": 64}
    with pytest.raises(ValueError, match=r"model_channels is 32 in the checkpoint, 64 here"):
        convert_checkpoint(src, out, config=cfg, log=lambda s: None)


def test_not_a_guided_diffusion_unet(tmp_path, capsys):
    src = tmp_path / "classifier.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, "epoch": 3}, src)
    assert main([str(src), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert "not a guided-diffusion UNet checkpoint" in err and "first keys: model, epoch" in err
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        convert_checkpoint(tmp_path / "tensor.pt", tmp_path / "x.pt", log=lambda s: None)
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_learn_sigma_variant_is_detected(tmp_path, capsys):
    torch.manual_seed(0)
    net = MDMUNet.from_preset("tiny", out_channels=6)  # a DDPM trained with learn_sigma
    src = tmp_path / "model100000.pt"
    torch.save(net.state_dict(), src)
    out = tmp_path / "pretrained.pt"
    assert main([str(src), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "architecture: matches tiny+learn_sigma" in report and "out_channels=6" in report
    saved = torch.load(out, weights_only=True)
    assert saved["preset"] == "tiny+learn_sigma" and saved["network_config"]["out_channels"] == 6
    loaded = load_pretrained_unet(out, preset=None)
    assert loaded.out_channels == 6
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # the preset route still reads the converted file
    assert load_pretrained_unet(out, preset="tiny", out_channels=6).out_channels == 6


def test_ddpm_seg_preset_is_the_released_ffhq_architecture():
    flags = dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=True,
        learn_sigma=True,
        channel_mult="",
    )
    with torch.device("meta"):
        released = MDMUNet(**guided_diffusion_config_to_kwargs(flags))
    sd = released.state_dict()
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == pytest.approx(552e6, rel=0.01)
    best = match_architecture(sd, preset_candidates(list(PRESETS)))
    assert best[0].name == "ddpm_seg_ffhq" and best[0].differences == 0
    assert all(m.differences > 0 for m in best[1:])
    assert len(released.output_blocks) == 18


def test_config_parsing_and_cli_errors(tmp_path, capsys):
    cfg = parse_config(["image_size=256", "learn_sigma=True", "attention_resolutions=32,16,8", "channel_mult=[1,2]"])
    assert cfg == {"image_size": 256, "learn_sigma": True, "attention_resolutions": "32,16,8", "channel_mult": [1, 2]}
    with pytest.raises(ValueError, match="Did you mean model_channels"):
        parse_config(["model_channel=32"])
    with pytest.raises(ValueError, match="key=value"):
        parse_config(["image_size"])
    with pytest.raises(SystemExit):
        main(["x.pt", "--out", "y.pt", "--preset", "tiny", "--config", "image_size=32"])
    capsys.readouterr()
    src = tmp_path / "same.pt"
    torch.save(MDMUNet.from_preset("tiny").state_dict(), src)
    assert main([str(src), "--out", str(src)]) == 1
    assert "is the checkpoint itself" in capsys.readouterr().err


def test_load_pretrained_unet_needs_settings_for_a_bare_state_dict(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(MDMUNet.from_preset("tiny").state_dict(), path)
    with pytest.raises(ValueError, match="monai_mdm.convert"):
        load_pretrained_unet(path, preset=None)
    assert load_pretrained_unet(path, preset="tiny").model_channels == 32


def test_converted_checkpoint_drives_the_face_bundle(ref, tmp_path, capsys):
    """Convert -> train the face bundle on the converted weights -> its saved segmenter's frozen network
    still reproduces the reference decoder blocks (the bundle used the released weights unchanged)."""
    from monai.bundle import run

    from helpers import BUNDLES, write_face_parts
    from monai_mdm.inferers import load_segmentation_model

    source = tmp_path / "released.pt"
    torch.save({f"module.{k}": v.half() for k, v in ref["state_dict"].items()}, source)
    converted = tmp_path / "models" / "pretrained.pt"
    assert main([str(source), "--out", str(converted), "--config", *_config_args(ref["config"])]) == 0
    data = tmp_path / "faces"
    write_face_parts(data / "train", n=2, size=32)
    write_face_parts(data / "test", n=1, size=32, seed=1)
    out = tmp_path / "run"
    run(config_file=str(BUNDLES / "mdm_face_parts_fewshot" / "configs" / "train.json"), dataset_dir=str(data),
        output_dir=str(out), pretrained_weights=str(converted), preset=None, blocks=list(BLOCKS), crop_size=32,
        num_heads=2, max_steps=2, epoch_length=2, warmup_epochs=0)  # fmt: skip
    segmenter = load_segmentation_model(out / "models" / "model.pt")
    assert list(segmenter.extractor.blocks) == list(BLOCKS)
    ex = MDMFeatureExtractor(segmenter.extractor.network, blocks=BLOCKS, timestep=int(ref["timesteps"][0]),
                             corruption=None, normalize=False)  # fmt: skip
    for b, got in zip(BLOCKS, ex.extract_blocks(ref["x"][:1])):
        torch.testing.assert_close(got, ref["output_block_activations"][b][:1], atol=1e-3, rtol=0)
