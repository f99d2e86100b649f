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
