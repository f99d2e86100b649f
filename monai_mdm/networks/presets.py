"""Named ``MDMUNet`` settings, so configs and bundles can say ``"paper"`` instead of fourteen numbers."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

# What every preset shares: the ADM design as the paper trains it (scale-shift GroupNorm conditioning,
# residual up/down sampling, no dropout, T = 1000), without gradient checkpointing (a memory setting, not weights).
_ADM: dict[str, Any] = dict(
    spatial_dims=2,
    in_channels=3,
    out_channels=3,
    num_res_blocks=2,
    num_heads=-1,
    dropout=0.0,
    use_scale_shift_norm=True,
    resblock_updown=True,
    conv_resample=True,
    num_timesteps=1000,
    use_checkpoint=False,
)

# The network of the MDM paper (guided-diffusion 256 x 256 UNet, 192 channels, no learned sigma):
# attention at 32, 16 and 8 px of a 256 input = downsample factors 8, 16, 32; 18 decoder blocks.
_PAPER = dict(
    _ADM, model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4), attention_downsample=(8, 16, 32), num_head_channels=64
)

# Same design, small enough to pretrain on a CPU in minutes on 32-64 px crops (sizes divisible by 4).
_TINY = dict(_ADM, model_channels=32, channel_mult=(1, 2, 2), attention_downsample=(4,), num_head_channels=16)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    # DDPM-seg's released FFHQ-256 diffusion model (ffhq.pt): guided-diffusion flags image_size 256,
    # num_channels 256, channel_mult "" (= 1,1,2,2,4,4), attention_resolutions "32,16,8", num_head_channels 64,
    # resblock_updown, use_scale_shift_norm and learn_sigma (6 output channels: eps and the variance
    # interpolation); about 552 M parameters. Its decoder blocks give DDPM-seg's face features.
    "ddpm_seg_ffhq": dict(_PAPER, model_channels=256, out_channels=6),
    "tiny": _TINY,
    # 3D single-channel counterpart of "tiny" (isotropic resampling), for 32^3 crops of volumes.
    "tiny3d": dict(_TINY, spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1),
}
