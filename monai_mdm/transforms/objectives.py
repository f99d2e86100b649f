"""Pretraining objectives of the masked-diffusion family, each one object: timesteps, corruption, loss, features.

MDM, MAE, UMD, DiffMAE and DDPM differ only in how a clean batch is corrupted and which timestep the network is
told (:meth:`Objective.draw`), where and on what the loss is taken (:meth:`Objective.compute_loss`) and how
pixel features are read from the pretrained network (:meth:`Objective.feature_reading`). An objective is
chosen by name with :func:`objective`, recorded in every pretraining checkpoint (:meth:`Objective.record`) and
rebuilt from that record by :func:`objective_from_record`, so feature extraction follows the checkpoint.

Why this module sits in ``transforms`` beside :mod:`~monai_mdm.transforms.corruption`: an objective is read at
both ends of the pipeline, by the pretraining engine (:class:`monai_mdm.engines.ObjectivePrepareBatch`) and by
the feature extractor (:class:`monai_mdm.networks.MDMFeatureExtractor`), and ``transforms`` is the lowest
package both already import; ``engines`` imports ``networks``, so an objective placed there could not be read
by the extractor without a cycle. Its losses come from :mod:`monai_mdm.losses`, which imports only MONAI.

Definitions (UMD follows its public code where the paper differs; see the pretraining bundle's README):

- ``mdm``: t ~ U[0, T) per sample, floor(L (1 - t/T)) of the L patches kept, masked pixels 0, x0 predicted,
  loss (SSIM by default) on the whole image; features at the extractor's t (50) with t/T of patches masked.
- ``mae``: a fixed mask ratio (0.75: int(L (1 - 0.75)) patches kept, as MAE's code counts), one fixed timestep
  told to the network, loss on the masked patches only (MSE; L1 or SSIM selectable); features of the clean
  image at that timestep.
- ``umd``: the first half of a batch (B // 2 samples) clean: t = 0, no noise, 75 % of patches masked, x0 loss
  on the masked patches. The rest noisy: x_t at t ~ U[0, T), then 37.5 % of patches masked, the network told
  t + 1 (0 means clean); loss 0.5 x noise MSE on the visible patches + 0.5 x x0 MSE on the masked ones, the
  noise estimate derived from the predicted x0 with the schedule. Features of the clean image at t = 0.
- ``diffmae``: 75 % of patches masked, Gaussian noise at t ~ U[0, T) on the masked patches only (visible ones
  clean), x0 predicted, MSE on the masked patches; features of the clean image at t = 0.
- ``ddpm``: Gaussian noise everywhere at t ~ U[0, T), x0 predicted, loss on the whole image; features with
  DDPM-seg's one shared noise sample at the extractor's t.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monai_mdm.transforms.corruption import (
    Corruption,
    GaussianNoise,
    PatchMasking,
    patch_grid_shape,
    random_patch_keep,
)

__all__ = [
    "OBJECTIVES",
    "FeatureReading",
    "LossTerm",
    "Objective",
    "ObjectiveBatch",
    "MDMObjective",
    "MAEObjective",
    "UMDObjective",
    "DiffMAEObjective",
    "DDPMObjective",
    "objective",
    "objective_from_record",
    "ratio_keep_count",
]

OBJECTIVES = ("mdm", "mae", "umd", "diffmae", "ddpm")


@dataclass(frozen=True)
class LossTerm:
    """One part of an objective's loss: ``weight`` x the error of ``target`` ("x0" or "noise") over ``region``.

    ``region`` (B, 1, *spatial) bool: the pixels scored (None: the whole image); ``samples`` (B,) bool: the
    samples the term applies to (None: all of them).
    """

    weight: float
    target: str
    region: torch.Tensor | None = None
    samples: torch.Tensor | None = None


@dataclass
class ObjectiveBatch:
    """One training step of an objective, with everything its loss and the tests need to see.

    inputs: what the network sees; timesteps: what it is told (B,); target: the clean images (the network
    predicts x0); keep: (B, 1, *spatial) True where patches are visible (None: no patch is blanked); noisy /
    noise / noise_timesteps: x_t before blanking, the eps added and the schedule's t (None without noise);
    noised: (B,) True for the samples that received noise; terms: the loss terms.
    """

    inputs: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    terms: tuple[LossTerm, ...]
    keep: torch.Tensor | None = None
    noisy: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    noise_timesteps: torch.Tensor | None = None
    noised: torch.Tensor | None = None


@dataclass(frozen=True)
class FeatureReading:
    """How features are read from a network this objective pretrained.

    timestep: the t the network is told (None: the extractor's own ``timestep``); corruption: applied to the
    image first (None: the clean image).
    """

    timestep: int | None
    corruption: Corruption | None


def ratio_keep_count(num_patches: int, mask_ratio: float) -> int:
    """Patches kept at ``mask_ratio``: ``int(L * (1 - ratio))``, the count MAE's code uses (so >= 1 is masked)."""
    return int(num_patches * (1.0 - float(mask_ratio)))


def _check_ratio(value: Any, setting: str = "mask_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{setting} must be a number in (0, 1), got {value!r}.")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"--{setting} must lie in (0, 1) (the fraction of patches masked), got {value}.")
    return float(value)


