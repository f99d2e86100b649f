"""Batched image corruptions for diffusion-style training and feature extraction.

The corruption is pluggable because the rest of the pipeline (trainer, feature extractor) only needs
"corrupt this batch at these timesteps": MDM masks patches, a DDPM baseline adds Gaussian noise, and
mixtures of the two can be added later without touching the engines.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from monai.utils import ensure_tuple_rep

__all__ = [
    "Corruption",
    "PatchMasking",
    "patch_grid_shape",
    "patch_keep_mask",
    "random_patch_keep",
    "GaussianNoise",
    "feature_corruption",
    "guided_diffusion_linear_betas",
]


def _patch_sizes(patch_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """One positive patch size per spatial dim (an int is repeated), with an error that names patch_size."""
    try:
        sizes = tuple(int(p) for p in ensure_tuple_rep(patch_size, ndim))
    except ValueError as e:
        raise ValueError(f"patch_size {patch_size!r} must be an int or {ndim} ints, one per spatial dim.") from e
    if any(p < 1 for p in sizes):
        raise ValueError(f"patch_size must be positive, got {sizes}.")
    return sizes


def patch_grid_shape(
    spatial_shape: Sequence[int], patch_size: int | Sequence[int], pad: bool = False
) -> tuple[int, ...]:
    """Number of patches along each spatial dimension.

    Without ``pad`` every size must be a multiple of the patch size, so that all patches are whole and
    the masked fraction is exactly t/T in pixels too. With ``pad=True`` the grid is rounded up and the
    last patch along a dimension is partial (cropped at the border).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    sizes = _patch_sizes(patch_size, len(spatial_shape))
    if not pad:
        for dim, (s, p) in enumerate(zip(spatial_shape, sizes)):
            if s % p != 0:
                raise ValueError(
                    f"spatial size {s} (dimension {dim} of shape {spatial_shape}) is not divisible by the "
                    f"patch size {p}; crop/resize the image or pass pad=True to allow partial border patches."
                )
    return tuple(math.ceil(s / p) for s, p in zip(spatial_shape, sizes))


