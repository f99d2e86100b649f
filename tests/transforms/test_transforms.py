"""Tests for the MDM corruption (PatchMasking) and the MONAI array/dictionary transforms."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_mdm.transforms import (
    Corruption,
    EnsureRGB,
    EnsureRGBD,
    EnsureRGBd,
    EnsureRGBDict,
    PatchMasking,
    RandPatchMask,
    RandPatchMaskD,
    RandPatchMaskd,
    RandPatchMaskDict,
)


def exact_keep_count(num_patches: int, t: int, num_timesteps: int) -> int:
    """floor(L * (1 - t/T)) in exact rational arithmetic."""
    return math.floor(Fraction(num_patches) * (1 - Fraction(t, num_timesteps)))


def patch_view(keep: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, n_patches, patch_volume) for whole (non-padded) patches."""
    b, spatial = keep.shape[0], keep.shape[2:]
    grid = [s // patch for s in spatial]
    shape = [b] + [v for g in grid for v in (g, patch)]
    x = keep.reshape(shape)
    nd = len(spatial)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    return x.permute(perm).reshape(b, math.prod(grid), patch**nd)


# (spatial shape, patch size, T, timesteps of the batch)
COUNT_CASES = [
    ((32, 32), 8, 1000, [0, 1, 2, 50, 250, 500, 750, 998, 999]),
    ((64, 48), 8, 1000, [0, 1, 63, 100, 333, 667, 999]),
    ((8, 40), 8, 1000, [800, 799, 801, 0, 999]),  # L=5: float floor(5*(1-0.8)) gives 0, exact is 1
    ((16, 16, 16), 4, 1000, [0, 1, 10, 500, 999, 999]),
    ((16, 24, 8), 8, 1000, [0, 1, 499, 999]),
    ((24, 24), 8, 10, [0, 1, 3, 5, 9]),
    ((256, 256), 8, 1000, [0, 1, 50, 999]),
]


@pytest.mark.parametrize("spatial,patch,num_t,ts", COUNT_CASES)
def test_exact_kept_patch_count(spatial, patch, num_t, ts):
    masking = PatchMasking(patch_size=patch, num_timesteps=num_t)
    timesteps = torch.tensor(ts)
    keep = masking.keep_mask(spatial, timesteps, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (len(ts), 1, *spatial) and keep.dtype == torch.bool
    per_patch = patch_view(keep, patch)
    # patch aligned: every patch is entirely kept or entirely masked
    assert torch.all(per_patch.all(-1) | ~per_patch.any(-1))
    num_patches = per_patch.shape[1]
    kept = per_patch.all(-1).sum(1).tolist()
    assert kept == [exact_keep_count(num_patches, t, num_t) for t in ts]
    assert kept == [(num_patches * (num_t - t)) // num_t for t in ts]


@pytest.mark.parametrize(
    "shape,fill",
    [((3, 3, 32, 32), 0.0), ((2, 1, 16, 16, 16), -7.5), ((4, 3, 24, 40), 2.0)],
)
def test_masked_pixels_fill_and_kept_pixels_unchanged(shape, fill):
    masking = PatchMasking(patch_size=8, fill_value=fill)
    images = torch.rand(shape) + 10.0  # never equal to fill
    ts = torch.arange(shape[0]) * 250 + 100  # different t per sample
    gen_seed = 3
    out = masking(images, ts, generator=torch.Generator().manual_seed(gen_seed))
    keep = masking.keep_mask(shape[2:], ts, generator=torch.Generator().manual_seed(gen_seed))
    keep_c = keep.expand_as(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out[keep_c], images[keep_c])
    assert torch.all(out[~keep_c] == fill)
    # masking is shared by all channels of a sample
    assert torch.equal(out == fill, (~keep).expand_as(images))


def test_different_samples_get_different_masks():
    masking = PatchMasking(patch_size=8)
    keep = masking.keep_mask((64, 64), torch.full((8,), 500), generator=torch.Generator().manual_seed(1))
    flat = keep.view(8, -1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(flat[i], flat[j])


def test_generator_reproducibility():
    masking = PatchMasking(patch_size=4)
    images = torch.randn(4, 3, 32, 32)
    ts = torch.tensor([10, 400, 600, 900])
    a = masking(images, ts, generator=torch.Generator().manual_seed(42))
    b = masking(images, ts, generator=torch.Generator().manual_seed(42))
    c = masking(images, ts, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_patch_masking_is_a_corruption():
    assert isinstance(PatchMasking(), Corruption)
    assert PatchMasking(num_timesteps=50).num_timesteps == 50
    with pytest.raises(TypeError):
        Corruption()  # abstract


def test_non_cubic_patch_sequence():
    masking = PatchMasking(patch_size=(4, 8))
    keep = masking.keep_mask((16, 32), torch.tensor([500]), generator=torch.Generator().manual_seed(0))
    grid = keep.view(1, 4, 4, 4, 8)  # (B, gh, ph, gw, pw)
    assert torch.all(grid.all(2).all(-1) | ~grid.any(2).any(-1))
    assert int(grid.all(2).all(-1).sum()) == 8


NOT_DIVISIBLE_CASES = [((30, 32), 8, "30"), ((32, 32, 20), 8, "20"), ((17, 16), (8, 8), "17")]


@pytest.mark.parametrize("spatial,patch,bad", NOT_DIVISIBLE_CASES)
def test_not_divisible_error(spatial, patch, bad):
    masking = PatchMasking(patch_size=patch)
    with pytest.raises(ValueError) as err:
        masking(torch.zeros(1, 1, *spatial), torch.tensor([10]))
    msg = str(err.value)
    assert bad in msg and "patch size 8" in msg and "pad=True" in msg
    with pytest.raises(ValueError, match="pad=True"):
        RandPatchMask(patch_size=patch)(np.zeros((1, *spatial), np.float32))


def test_pad_true_partial_border_patches():
    masking = PatchMasking(patch_size=8, pad=True, fill_value=0.0)
    spatial = (20, 13)  # grid ceil -> 3 x 2 = 6 patches, the border ones partial
    ts = torch.tensor([0, 500, 999, 167])
    keep = masking.keep_mask(spatial, ts, generator=torch.Generator().manual_seed(5))
    assert keep.shape == (4, 1, *spatial)
    # pad the mask back up to whole patches, replicating the border, and count patches
    padded = torch.zeros(4, 1, 24, 16, dtype=torch.bool)
    padded[:, :, :20, :13] = keep
    padded[:, :, 20:, :] = padded[:, :, 19:20, :]
    padded[:, :, :, 13:] = padded[:, :, :, 12:13]
    per_patch = patch_view(padded, 8)
    assert torch.all(per_patch.all(-1) | ~per_patch.any(-1))
    assert per_patch.all(-1).sum(1).tolist() == [6, 3, 0, 4]  # (6 * (1000 - t)) // 1000
    out = masking(torch.ones(4, 2, *spatial), ts, generator=torch.Generator().manual_seed(5))
    assert out.shape == (4, 2, *spatial)
    assert torch.equal(out[:, :1] == 1, keep)


@pytest.mark.parametrize("bad_t", [[-1], [1000], [0, 1000], [5, -3]])
def test_out_of_range_timestep(bad_t):
    masking = PatchMasking(patch_size=8, num_timesteps=1000)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        masking(torch.zeros(len(bad_t), 1, 16, 16), torch.tensor(bad_t))


@pytest.mark.parametrize("bad_t", [-1, 1000, 5000])
def test_rand_patch_mask_out_of_range_timestep(bad_t):
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        RandPatchMask(timestep=bad_t)


def test_timesteps_validation():
    masking = PatchMasking()
    with pytest.raises(ValueError, match="integers"):
        masking(torch.zeros(2, 1, 16, 16), torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="batch"):
        masking(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2, 3]))


# (shape, patch size, fixed timestep)
RAND_CASES = [
    ((3, 32, 32), 8, 500),
    ((1, 16, 16, 16), 4, 250),
    ((2, 24, 40), 8, None),
    ((1, 64, 64), (8, 16), 1),
]


@pytest.mark.parametrize("shape,patch,timestep", RAND_CASES)
def test_rand_patch_mask_array(shape, patch, timestep):
    xform = RandPatchMask(patch_size=patch, timestep=timestep, fill_value=-1.0)
    xform.set_random_state(0)
    img = np.random.default_rng(0).uniform(1, 2, size=shape).astype(np.float32)
    out = xform(img)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == img.shape
    t = xform.timestep
    assert isinstance(t, int) and 0 <= t < 1000
    if timestep is not None:
        assert t == timestep
    keep = xform.keep.numpy()
    assert keep.shape == (1, *shape[1:]) and keep.dtype == bool
    keep_c = np.broadcast_to(keep, shape)
    np.testing.assert_array_equal(out[keep_c], img[keep_c])
    assert np.all(out[~keep_c] == -1.0)
    sizes = (patch,) * (len(shape) - 1) if isinstance(patch, int) else patch
    num_patches = math.prod(s // p for s, p in zip(shape[1:], sizes))
    assert keep.sum() == exact_keep_count(num_patches, t, 1000) * math.prod(sizes)

    # replay
    again = xform(img * 2, randomize=False)
    np.testing.assert_array_equal(again == -1.0, out == -1.0)
    # reproducible through set_random_state
    other = RandPatchMask(patch_size=patch, timestep=timestep, fill_value=-1.0)
    other.set_random_state(0)
    np.testing.assert_array_equal(other(img), out)
    assert other.timestep == t


def test_rand_patch_mask_torch_and_metatensor():
    xform = RandPatchMask(timestep=600).set_random_state(1)
    img = torch.rand(3, 32, 32) + 1
    out = xform(img)
    assert type(out) is torch.Tensor and out.dtype == img.dtype
    meta = MetaTensor(img.clone(), meta={"filename_or_obj": "x.png"})
    out_m = xform(meta, randomize=False)
    assert isinstance(out_m, MetaTensor) and out_m.meta["filename_or_obj"] == "x.png"
    assert torch.equal(out_m.as_tensor(), out)


def test_rand_patch_mask_draws_timesteps():
    xform = RandPatchMask(num_timesteps=1000).set_random_state(7)
    img = np.zeros((1, 16, 16), np.float32)
    ts = []
    for _ in range(50):
        xform(img)
        ts.append(xform.timestep)
    assert all(0 <= t < 1000 for t in ts)
    assert len(set(ts)) > 40
    seeds = [RandPatchMask().set_random_state(s) for s in (3, 3, 4)]
    masks = []
    for x in seeds:
        x(np.zeros((1, 64, 64), np.float32))
        masks.append((x.timestep, x.keep))
    assert masks[0][0] == masks[1][0] and torch.equal(masks[0][1], masks[1][1])
    assert masks[0][0] != masks[2][0] or not torch.equal(masks[0][1], masks[2][1])


def test_rand_patch_mask_replay_shape_mismatch():
    xform = RandPatchMask()
    with pytest.raises(RuntimeError):
        xform(np.zeros((1, 16, 16)), randomize=False)
    xform(np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="spatial shape"):
        xform(np.zeros((1, 32, 32)), randomize=False)


@pytest.mark.parametrize("cls", [RandPatchMaskd, RandPatchMaskD, RandPatchMaskDict])
def test_rand_patch_maskd(cls):
    xform = cls(keys=["image", "other"], timestep=None, fill_value=0.0, mask_key="keep")
    xform.set_random_state(11)
    image = np.random.default_rng(1).uniform(1, 2, size=(3, 32, 32)).astype(np.float32)
    other = torch.rand(1, 32, 32) + 1
    d = xform({"image": image, "other": other, "label": np.ones((1, 32, 32))})
    assert isinstance(d["image"], np.ndarray) and isinstance(d["other"], torch.Tensor)
    t = d["timestep"]
    assert isinstance(t, int) and 0 <= t < 1000
    keep = d["keep"]
    assert isinstance(keep, np.ndarray) and keep.dtype == bool and keep.shape == (1, 32, 32)
    np.testing.assert_array_equal(d["image"][0] != 0, keep[0])
    np.testing.assert_array_equal(d["other"][0].numpy() != 0, keep[0])
    assert keep.sum() == exact_keep_count(16, t, 1000) * 64
    np.testing.assert_array_equal(d["label"], 1)  # untouched key
    # reproducible
    d2 = cls(keys=["image", "other"], mask_key="keep").set_random_state(11)({"image": image, "other": other})
    assert d2["timestep"] == t
    np.testing.assert_array_equal(d2["keep"], keep)


def test_rand_patch_maskd_keys_options():
    xform = RandPatchMaskd(keys="img", timestep=50, timestep_key="t", mask_key=None)
    d = xform({"img": torch.ones(1, 16, 16)})
    assert d["t"] == 50 and "timestep" not in d and set(d) == {"img", "t"}
    xform = RandPatchMaskd(keys="img", timestep_key=None, allow_missing_keys=True)
    assert xform({"x": 1}) == {"x": 1}
    d = RandPatchMaskd(keys="img", mask_key="m")({"img": torch.ones(1, 16, 16)})
    assert isinstance(d["m"], torch.Tensor) and d["m"].dtype == torch.bool


UNIFORM_CASES = [
    ((32, 32), 8, 500),  # 16 patches, keep 8
    ((8, 8, 8), 4, 750),  # 8 patches, keep 2
    ((24, 40), 8, 100),  # 15 patches, keep 13
]


@pytest.mark.parametrize("spatial,patch,t", UNIFORM_CASES)
def test_kept_patches_uniform(spatial, patch, t):
    n = 4000
    masking = PatchMasking(patch_size=patch)
    keep = masking.keep_mask(spatial, torch.full((n,), t), generator=torch.Generator().manual_seed(123))
    per_patch = patch_view(keep, patch).all(-1).double()  # (n, L)
    num_patches = per_patch.shape[1]
    ratio = ((num_patches * (1000 - t)) // 1000) / num_patches
    freq = per_patch.mean(0)
    assert torch.all((freq - ratio).abs() < 0.05), (freq, ratio)
    # positions are exchangeable: the most and least often kept patch are close
    assert float(freq.max() - freq.min()) < 0.08


# (channels, dtype, input fill per channel, expected RGB)
RGB_CASES = [
    (1, np.uint8, [100], [100, 100, 100]),
    (2, np.uint8, [100, 255], [100, 100, 100]),
    (2, np.uint8, [100, 0], [255, 255, 255]),
    (3, np.uint8, [1, 2, 3], [1, 2, 3]),
    (4, np.uint8, [10, 20, 30, 255], [10, 20, 30]),
    (4, np.float32, [10.0, 20.0, 30.0, 0.0], [255.0, 255.0, 255.0]),
    (4, np.float32, [0.2, 0.4, 0.6, 0.5], [0.6, 0.7, 0.8]),
]


@pytest.mark.parametrize("channels,dtype,values,expected", RGB_CASES)
def test_ensure_rgb(channels, dtype, values, expected):
    img = np.stack([np.full((4, 5), v, dtype=dtype) for v in values])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = EnsureRGB()(img)
    assert isinstance(out, np.ndarray) and out.shape == (3, 4, 5) and out.dtype == img.dtype
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)
    out_t = EnsureRGB()(torch.as_tensor(img))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (3, 4, 5)


def test_ensure_rgb_3d_and_metatensor():
    img = MetaTensor(torch.rand(1, 4, 4, 4), meta={"filename_or_obj": "vol.nii.gz"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = EnsureRGB()(img)
    assert isinstance(out, MetaTensor) and out.shape == (3, 4, 4, 4)
    assert out.meta["filename_or_obj"] == "vol.nii.gz"
    assert torch.equal(out.as_tensor()[2], img.as_tensor()[0])


def test_ensure_rgb_warns_once_naming_file(monkeypatch):
    monkeypatch.setattr(EnsureRGB, "_warned", False)
    gray = MetaTensor(torch.ones(1, 8, 8), meta={"filename_or_obj": "/data/gray_01.png"})
    rgba = MetaTensor(torch.ones(4, 8, 8), meta={"filename_or_obj": "/data/rgba_02.png"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EnsureRGB()(gray)
        EnsureRGB()(rgba)
        EnsureRGBd(keys="image")({"image": gray})
        EnsureRGB()(torch.ones(3, 8, 8))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "/data/gray_01.png" in msg and "grayscale" in msg and "RGB" in msg


def test_ensure_rgb_warning_mentions_rgba(monkeypatch):
    monkeypatch.setattr(EnsureRGB, "_warned", False)
    rgba = MetaTensor(torch.ones(4, 8, 8), meta={"filename_or_obj": "tile_7.png"})
    with pytest.warns(UserWarning, match=r"RGBA.*tile_7\.png"):
        EnsureRGB()(rgba)


@pytest.mark.parametrize("channels", [5, 6])
def test_ensure_rgb_bad_channels(channels):
    img = MetaTensor(torch.ones(channels, 8, 8), meta={"filename_or_obj": "weird_scan.tif"})
    with pytest.raises(ValueError, match=r"weird_scan\.tif") as err:
        EnsureRGB()(img)
    assert str(channels) in str(err.value)
    with pytest.raises(ValueError, match="unknown file"):
        EnsureRGB()(np.ones((channels, 8, 8)))


@pytest.mark.parametrize("cls", [EnsureRGBd, EnsureRGBD, EnsureRGBDict])
def test_ensure_rgbd(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = cls(keys="image")({"image": np.ones((1, 4, 4), np.uint8), "label": np.ones((1, 4, 4), np.uint8)})
    assert d["image"].shape == (3, 4, 4) and d["label"].shape == (1, 4, 4)


def test_sixteen_bit_tiff_reaches_the_network_monotonic(tmp_path, monkeypatch):
    """A 16-bit grayscale ramp read by the pretraining bundle's own preprocessing stays a ramp (no wrap, no clip)."""
    from monai.bundle import ConfigParser
    from PIL import Image

    from monai_mdm.transforms import array as array_module

    monkeypatch.setattr(array_module.EnsureRGB, "_warned_depth", False)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "bundles/mdm_pretrain/configs/train.json"))
    parser["image_size"] = 64
    load = parser.get_parsed_content("train#preprocessing").transforms[:2]  # LoadImaged, EnsureRGBd
    with pytest.warns(UserWarning, match=r"values 0\.\.65535 .*ramp\.tif"):
        item = {"image": str(tmp_path / "ramp.tif")}
        for t in load:
            item = t(item)
    image = np.asarray(item["image"])
    assert image.dtype == np.uint8 and image.shape == (3, 64, 64)
    flat = image[0].reshape(-1)
    assert flat.min() == 0 and flat.max() == 255
    assert np.all(np.diff(flat.astype(int)) >= 0)  # monotonic: no wrap-around


def test_eight_bit_images_pass_unscaled():
    img = torch.arange(0, 256, dtype=torch.float32).reshape(1, 16, 16)
    out = EnsureRGB()(img)
    assert torch.equal(out[0], img[0])
