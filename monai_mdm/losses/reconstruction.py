"""The reconstruction loss of MDM pretraining, selectable by name as in the paper's ablation."""

from __future__ import annotations

import torch
from monai.losses import SSIMLoss

RECONSTRUCTION_LOSSES = ("ssim", "mse", "l1")


def reconstruction_loss(name: str = "ssim", spatial_dims: int = 2) -> torch.nn.Module:
    """``ssim`` (the paper's choice), ``mse`` or ``l1`` between the predicted and the clean image.

    SSIM uses the reference's settings: Gaussian window 5, sigma 1.5, constants for data range 1 applied to
    images in [-1, 1]. MONAI's ``SSIMLoss`` gives 1 - SSIM; the reference's (1 - SSIM) / 2 has the same optimum.
    """
    key = str(name).lower()
    if key == "ssim":
        return SSIMLoss(spatial_dims=spatial_dims, data_range=1.0, kernel_type="gaussian", win_size=5, kernel_sigma=1.5)
    if key == "mse":
        return torch.nn.MSELoss()
    if key == "l1":
        return torch.nn.L1Loss()
    raise ValueError(f"unknown reconstruction loss '{name}'; choose one of {RECONSTRUCTION_LOSSES}.")


REGION_LOSSES = ("mse", "l1", "ssim")
# the window of the SSIM above: the map of a valid (unpadded) convolution lacks this border on each side
_SSIM_WINDOW, _SSIM_SIGMA = 5, 1.5


def region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` (B, C, *spatial) over the pixels where ``region`` (B, 1, *spatial) is True.

    Every channel of a region pixel counts once. A sample with an empty region contributes 0 (its term has no
    pixels to be scored on), never NaN.
    """
    weight = region.to(values.dtype).expand_as(values)
    total = (values * weight).flatten(1).sum(dim=1)
    count = weight.flatten(1).sum(dim=1)
    return total / count.clamp_min(1.0)


class RegionReconstructionLoss(torch.nn.Module):
    """``mse``, ``l1`` or ``ssim`` between prediction and target inside a pixel region, one value per sample.

    MSE / L1: the masked mean of the squared / absolute error over the region (:func:`region_mean`). SSIM:
    1 - the SSIM map (same window and constants as :func:`reconstruction_loss`) averaged over the region; the
    map of the valid convolution is centred on the pixels at least ``window // 2`` from the border, so the
    region is cropped by that much before averaging. A change of the prediction outside the region (beyond
    the SSIM window for ``ssim``) leaves the loss unchanged.
    """

    def __init__(self, name: str = "mse", spatial_dims: int = 2) -> None:
        super().__init__()
        key = str(name).lower()
        if key not in REGION_LOSSES:
            raise ValueError(f"unknown region loss '{name}'; choose one of {REGION_LOSSES}.")
        self.name = key
        self.spatial_dims = int(spatial_dims)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        if self.name == "mse":
            return region_mean((pred.float() - target.float()).square(), region)
        if self.name == "l1":
            return region_mean((pred.float() - target.float()).abs(), region)
        from monai.metrics.regression import compute_ssim_and_cs

        ssim_map, _ = compute_ssim_and_cs(
            pred.float(), target.float(), self.spatial_dims, [_SSIM_WINDOW] * self.spatial_dims,
            [_SSIM_SIGMA] * self.spatial_dims, data_range=1.0, kernel_type="gaussian",
        )  # fmt: skip
        b = _SSIM_WINDOW // 2
        cropped = region[(slice(None), slice(None), *[slice(b, s - b) for s in region.shape[2:]])]
        return 1.0 - region_mean(ssim_map, cropped)
