"""GaussianNoise: the DDPM / DDPM-seg baseline corruption, its schedule, shared noise and persistence."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from monai_mdm.inferers import MDMSegmenter
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble
from monai_mdm.transforms import GaussianNoise, PatchMasking, guided_diffusion_linear_betas


def _images(b=2, c=3, size=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, *size, generator=g) * 2 - 1


def test_monai_linear_beta_equals_guided_diffusion_linear_schedule():
    gd = guided_diffusion_linear_betas(1000)  # linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T), float64
    assert gd[0].item() == pytest.approx(1e-4) and gd[-1].item() == pytest.approx(0.02)
    plain = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")  # MONAI's own defaults
    torch.testing.assert_close(plain.betas.double(), gd, atol=0, rtol=1e-6)  # float32 rounding only
    ours = GaussianNoise(1000)
    torch.testing.assert_close(ours.betas.double(), gd, atol=0, rtol=1e-6)
    abar = torch.cumprod(1 - gd, dim=0)
    torch.testing.assert_close(ours.alphas_cumprod.double(), abar, rtol=1e-4, atol=1e-9)


def test_other_step_counts_scale_betas_like_guided_diffusion():
    ours = GaussianNoise(500)
    torch.testing.assert_close(ours.betas.double(), guided_diffusion_linear_betas(500), atol=0, rtol=1e-6)
    assert ours.betas[-1].item() == pytest.approx(0.04)


def test_mixing_formula():
    x0 = _images()
    c = GaussianNoise(1000)
    t = torch.tensor([10, 600])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xt = c(x0, t, generator=g1)
    eps = c.noise_like(x0, g2)
    abar = guided_diffusion_linear_betas(1000).neg().add(1).cumprod(0)[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-5, rtol=1e-5)
    assert xt.dtype == x0.dtype and xt.shape == x0.shape


def test_shared_noise_identical_across_images_and_calls():
    c = GaussianNoise(1000, shared_noise=True, noise_seed=7)
    x0 = _images(b=3)
    t = torch.full((3,), 400)
    abar = c.alphas_cumprod[400].item()
    eps1 = (c(x0, t) - abar**0.5 * x0) / (1 - abar) ** 0.5
    torch.testing.assert_close(eps1[0], eps1[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(eps1[0], eps1[2], atol=1e-5, rtol=0)
    # another call, other images, a generator passed: still the same sample
    x1 = _images(b=2, seed=9)
    eps2 = (c(x1, t[:2], generator=torch.Generator().manual_seed(123)) - abar**0.5 * x1) / (1 - abar) ** 0.5
    torch.testing.assert_close(eps2[0], eps1[0], atol=1e-5, rtol=0)
    # it is the seeded draw for the (C, *spatial) shape, and a fresh instance with the same seed agrees
    expected = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c.shared_noise_sample((3, 16, 16)), expected)
    torch.testing.assert_close(GaussianNoise(1000, True, 7)(x0, t), c(x0, t))
    assert c.shared_noise_sample((3, 16, 16)) is c.shared_noise_sample((3, 16, 16))  # cached per shape
    assert c.shared_noise_sample((3, 8, 8)).shape == (3, 8, 8)
    assert not torch.equal(GaussianNoise(1000, True, 8)(x0, t), c(x0, t))


def test_fresh_noise_differs_per_image_and_follows_the_generator():
    c = GaussianNoise(1000, shared_noise=False)
    x0 = torch.zeros(2, 3, 16, 16)
    t = torch.full((2,), 999)
    out = c(x0, t)
    assert not torch.allclose(out[0], out[1])
    assert not torch.equal(c(x0, t), c(x0, t))
    a = c(x0, t, generator=torch.Generator().manual_seed(1))
    b = c(x0, t, generator=torch.Generator().manual_seed(1))
    d = c(x0, t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_statistics_at_both_ends_of_the_schedule():
    c = GaussianNoise(1000)
    x0 = _images(b=4, size=(64, 64))
    g = torch.Generator().manual_seed(0)
    early = c(x0, torch.zeros(4, dtype=torch.long), generator=g)
    # t = 0: beta_0 = 1e-4, so x_0 is barely touched (noise std sqrt(1e-4) = 0.01)
    assert (early - x0).std().item() == pytest.approx(0.01, rel=0.05)
    late = c(x0, torch.full((4,), 999), generator=g)
    # t = 999: abar ~ 4e-5, x_t is almost pure N(0, 1) noise, uncorrelated with x0
    assert c.alphas_cumprod[999].item() < 1e-4
    assert abs(late.mean().item()) < 0.02
    assert late.std().item() == pytest.approx(1.0, abs=0.02)
    corr = torch.corrcoef(torch.stack([late.flatten(), x0.flatten()]))[0, 1].item()
    assert abs(corr) < 0.03


def test_invalid_timesteps():
    c = GaussianNoise(100)
    x0 = _images()
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        c(x0, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="integers"):
        c(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        c(x0, torch.tensor([1]))
    with pytest.raises(ValueError, match="positive"):
        GaussianNoise(0)


@pytest.fixture(scope="module")
def net() -> MDMUNet:
    torch.manual_seed(0)
    network = MDMUNet.from_preset("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero everywhere (the zero-initialised convs would hide input differences)
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return network.eval()


def test_feature_extractor_with_gaussian_noise_is_deterministic(net):
    images = _images(b=2, size=(32, 32))
    shared = MDMFeatureExtractor(net, blocks=(6, 7), timestep=250, corruption=GaussianNoise(1000, True, 0), seed=None)
    f1, f2 = shared(images), shared(images)
    assert torch.equal(f1, f2)  # no per-call randomness even without a seed
    assert f1.shape == (2, shared.out_channels, 32, 32)
    seeded = MDMFeatureExtractor(net, blocks=(6, 7), timestep=250, corruption=GaussianNoise(1000), seed=4)
    assert torch.equal(seeded(images), seeded(images))
    # the noise really reaches the network
    clean = MDMFeatureExtractor(net, blocks=(6, 7), timestep=250, corruption=None, seed=None)
    assert not torch.allclose(clean(images), f1, atol=1e-4)
    # fresh noise without a seed: runs differ, as in a DDPM without the shared sample
    fresh = MDMFeatureExtractor(net, blocks=(6, 7), timestep=250, corruption=GaussianNoise(1000), seed=None)
    assert not torch.equal(fresh(images), fresh(images))


def test_segmenter_save_load_round_trip_with_gaussian_noise(net, tmp_path):
    ex = MDMFeatureExtractor(net, blocks=(6, 7), timestep=50, corruption=GaussianNoise(1000, True, 11), seed=None)
    torch.manual_seed(2)
    seg = MDMSegmenter(ex, PixelHeadEnsemble(ex.out_channels, 3, num_heads=2), ["a", "b", "c"]).eval()
    path = tmp_path / "seg.pt"
    seg.save(path)
    loaded = MDMSegmenter.load(path)
    c = loaded.extractor.corruption
    assert isinstance(c, GaussianNoise)
    assert (c.num_timesteps, c.shared_noise, c.noise_seed) == (1000, True, 11)
    images = _images(b=1, size=(32, 32), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), seg(images))
    # PatchMasking still round-trips as before
    ex2 = MDMFeatureExtractor(net, blocks=(6, 7), corruption=PatchMasking(8, 1000), seed=0)
    seg2 = MDMSegmenter(ex2, PixelHeadEnsemble(ex2.out_channels, 3)).eval()
    seg2.save(tmp_path / "seg2.pt")
    assert isinstance(MDMSegmenter.load(tmp_path / "seg2.pt").extractor.corruption, PatchMasking)


def test_feature_corruption_setting_names_the_objective_or_ddpm_and_nothing_else():
    from monai_mdm.transforms import feature_corruption

    assert feature_corruption("objective") == "default"
    ddpm = feature_corruption("ddpm", seed=3)
    assert isinstance(ddpm, GaussianNoise) and ddpm.shared_noise and ddpm.noise_seed == 3
    with pytest.raises(ValueError, match=r"corruption 'mask' is not known; set --corruption to 'objective'"):
        feature_corruption("mask")
