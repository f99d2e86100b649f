"""Tests for MDMUNet: exact agreement with guided-diffusion weights, presets, shapes and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_mdm.networks import PRESETS, MDMUNet, guided_diffusion_config_to_kwargs, timestep_embedding

from helpers import FIXTURES

FIXTURE = FIXTURES / "guided_unet_reference.pt"
PAPER_PARAMS = 311_017_539


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, map_location="cpu", weights_only=False)


def _run_with_hooks(model: MDMUNet, x: torch.Tensor, t: torch.Tensor):
    acts: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, out.detach()))
        for i, block in enumerate(model.output_blocks)
    ]
    try:
        with torch.no_grad():
            out = model(x, t)
    finally:
        for h in handles:
            h.remove()
    return out, acts


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output convs would make every output 0 and hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ----------------------------------------------------------------------------- reference checkpoint


def test_reproduces_reference_output_and_decoder_activations(reference):
    model = MDMUNet.from_guided_diffusion(reference["state_dict"], reference["config"]).eval()
    out, acts = _run_with_hooks(model, reference["x"], reference["timesteps"])
    assert torch.allclose(out, reference["output"], atol=1e-5, rtol=0)
    expected = reference["output_block_activations"]
    assert len(expected) == 9 and sorted(acts) == sorted(expected)
    for i, act in expected.items():
        assert acts[i].shape == act.shape, i
        assert torch.allclose(acts[i], act, atol=1e-5, rtol=0), f"output_blocks[{i}] differs"


def test_decoder_features_match_reference_activations_and_stop_early(reference):
    model = MDMUNet.from_guided_diffusion(reference["state_dict"], reference["config"]).eval()
    expected = reference["output_block_activations"]
    blocks = [5, 2, 3]  # returned in the order asked
    ran = []
    for i in (5, 6):
        model.output_blocks[i].register_forward_hook(lambda *args, i=i: ran.append(i))
    model.out.register_forward_hook(lambda *args: ran.append("out"))
    with torch.no_grad():
        got = model.decoder_features(reference["x"], reference["timesteps"], blocks)
    for b, act in zip(blocks, got):
        assert torch.allclose(act, expected[b], atol=1e-5, rtol=0), f"output_blocks[{b}] differs"
    assert ran == [5]  # nothing after the deepest requested block runs
    with pytest.raises(ValueError, match=r"0\.\.8"):
        model.decoder_features(reference["x"], reference["timesteps"], [9])


def test_module_prefix_and_fp16_weights_load(reference):
    sd = {"module." + k: v.half() for k, v in reference["state_dict"].items()}
    model = MDMUNet.from_guided_diffusion(sd, reference["config"]).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(reference["x"], reference["timesteps"])
    assert torch.allclose(out, reference["output"], atol=5e-3)


@pytest.mark.parametrize("key", ["state_dict", "model", "ema"])
def test_wrapped_state_dict_loads(reference, key):
    model = MDMUNet.from_guided_diffusion({key: reference["state_dict"]}, reference["config"])
    assert torch.equal(model.out[2].weight, reference["state_dict"]["out.2.weight"])


def test_wrapper_with_embedded_config(reference):
    # the fixture itself is such a wrapper: {"config", "state_dict", ...}
    model = MDMUNet.from_guided_diffusion(reference)
    assert len(model.output_blocks) == 9


def test_command_line_style_config_strings(reference):
    cfg = {**reference["config"], "attention_resolutions": "16,8", "channel_mult": "1,2,2"}
    model = MDMUNet.from_guided_diffusion(reference["state_dict"], cfg)
    assert model.attention_downsample == (2, 4)
    assert model.channel_mult == (1, 2, 2)


@pytest.mark.parametrize(
    "change, setting",
    [
        ({"num_res_blocks": 1}, "num_res_blocks"),
        ({"attention_resolutions": [4]}, "attention_resolutions"),
        ({"attention_resolutions": [1, 2, 4]}, "attention_resolutions"),
        ({"use_scale_shift_norm": False}, "use_scale_shift_norm"),
        ({"learn_sigma": True}, "learn_sigma"),
        ({"resblock_updown": False}, "resblock_updown"),
        ({"model_channels": 64}, "model_channels"),
        ({"in_channels": 1}, "in_channels"),
        ({"channel_mult": [1, 2, 3]}, "channel_mult"),
        ({"dims": 3}, "dims"),
    ],
)
def test_wrong_config_names_the_setting(reference, change, setting):
    with pytest.raises(ValueError, match=setting) as err:
        MDMUNet.from_guided_diffusion(reference["state_dict"], {**reference["config"], **change})
    msg = str(err.value)
    assert "missing keys" in msg or "unexpected keys" in msg or "shape mismatches" in msg


def test_foreign_state_dict_is_rejected(reference):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3)).state_dict()
    with pytest.raises(ValueError, match="does not look like a guided-diffusion UNet"):
        MDMUNet.from_guided_diffusion(other, reference["config"])


def test_non_strict_ignores_extra_keys_but_not_shapes(reference):
    sd = {**reference["state_dict"], "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys"):
        MDMUNet.from_guided_diffusion(sd, reference["config"])
    MDMUNet.from_guided_diffusion(sd, reference["config"], strict=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        MDMUNet.from_guided_diffusion(sd, {**reference["config"], "learn_sigma": True}, strict=False)


def test_class_conditional_is_not_implemented(reference):
    with pytest.raises(NotImplementedError, match="class"):
        MDMUNet.from_guided_diffusion(reference["state_dict"], {**reference["config"], "class_cond": True})
    sd = {**reference["state_dict"], "label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(NotImplementedError, match="class"):
        MDMUNet.from_guided_diffusion(sd, reference["config"])


# ----------------------------------------------------------------------------- config translation


def test_config_translation_defaults():
    kw = guided_diffusion_config_to_kwargs(
        {"image_size": 256, "num_channels": 192, "channel_mult": "", "attention_resolutions": "32,16,8",
         "num_head_channels": 64, "resblock_updown": True, "learn_sigma": True}
    )
    assert kw["channel_mult"] == (1, 1, 2, 2, 4, 4)
    assert kw["attention_downsample"] == (8, 16, 32)
    assert kw["out_channels"] == 6
    assert kw["model_channels"] == 192
    kw512 = guided_diffusion_config_to_kwargs({"image_size": 512, "model_channels": 64, "channel_mult": ""})
    assert kw512["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        guided_diffusion_config_to_kwargs({"image_size": 100, "model_channels": 64, "channel_mult": ""})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_guided_diffusion_config_round_trip(name):
    with torch.device("meta"):
        model = MDMUNet.from_preset(name)
    cfg = model.to_guided_diffusion_config(image_size=256)
    kw = guided_diffusion_config_to_kwargs(cfg)
    assert kw == {**PRESETS[name], "channel_mult": tuple(PRESETS[name]["channel_mult"])}


# ----------------------------------------------------------------------------- shapes and inputs


@pytest.mark.parametrize(
    "preset, shape",
    [("tiny", (2, 3, 32, 32)), ("tiny", (1, 3, 32, 48)), ("tiny3d", (1, 1, 16, 16, 16))],
)
def test_forward_shape(preset, shape):
    model = MDMUNet.from_preset(preset).eval()
    with torch.no_grad():
        out = model(torch.randn(shape), torch.randint(0, 1000, (shape[0],)))
    assert out.shape == (shape[0], model.out_channels, *shape[2:])
    assert out.dtype == torch.float32


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("conv_resample", [True, False])
def test_plain_resampling_blocks(spatial_dims, conv_resample):
    model = MDMUNet.from_preset(
        "tiny", spatial_dims=spatial_dims, resblock_updown=False, conv_resample=conv_resample, num_res_blocks=1
    )
    names = {n for n, _ in model.named_parameters()}
    assert ("input_blocks.2.0.op.weight" in names) == conv_resample
    assert ("output_blocks.3.1.conv.weight" in names) == conv_resample
    x = torch.randn((1, 3) + (16,) * spatial_dims)
    with torch.no_grad():
        assert model(x, torch.tensor([5])).shape == x.shape


def test_timesteps_ints_floats_and_scalar():
    model = _randomise(MDMUNet.from_preset("tiny")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([10.0, 10.0]))
        c = model(x, 10)
    assert torch.allclose(a, b) and torch.allclose(a, c)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]))


def test_indivisible_size_raises():
    model = MDMUNet.from_preset("tiny")
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 30, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="4D input"):
        model(torch.randn(1, 3, 32, 32, 32), torch.tensor([1]))


def test_channels_last_matches_contiguous():
    model = _randomise(MDMUNet.from_preset("tiny")).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 900])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(ref, out, atol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    t, dim = torch.tensor([0, 3]), 8
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(dim // 2) / (dim // 2))
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    emb = timestep_embedding(t, dim)
    assert torch.allclose(emb, expected, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))


# ----------------------------------------------------------------------------- presets


def test_paper_preset_size_and_decoder_widths():
    with torch.device("meta"):
        model = MDMUNet.from_preset("paper")
    n = sum(p.numel() for p in model.parameters())
    assert n == PAPER_PARAMS  # "about 311 M" in the paper
    assert len(model.output_blocks) == 18 and len(model.decoder_channels) == 18
    assert sum(model.decoder_channels[8:13]) == 1728  # medical recipe, blocks 8..12
    assert sum(model.decoder_channels[5:13]) == 3264  # faces recipe, blocks 5..12
    assert model.output_blocks[12][0].out_layers[3].out_channels == model.decoder_channels[12]


def test_preset_overrides_and_unknown_name():
    model = MDMUNet.from_preset("tiny", out_channels=1)
    assert model.out_channels == 1 and model.out[2].out_channels == 1
    with pytest.raises(ValueError, match="paper") as err:
        MDMUNet.from_preset("huge")
    assert "tiny3d" in str(err.value) and "huge" in str(err.value)


def test_low_precision_model_and_autocast():
    model = MDMUNet.from_preset("tiny").eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([7])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x, t).dtype == torch.float32
        assert model.to(torch.bfloat16)(x, t).dtype == torch.float32  # norms still run in float32
