"""Each pretraining objective pinned on small tensors: what is blanked or noised, kept counts, the loss region,
UMD's split and t + 1, feature reading, and the refusals of bad settings."""

from __future__ import annotations

import pytest
import torch

from monai_mdm.engines import ObjectivePrepareBatch
from monai_mdm.losses import reconstruction_loss
from monai_mdm.transforms import GaussianNoise, PatchMasking, objective, objective_from_record
from monai_mdm.transforms.objectives import OBJECTIVES

T = 100
# 16 x 16 images, 8 x 8 patches: L = 4 patches; 32 x 32: L = 16
PATCH_PIXELS = 64


def _images(b=4, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _kept_patches(keep: torch.Tensor) -> list[int]:
    return [int(k.sum()) // PATCH_PIXELS for k in keep]


# ----------------------------------------------------------------------------------------------- registry


def test_registry_names_and_records_round_trip():
    assert OBJECTIVES == ("mdm", "mae", "umd", "diffmae", "ddpm")
    for name in OBJECTIVES:
        obj = objective(name, num_timesteps=T)
        again = objective_from_record(obj.record(), T)
        assert type(again) is type(obj) and again.record() == obj.record()
    assert objective("mae", num_timesteps=T).record() == {
        "name": "mae", "num_timesteps": T, "loss": "mse", "patch_size": 8, "mask_ratio": 0.75, "timestep": 0,
    }  # fmt: skip
    assert objective("umd").record()["noisy_mask_ratio"] == 0.375
    assert objective("mdm").loss == "ssim" and objective("mae", loss="ssim").loss == "ssim"


def test_no_record_means_mdm():
    obj = objective_from_record(None, 1000)
    assert obj.name == "mdm" and obj.num_timesteps == 1000 and obj.patch_size == 8


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: objective("mdmx"), r"--objective 'mdmx' is not known; choose one of mdm, mae, umd, diffmae, ddpm"),
        (lambda: objective("mae", mask_ratio=1.0), r"--mask_ratio must lie in \(0, 1\)"),
        (lambda: objective("diffmae", mask_ratio=0.0), r"--mask_ratio must lie in \(0, 1\)"),
        (lambda: objective("umd", mask_ratio=-0.5), r"--mask_ratio must lie in \(0, 1\)"),
        (lambda: objective("mae", mask_ratio="half"), r"--mask_ratio must be a number"),
        (lambda: objective("mdm", mask_ratio=0.5), r"--mask_ratio 0.5 does not apply to --objective mdm"),
        (lambda: objective("umd", loss="ssim"), r"--loss 'ssim' is not available with --objective umd"),
        (lambda: objective("mae", timestep=T, num_timesteps=T), r"timestep must be an integer in \[0, 100\)"),
        (lambda: objective_from_record({"name": "simmim"}), r"objective 'simmim', which this version cannot read"),
        (lambda: objective_from_record({"name": "ddpm"}), r"'ddpm', which needs a noise schedule"),
        (lambda: objective_from_record({"name": "umd", "num_timesteps": None}), r"needs a noise schedule"),
        (lambda: objective_from_record("mdm"), r"damaged 'objective' entry"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------- MDM / DDPM


def test_mdm_is_bit_identical_to_masking_with_uniform_t_and_ssim():
    """The step MDM pretraining always took: t ~ U[0, T) per sample, PatchMasking(8, T), SSIM on the image."""
    clean = _images()
    torch.manual_seed(3)
    old_t = torch.randint(0, T, (clean.shape[0],), dtype=torch.long)
    old_in = PatchMasking(8, T)(clean, old_t)
    torch.manual_seed(3)
    new = ObjectivePrepareBatch(objective("mdm", num_timesteps=T))
    new_in, new_target, _, new_kw = new(clean)
    assert torch.equal(old_in, new_in) and torch.equal(old_t, new_kw["timesteps"])
    pred = torch.tanh(clean + 0.3)
    assert torch.equal(new.loss_function(pred, new_target), reconstruction_loss("ssim")(pred, clean))


def test_mdm_keeps_floor_L_times_1_minus_t_over_T_patches_with_blanked_pixels_zero():
    batch = objective("mdm", num_timesteps=T).draw(_images(8), _gen())
    t = batch.timesteps
    assert _kept_patches(batch.keep) == ((16 * (T - t)) // T).tolist()
    assert torch.equal(batch.inputs, torch.where(batch.keep, batch.target, torch.zeros(())))
    assert ((batch.inputs == 0) == ~batch.keep.expand_as(batch.inputs)).all()


def test_ddpm_noises_every_pixel_with_the_guided_diffusion_schedule():
    obj = objective("ddpm", num_timesteps=T)
    clean = _images(2)
    batch = obj.draw(clean, _gen())
    abar = GaussianNoise(T).alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    expected = abar.sqrt() * clean + (1 - abar).sqrt() * batch.noise
    torch.testing.assert_close(batch.inputs, expected)
    assert batch.keep is None and (batch.inputs != clean).all()


# ----------------------------------------------------------------------------------------------- MAE


def test_mae_masks_three_quarters_at_one_fixed_timestep():
    obj = objective("mae", num_timesteps=T, timestep=7)
    batch = obj.draw(_images(3), _gen())
    assert _kept_patches(batch.keep) == [4, 4, 4]  # int(16 * 0.25)
    assert batch.timesteps.tolist() == [7, 7, 7]
    assert torch.equal(batch.inputs, batch.target.masked_fill(~batch.keep, 0.0))
    assert batch.noise is None


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_mae_loss_is_the_masked_mean_and_ignores_visible_pixels(loss):
    obj = objective("mae", num_timesteps=T, loss=loss)
    batch = obj.draw(_images(2), _gen())
    pred = torch.zeros_like(batch.target)
    err = (pred - batch.target).square() if loss == "mse" else (pred - batch.target).abs()
    masked = ~batch.keep.expand_as(err)
    torch.testing.assert_close(obj.compute_loss(pred, batch), err[masked].mean())
    changed = torch.where(batch.keep, pred + 5.0, pred)  # only visible pixels change
    assert torch.equal(obj.compute_loss(changed, batch), obj.compute_loss(pred, batch))
    assert obj.compute_loss(torch.where(batch.keep, pred, pred + 5.0), batch) > obj.compute_loss(pred, batch)


def test_mae_ssim_is_the_ssim_map_over_the_masked_region():
    obj = objective("mae", num_timesteps=T, loss="ssim")
    batch = obj.draw(_images(2), _gen())
    pred = batch.target * 0.5
    loss = obj.compute_loss(pred, batch)
    assert 0.0 < float(loss) < 1.0
    assert float(obj.compute_loss(batch.target, batch)) == pytest.approx(0.0, abs=1e-6)
    # a change more than the SSIM window's half width (2 px) inside the visible patches does not count
    far = batch.keep.clone()
    far = -torch.nn.functional.max_pool2d(-far.float(), 5, stride=1, padding=2) > 0.5  # visible, 2 px in
    assert torch.equal(obj.compute_loss(torch.where(far, pred + 3.0, pred), batch), loss)


# ----------------------------------------------------------------------------------------------- UMD


def test_umd_splits_the_batch_half_clean_half_noisy_with_t_plus_one():
    obj = objective("umd", num_timesteps=T)
    clean = _images(4)
    batch = obj.draw(clean, _gen(1))
    assert batch.noised.tolist() == [False, False, True, True]
    assert _kept_patches(batch.keep) == [4, 4, 10, 10]  # 75 % masked clean, 37.5 % noisy: int(16 * 0.625)
    t = batch.noise_timesteps
    assert t[:2].tolist() == [0, 0] and batch.timesteps[:2].tolist() == [0, 0]
    assert torch.equal(batch.timesteps[2:], t[2:] + 1)  # the network is told t + 1, so 0 means clean
    # clean half: the clean image, blanked; noisy half: x_t at t, blanked
    keep = batch.keep.expand_as(clean)
    assert torch.equal(batch.inputs[:2], clean[:2].masked_fill(~keep[:2], 0.0))
    abar = GaussianNoise(T).alphas_cumprod[t[2:]].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * clean[2:] + (1 - abar).sqrt() * batch.noise[2:]
    torch.testing.assert_close(batch.inputs[2:], x_t.masked_fill(~keep[2:], 0.0))
    assert batch.noise[:2].abs().sum() == 0


def test_umd_loss_is_x0_on_masked_plus_half_noise_on_visible_half_x0_on_masked():
    obj = objective("umd", num_timesteps=T)
    batch = obj.draw(_images(2), _gen(2))
    pred = torch.tanh(batch.target + 0.2)
    keep = batch.keep.expand_as(pred)
    x0_err = (pred - batch.target).square()
    abar = GaussianNoise(T).alphas_cumprod[batch.noise_timesteps[1]].float()
    eps_hat = (batch.noisy[1] - abar.sqrt() * pred[1]) / (1 - abar).sqrt()
    clean_loss = x0_err[0][~keep[0]].mean()
    noisy_loss = 0.5 * (eps_hat - batch.noise[1]).square()[keep[1]].mean() + 0.5 * x0_err[1][~keep[1]].mean()
    torch.testing.assert_close(obj.compute_loss(pred, batch), (clean_loss + noisy_loss) / 2)
    # the clean sample's visible pixels are outside every region: changing them leaves the loss unchanged
    changed = pred.clone()
    changed[0] = torch.where(keep[0], pred[0] + 1.0, pred[0])
    assert torch.equal(obj.compute_loss(changed, batch), obj.compute_loss(pred, batch))


# ----------------------------------------------------------------------------------------------- DiffMAE


def test_diffmae_noises_only_the_masked_patches():
    obj = objective("diffmae", num_timesteps=T)
    clean = _images(3)
    batch = obj.draw(clean, _gen(4))
    assert _kept_patches(batch.keep) == [4, 4, 4]
    keep = batch.keep.expand_as(clean)
    assert torch.equal(batch.inputs[keep], clean[keep])  # visible patches given clean
    abar = GaussianNoise(T).alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * clean + (1 - abar).sqrt() * batch.noise
    torch.testing.assert_close(batch.inputs[~keep], x_t[~keep])
    pred = torch.zeros_like(clean)
    torch.testing.assert_close(obj.compute_loss(pred, batch), clean[~keep].square().mean())
    assert torch.equal(obj.compute_loss(torch.where(keep, pred - 2, pred), batch), obj.compute_loss(pred, batch))


# ----------------------------------------------------------------------------------------------- features


def test_feature_reading_per_objective():
    mdm = objective("mdm", num_timesteps=T).feature_reading(0)
    assert mdm.timestep is None and isinstance(mdm.corruption, PatchMasking) and mdm.corruption.patch_size == 8
    ddpm = objective("ddpm", num_timesteps=T).feature_reading(5)
    assert ddpm.timestep is None and isinstance(ddpm.corruption, GaussianNoise)
    assert ddpm.corruption.shared_noise and ddpm.corruption.noise_seed == 5
    assert objective("mae", timestep=3).feature_reading().timestep == 3
    for name in ("mae", "umd", "diffmae"):
        assert objective(name).feature_reading().corruption is None
    assert objective("umd").feature_reading().timestep == 0 and objective("diffmae").feature_reading().timestep == 0


def test_extractor_default_follows_the_recorded_objective():
    from monai_mdm.networks import MDMFeatureExtractor, MDMUNet

    net = MDMUNet.from_preset("tiny")
    ex = MDMFeatureExtractor(net, blocks=(0,))  # no record: MDM, as before
    assert isinstance(ex.corruption, PatchMasking) and ex.timestep == 50
    net.pretraining = {"source": "x.pt", "objective": objective("umd").record()}
    ex = MDMFeatureExtractor(net, blocks=(0,))
    assert ex.corruption is None and ex.timestep == 0
    net.pretraining = {"source": "x.pt", "objective": objective("ddpm").record()}
    ex = MDMFeatureExtractor(net, blocks=(0,), timestep=150, seed=3)
    assert isinstance(ex.corruption, GaussianNoise) and ex.timestep == 150 and ex.corruption.noise_seed == 3
    net.pretraining = {"source": "x.pt", "objective": {"name": "simmim"}}
    with pytest.raises(ValueError, match="'simmim', which this version cannot read features for"):
        MDMFeatureExtractor(net, blocks=(0,))
    # an explicit corruption is used as given
    assert MDMFeatureExtractor(net, blocks=(0,), corruption=None).timestep == 50


def test_objective_loss_refuses_a_batch_it_did_not_prepare():
    prepare = ObjectivePrepareBatch(objective("mae", num_timesteps=T))
    inputs, target, _, _ = prepare(_images(2))
    prepare.loss_function(inputs, target)
    with pytest.raises(RuntimeError, match="the mae loss is computed for the batch its ObjectivePrepareBatch"):
        prepare.loss_function(inputs, target.clone())