def patch_keep_mask(
    spatial_shape: Sequence[int],
    timesteps: torch.Tensor,
    patch_size: int | Sequence[int] = 8,
    num_timesteps: int = 1000,
    pad: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel-level keep mask ``(B, 1, *spatial)`` (True = kept) for a batch of timesteps, in one vectorised call.

    For sample b with L patches exactly ``(L * (T - t_b)) // T`` = floor(L * (1 - t_b / T)) patches are kept
    (integer arithmetic, so no float rounding), chosen uniformly at random: the patches with the smallest
    random scores are kept. With a generator, scores are drawn on the generator's device and moved, so a
    CPU generator gives the same mask whatever ``device`` is.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    num_patches = math.prod(patch_grid_shape(spatial_shape, patch_size, pad))  # checks patch_size

    if device is None:
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else torch.device("cpu")
    t = torch.as_tensor(timesteps, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers, got dtype {t.dtype}.")
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}.")
    t = t.long()
    if t.numel() > 0 and bool(((t < 0) | (t >= num_timesteps)).any()):
        raise ValueError(
            f"timesteps must lie in [0, {num_timesteps}), got min {int(t.min())} and max {int(t.max())}."
        )
    n_keep = (num_patches * (num_timesteps - t)) // num_timesteps  # (B,)
    return random_patch_keep(spatial_shape, n_keep, patch_size, pad, device, generator)


def random_patch_keep(
    spatial_shape: Sequence[int],
    num_keep: torch.Tensor,
    patch_size: int | Sequence[int] = 8,
    pad: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel-level keep mask ``(B, 1, *spatial)`` keeping exactly ``num_keep[b]`` random patches of sample b.

    The one place patches are drawn: :func:`patch_keep_mask` (MDM, a count from t) and the fixed mask ratios of
    the other objectives (:mod:`monai_mdm.transforms.objectives`) both call it. The patches with the smallest
    random scores are kept; with a generator, scores are drawn on the generator's device and moved.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    grid = patch_grid_shape(spatial_shape, patch_size, pad)  # checks patch_size
    sizes = _patch_sizes(patch_size, len(spatial_shape))
    num_patches = math.prod(grid)
    if device is None:
        device = num_keep.device if isinstance(num_keep, torch.Tensor) else torch.device("cpu")
    n_keep = torch.as_tensor(num_keep, device=device).long()
    if n_keep.ndim != 1:
        raise ValueError(f"num_keep must have shape (B,), got {tuple(n_keep.shape)}.")
    batch = n_keep.shape[0]

    if generator is None:
        scores = torch.rand(batch, num_patches, device=device)
    else:
        scores = torch.rand(batch, num_patches, device=generator.device, generator=generator).to(device)
    order = scores.argsort(dim=1)  # a uniformly random permutation of the patches per sample
    keep_in_order = torch.arange(num_patches, device=device).unsqueeze(0) < n_keep.unsqueeze(1)
    keep = torch.zeros_like(keep_in_order).scatter_(1, order, keep_in_order)  # (B, L)

    # patch grid -> pixels: interleave a size-p axis after every grid axis, expand, merge, crop the border
    keep = keep.view(batch, 1, *[g for g_ in grid for g in (g_, 1)])
    keep = keep.expand(batch, 1, *[v for g, p in zip(grid, sizes) for v in (g, p)])
    keep = keep.reshape(batch, 1, *[g * p for g, p in zip(grid, sizes)])
    if any(g * p != s for g, p, s in zip(grid, sizes, spatial_shape)):
        keep = keep[(slice(None), slice(None), *[slice(0, s) for s in spatial_shape])]
    return keep


class Corruption(ABC):
    """Corrupts a whole batch at per-sample timesteps.

    Pluggable so that training and feature extraction do not care which corruption is used: patch masking
    (MDM) now, Gaussian noise (the DDPM baseline) or mixtures later. Implementations must be vectorised
    over the batch and stay on the images' device.
    """

    num_timesteps: int

    @abstractmethod
    def __call__(
        self, images: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return the corrupted ``images`` (B, C, *spatial) at ``timesteps`` (B,) in [0, num_timesteps)."""
        raise NotImplementedError


class PatchMasking(Corruption):
    """MDM corruption: blank a fraction t/T of non-overlapping patches, chosen uniformly per sample.

    Args:
        patch_size: patch edge (int, cubic patches) or one size per spatial dimension; works for 2D and 3D.
        num_timesteps: T; timesteps must lie in [0, T).
        fill_value: value of masked pixels; 0 is mid-grey for images scaled to [-1, 1].
        pad: allow spatial sizes that are not multiples of the patch size; the patch grid is then rounded
            up and border patches are partial (they count as whole patches in the kept-patch count, so the
            masked pixel fraction is only approximately t/T).
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 8,
        num_timesteps: int = 1000,
        fill_value: float = 0.0,
        pad: bool = False,
    ) -> None:
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        if not isinstance(patch_size, int):
            patch_size = tuple(int(p) for p in patch_size)
        self.patch_size = patch_size
        self.num_timesteps = int(num_timesteps)
        self.fill_value = fill_value
        self.pad = pad

    def keep_mask(
        self,
        spatial_shape: Sequence[int],
        timesteps: torch.Tensor,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Boolean keep mask ``(B, 1, *spatial_shape)``, True where pixels are kept."""
        return patch_keep_mask(
            spatial_shape,
            timesteps,
            patch_size=self.patch_size,
            num_timesteps=self.num_timesteps,
            pad=self.pad,
            device=device,
            generator=generator,
        )

    def __call__(
        self, images: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.ndim < 3:
            raise ValueError(f"images must have shape (B, C, *spatial), got {tuple(images.shape)}.")
        timesteps = torch.as_tensor(timesteps, device=images.device)
        if timesteps.ndim != 1 or timesteps.shape[0] != images.shape[0]:
            raise ValueError(
                f"timesteps must have shape ({images.shape[0]},) to match the batch, got {tuple(timesteps.shape)}."
            )
        keep = self.keep_mask(images.shape[2:], timesteps, images.device, generator)
        return images.masked_fill(~keep, self.fill_value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patch_size={self.patch_size}, num_timesteps={self.num_timesteps}, "
            f"fill_value={self.fill_value}, pad={self.pad})"
        )


def guided_diffusion_linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """guided-diffusion's "linear" betas in float64: ``linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)``.

    Kept as a plain formula so tests (and users) can check the MONAI scheduler against the schedule the
    released DDPM / DDPM-seg models were trained with; for T = 1000 it is DDPM's 1e-4 .. 0.02.
    """
    scale = 1000.0 / int(num_timesteps)
    return torch.linspace(1e-4 * scale, 0.02 * scale, int(num_timesteps), dtype=torch.float64)


class GaussianNoise(Corruption):
    """DDPM baseline corruption: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the linear beta schedule.

    The schedule and the mixing come from MONAI's :class:`monai.networks.schedulers.DDPMScheduler`
    (``schedule="linear_beta"``) with beta range ``1e-4 * 1000 / T .. 0.02 * 1000 / T``, which is
    guided-diffusion's "linear" schedule (DDPM's 1e-4 .. 0.02 for T = 1000), so features match those of the
    released DDPM-seg models.

    Args:
        num_timesteps: T; timesteps must lie in [0, T).
        shared_noise: DDPM-seg's feature extraction: ONE noise sample, drawn once from a CPU generator seeded with
            ``noise_seed`` for the ``(C, *spatial)`` shape, added to every image on every call (the ``generator``
            argument is then ignored). False: fresh noise per image and call, from ``generator`` when given.
        noise_seed: seed of the shared noise sample.
    """

    def __init__(self, num_timesteps: int = 1000, shared_noise: bool = False, noise_seed: int = 0) -> None:
        from monai.networks.schedulers import DDPMScheduler

        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        self.num_timesteps = int(num_timesteps)
        self.shared_noise = bool(shared_noise)
        self.noise_seed = int(noise_seed)
        scale = 1000.0 / self.num_timesteps
        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_timesteps,
            schedule="linear_beta",
            beta_start=1e-4 * scale,
            beta_end=0.02 * scale,
        )
        self._shared: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def betas(self) -> torch.Tensor:
        return self.scheduler.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def shared_noise_sample(self, shape: Sequence[int]) -> torch.Tensor:
        """The fixed noise ``(C, *spatial)`` for ``shape`` (CPU, float32), drawn once and cached."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._shared:
            gen = torch.Generator().manual_seed(self.noise_seed)
            self._shared[shape] = torch.randn(shape, generator=gen, dtype=torch.float32)
        return self._shared[shape]

    def noise_like(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The eps that :meth:`__call__` adds to ``images`` (float32, on the images' device)."""
        if self.shared_noise:
            eps = self.shared_noise_sample(images.shape[1:]).to(images.device)
            return eps.unsqueeze(0).expand(images.shape[0], *eps.shape)
        if generator is None:
            return torch.randn(images.shape, device=images.device, dtype=torch.float32)
        # drawn on the generator's device and moved, so a CPU generator gives the same noise on any device
        return torch.randn(images.shape, generator=generator, device=generator.device, dtype=torch.float32).to(
            images.device
        )

    def __call__(
        self, images: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.noised(images, timesteps, generator)[0]

    def noised(
        self, images: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, eps)``: what :meth:`__call__` returns and the noise it added (for losses on the noise)."""
        if images.ndim < 3:
            raise ValueError(f"images must have shape (B, C, *spatial), got {tuple(images.shape)}.")
        t = torch.as_tensor(timesteps, device=images.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}.")
        if t.ndim != 1 or t.shape[0] != images.shape[0]:
            raise ValueError(
                f"timesteps must have shape ({images.shape[0]},) to match the batch, got {tuple(t.shape)}."
            )
        t = t.long()
        if t.numel() and bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}), got min {int(t.min())} and max {int(t.max())}."
            )
        eps = self.noise_like(images, generator)
        # mix in float32: add_noise casts the scheduler's alphas_cumprod to the input dtype and keeps it
        noisy = self.scheduler.add_noise(images.float(), eps, t)
        return noisy.to(images.dtype), eps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_timesteps={self.num_timesteps}, shared_noise={self.shared_noise}, "
            f"noise_seed={self.noise_seed})"
        )


def feature_corruption(corruption: str, seed: int | None = 0) -> Corruption | str:
    """The corruption a few-shot bundle's ``corruption`` setting names for reading features.

    ``"objective"``: the extractor's default, the way the pretraining objective recorded in the weights reads
    features (MDM's patch masking for files without a record). ``"ddpm"``: Gaussian noise at the feature timestep
    with one noise sample shared by every image (the DDPM-features baseline). Any other name is refused, so that a
    typo cannot silently fall back to the default.
    """
    if corruption == "objective":
        return "default"
    if corruption == "ddpm":
        return GaussianNoise(shared_noise=True, noise_seed=seed)
    raise ValueError(
        f"corruption '{corruption}' is not known; set --corruption to 'objective' (features as the pretraining "
        "objective defines them, MDM's masking by default) or 'ddpm' (Gaussian noise)."
    )