def _randint(low: int, high: int, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randint(low, high, (n,), device=device, dtype=torch.long)
    return torch.randint(low, high, (n,), generator=generator, device=generator.device, dtype=torch.long).to(device)


def _per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims, to broadcast a per-sample choice over images."""
    return mask.view(-1, *([1] * (ndim - 1)))


class Objective(ABC):
    """A pretraining objective: what a training step looks like and how features are read afterwards.

    Args:
        patch_size: patch edge (int) or one size per spatial dim, for the objectives that blank patches.
        num_timesteps: T, the noise schedule's length (guided-diffusion's linear betas) and the timestep range.
        loss: ``"default"`` (the objective's own, :attr:`default_loss`) or one of :attr:`loss_choices`.
        spatial_dims: 2 or 3, for the SSIM window.
        fill_value: value of blanked pixels (0 is mid-grey in [-1, 1]).
    """

    name: str = ""
    default_loss: str = "mse"
    loss_choices: tuple[str, ...] = ("mse",)
    uses_patches: bool = True
    needs_noise_schedule: bool = False

    def __init__(
        self,
        patch_size: int | Sequence[int] = 8,
        num_timesteps: int = 1000,
        loss: str = "default",
        spatial_dims: int = 2,
        fill_value: float = 0.0,
    ) -> None:
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"--num_timesteps must be a positive integer, got {num_timesteps!r}.")
        self.patch_size = patch_size if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        self.num_timesteps = int(num_timesteps)
        key = self.default_loss if loss in (None, "default") else str(loss).lower()
        if key not in self.loss_choices:
            raise ValueError(
                f"--loss {loss!r} is not available with --objective {self.name}; choose one of "
                f"{', '.join(self.loss_choices)} (or default, which is {self.default_loss})."
            )
        self.loss = key
        self.spatial_dims = int(spatial_dims)
        self.fill_value = float(fill_value)
        self._whole_loss: torch.nn.Module | None = None
        self._region_loss: torch.nn.Module | None = None
        self._schedule: GaussianNoise | None = None

    # ------------------------------------------------------------------ what is recorded

    def parameters(self) -> dict[str, Any]:
        """The settings that define this objective (written into checkpoints, enough to rebuild it)."""
        params: dict[str, Any] = {"num_timesteps": self.num_timesteps, "loss": self.loss}
        if self.uses_patches:
            ps = self.patch_size
            params["patch_size"] = ps if isinstance(ps, int) else list(ps)
        return params

    def record(self) -> dict[str, Any]:
        """``{"name": ..., **parameters}``: what the pretraining bundle writes under ``pretraining["objective"]``."""
        return {"name": self.name, **self.parameters()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ training step

    @property
    def schedule(self) -> GaussianNoise:
        """The Gaussian corruption whose schedule (alphas_cumprod) and noise this objective uses."""
        if self._schedule is None:
            self._schedule = GaussianNoise(self.num_timesteps)
        return self._schedule

    def num_patches(self, spatial_shape: Sequence[int]) -> int:
        return math.prod(patch_grid_shape(spatial_shape, self.patch_size))

    def _keep(self, clean: torch.Tensor, ratios: Sequence[float], generator: torch.Generator | None) -> torch.Tensor:
        """Keep mask with ``int(L (1 - ratio_b))`` patches kept for sample b."""
        num = self.num_patches(clean.shape[2:])
        counts = torch.tensor([ratio_keep_count(num, r) for r in ratios], dtype=torch.long, device=clean.device)
        return random_patch_keep(clean.shape[2:], counts, self.patch_size, device=clean.device, generator=generator)

    @staticmethod
    def _check_images(clean: torch.Tensor) -> None:
        if clean.ndim < 3:
            raise ValueError(f"images must have shape (B, C, *spatial), got {tuple(clean.shape)}.")

    @abstractmethod
    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        """A training step for clean images (B, C, *spatial) in [-1, 1]; random draws from ``generator`` if given."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loss

    def compute_loss(self, pred: torch.Tensor, batch: ObjectiveBatch) -> torch.Tensor:
        """The scalar loss of the predicted clean images ``pred`` for ``batch`` (from :meth:`draw`).

        A single whole-image x0 term uses :func:`~monai_mdm.losses.reconstruction_loss` as is. Otherwise each
        term is a per-sample masked mean over its region (SSIM: the SSIM map averaged over it), weighted and
        summed per sample, then averaged over the batch.
        """
        from monai_mdm.losses.reconstruction import RegionReconstructionLoss, reconstruction_loss

        terms = batch.terms
        if len(terms) == 1 and terms[0].region is None and terms[0].samples is None and terms[0].target == "x0":
            if self._whole_loss is None:
                self._whole_loss = reconstruction_loss(self.loss, spatial_dims=self.spatial_dims)
            return terms[0].weight * self._whole_loss(pred, batch.target)
        if self._region_loss is None:
            self._region_loss = RegionReconstructionLoss(self.loss, spatial_dims=self.spatial_dims)
        total = pred.new_zeros(pred.shape[0], dtype=torch.float32)
        whole = torch.ones_like(batch.target[:, :1], dtype=torch.bool)
        for term in terms:
            if term.target == "x0":
                estimate, truth = pred, batch.target
            elif term.target == "noise":
                estimate, truth = self.noise_estimate(pred, batch), batch.noise
            else:
                raise ValueError(f"unknown loss target {term.target!r}; use 'x0' or 'noise'.")
            region = whole if term.region is None else term.region
            value = self._region_loss(estimate, truth, region)
            if term.samples is not None:
                value = value * term.samples.to(value.dtype)
            total = total + term.weight * value
        return total.mean()

    def noise_estimate(self, pred: torch.Tensor, batch: ObjectiveBatch) -> torch.Tensor:
        """eps derived from the predicted x0: ``(x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)`` (float32)."""
        if batch.noisy is None or batch.noise_timesteps is None:
            raise ValueError(f"objective {self.name}: a noise loss needs a batch drawn with noise.")
        abar = self.schedule.alphas_cumprod.to(pred.device, torch.float32)[batch.noise_timesteps]
        abar = _per_sample(abar, pred.ndim)
        return (batch.noisy.float() - abar.sqrt() * pred.float()) / (1.0 - abar).sqrt()

    # ------------------------------------------------------------------ features

    @abstractmethod
    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        """The timestep and corruption features are read at (``seed``: the extractor's, for fixed noise)."""
        raise NotImplementedError


class MDMObjective(Objective):
    """MDM: t/T of the patches blanked (t uniform per sample), x0 predicted, loss on the whole image."""

    name = "mdm"
    default_loss = "ssim"
    loss_choices = ("ssim", "mse", "l1")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.corruption = PatchMasking(self.patch_size, self.num_timesteps, self.fill_value)

    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        self._check_images(clean)
        t = _randint(0, self.num_timesteps, clean.shape[0], clean.device, generator)
        keep = self.corruption.keep_mask(clean.shape[2:], t, clean.device, generator)
        inputs = clean.masked_fill(~keep, self.fill_value)
        return ObjectiveBatch(inputs, t, clean, (LossTerm(1.0, "x0"),), keep=keep)

    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        return FeatureReading(None, PatchMasking(self.patch_size, self.num_timesteps, self.fill_value))


class DDPMObjective(Objective):
    """DDPM: Gaussian noise at t ~ U[0, T) on the whole image, x0 predicted, loss on the whole image."""

    name = "ddpm"
    default_loss = "ssim"
    loss_choices = ("ssim", "mse", "l1")
    uses_patches = False
    needs_noise_schedule = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.corruption = self.schedule

    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        self._check_images(clean)
        t = _randint(0, self.num_timesteps, clean.shape[0], clean.device, generator)
        noisy, eps = self.schedule.noised(clean, t, generator)
        noised = torch.ones_like(t, dtype=torch.bool)
        return ObjectiveBatch(noisy, t, clean, (LossTerm(1.0, "x0"),), None, noisy, eps, t, noised)

    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        noise_seed = 0 if seed is None else int(seed)
        return FeatureReading(None, GaussianNoise(self.num_timesteps, shared_noise=True, noise_seed=noise_seed))


class MAEObjective(Objective):
    """MAE: a fixed ratio of patches blanked, one fixed timestep told to the network, loss on the masked patches.

    Args:
        mask_ratio: fraction of patches masked, in (0, 1); 0.75 as in MAE.
        timestep: the t the network is always told (training and features), in [0, T).
    """

    name = "mae"
    default_loss = "mse"
    loss_choices = ("mse", "l1", "ssim")

    def __init__(self, *args: Any, mask_ratio: float = 0.75, timestep: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_ratio = _check_ratio(mask_ratio)
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < self.num_timesteps:
            raise ValueError(
                f"--objective mae: timestep must be an integer in [0, {self.num_timesteps}), got {timestep!r}."
            )
        self.timestep = int(timestep)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "mask_ratio": self.mask_ratio, "timestep": self.timestep}

    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        self._check_images(clean)
        b = clean.shape[0]
        keep = self._keep(clean, [self.mask_ratio] * b, generator)
        t = torch.full((b,), self.timestep, dtype=torch.long, device=clean.device)
        inputs = clean.masked_fill(~keep, self.fill_value)
        return ObjectiveBatch(inputs, t, clean, (LossTerm(1.0, "x0", ~keep),), keep=keep)

    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        return FeatureReading(self.timestep, None)


class UMDObjective(Objective):
    """UMD (its public code): half of each batch masked clean, half noised then masked; features at t = 0 clean.

    Args:
        mask_ratio: masked fraction in the clean half (0.75).
        noisy_mask_ratio: masked fraction in the noisy half; None = half of ``mask_ratio`` (0.375).
    """

    name = "umd"
    needs_noise_schedule = True

    def __init__(
        self, *args: Any, mask_ratio: float = 0.75, noisy_mask_ratio: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mask_ratio = _check_ratio(mask_ratio)
        noisy = self.mask_ratio / 2 if noisy_mask_ratio is None else noisy_mask_ratio
        self.noisy_mask_ratio = _check_ratio(noisy, "noisy_mask_ratio")

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "mask_ratio": self.mask_ratio, "noisy_mask_ratio": self.noisy_mask_ratio}

    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        self._check_images(clean)
        b = clean.shape[0]
        n_clean = b // 2  # the first B // 2 samples stay clean, the rest are noised
        is_noisy = torch.arange(b, device=clean.device) >= n_clean
        t = _randint(0, self.num_timesteps, b, clean.device, generator).masked_fill(~is_noisy, 0)
        x_t, eps = self.schedule.noised(clean, t, generator)
        noisy = torch.where(_per_sample(is_noisy, clean.ndim), x_t, clean)
        eps = eps.masked_fill(~_per_sample(is_noisy, eps.ndim), 0.0)
        keep = self._keep(clean, [self.mask_ratio] * n_clean + [self.noisy_mask_ratio] * (b - n_clean), generator)
        inputs = noisy.masked_fill(~keep, self.fill_value)
        told = torch.where(is_noisy, t + 1, torch.zeros_like(t))  # 0 means clean, t + 1 the noise level
        terms = (
            LossTerm(1.0, "x0", ~keep, ~is_noisy),
            LossTerm(0.5, "noise", keep, is_noisy),
            LossTerm(0.5, "x0", ~keep, is_noisy),
        )
        return ObjectiveBatch(inputs, told, clean, terms, keep, noisy, eps, t, is_noisy)

    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        return FeatureReading(0, None)


class DiffMAEObjective(Objective):
    """DiffMAE: noise at t only on the masked patches (visible ones clean), x0 predicted, MSE on the masked ones.

    Args:
        mask_ratio: fraction of patches masked (0.75).
    """

    name = "diffmae"
    needs_noise_schedule = True

    def __init__(self, *args: Any, mask_ratio: float = 0.75, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_ratio = _check_ratio(mask_ratio)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "mask_ratio": self.mask_ratio}

    def draw(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveBatch:
        self._check_images(clean)
        b = clean.shape[0]
        t = _randint(0, self.num_timesteps, b, clean.device, generator)
        x_t, eps = self.schedule.noised(clean, t, generator)
        keep = self._keep(clean, [self.mask_ratio] * b, generator)
        inputs = torch.where(keep, clean, x_t)
        noised = torch.ones_like(t, dtype=torch.bool)
        return ObjectiveBatch(inputs, t, clean, (LossTerm(1.0, "x0", ~keep),), keep, x_t, eps, t, noised)

    def feature_reading(self, seed: int | None = 0) -> FeatureReading:
        return FeatureReading(0, None)


_CLASSES: dict[str, type[Objective]] = {
    "mdm": MDMObjective,
    "mae": MAEObjective,
    "umd": UMDObjective,
    "diffmae": DiffMAEObjective,
    "ddpm": DDPMObjective,
}
_RATIO_OBJECTIVES = tuple(n for n in OBJECTIVES if n in ("mae", "umd", "diffmae"))


def objective(name: str = "mdm", mask_ratio: float | None = None, **kwargs: Any) -> Objective:
    """The objective called ``name`` (one of :data:`OBJECTIVES`), the pretraining bundle's ``--objective``.

    ``mask_ratio`` (None: the objective's own) applies to mae, umd (its clean half; the noisy half masks half as
    much unless ``noisy_mask_ratio`` is given) and diffmae; the other keyword arguments go to the objective
    (``patch_size``, ``num_timesteps``, ``loss``, ``spatial_dims``, ``fill_value``, mae's ``timestep``).
    """
    key = str(name).lower() if isinstance(name, str) else name
    if key not in _CLASSES:
        raise ValueError(f"--objective {name!r} is not known; choose one of {', '.join(OBJECTIVES)}.")
    if mask_ratio is not None:
        if key not in _RATIO_OBJECTIVES:
            raise ValueError(
                f"--mask_ratio {mask_ratio} does not apply to --objective {key}, whose masked fraction is set "
                f"by t (leave --mask_ratio null, or choose one of {', '.join(_RATIO_OBJECTIVES)})."
            )
        kwargs["mask_ratio"] = mask_ratio
    try:
        return _CLASSES[key](**kwargs)
    except TypeError as e:
        raise ValueError(f"--objective {key}: {e}") from e


def objective_from_record(
    record: Mapping[str, Any] | None, num_timesteps: int = 1000, source: str = "the pretrained weights"
) -> Objective:
    """The objective a checkpoint's ``pretraining["objective"]`` record describes; no record means MDM.

    Raises:
        ValueError: the record names an objective this version does not know (features could not be read the
            way it defines), an objective that needs a noise schedule records none, or the record is damaged.
    """
    if record is None:
        return objective("mdm", num_timesteps=int(num_timesteps))
    if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
        raise ValueError(
            f"{source}: its pretraining record has a damaged 'objective' entry ({record!r}), so features cannot be "
            "read the way it was pretrained; point --pretrained_weights at a file written by the pretraining bundle."
        )
    name = record["name"]
    if name not in _CLASSES:
        raise ValueError(
            f"{source} was pretrained with objective {name!r}, which this version cannot read features for (it "
            f"knows {', '.join(OBJECTIVES)}); point --pretrained_weights at weights pretrained with one of them."
        )
    params = {k: v for k, v in record.items() if k != "name"}
    if _CLASSES[name].needs_noise_schedule and not isinstance(params.get("num_timesteps"), int):
        raise ValueError(
            f"{source} was pretrained with objective {name!r}, which needs a noise schedule, but its record holds "
            "no num_timesteps; point --pretrained_weights at a file written by the pretraining bundle."
        )
    if "patch_size" in params and not isinstance(params["patch_size"], int):
        params["patch_size"] = tuple(params["patch_size"])
    params.setdefault("num_timesteps", int(num_timesteps))
    try:
        return objective(name, **params)
    except ValueError as e:
        raise ValueError(f"{source}: its 'objective' record cannot be rebuilt ({e}).") from e
