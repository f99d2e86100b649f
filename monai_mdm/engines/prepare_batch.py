"""Prepare-batch callables that turn a batch of clean images into an MDM training step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.utils import CommonKeys, convert_to_tensor

from monai_mdm.transforms.corruption import Corruption


class CorruptionPrepareBatch(PrepareBatch):
    """Draw ``t`` per sample, corrupt the batch on its device and ask the network for the clean image.

    The stock ``SupervisedTrainer`` then computes ``loss(network(corrupted, timesteps=t), clean)``: the network
    predicts x0, as MDM does. The corruption is pluggable (patch masking for MDM, Gaussian noise for the DDPM
    baseline), so the trainer, the loss and the handlers stay the same whichever is used.

    Args:
        corruption: a :class:`~monai_mdm.transforms.corruption.Corruption` (e.g. ``PatchMasking``).
        image_key: key of the clean images when the batch is a dictionary.
        min_timestep / max_timestep: t is drawn uniformly from ``[min_timestep, max_timestep)``;
            ``max_timestep`` defaults to the corruption's ``num_timesteps``.
    """

    def __init__(
        self,
        corruption: Corruption,
        image_key: str = CommonKeys.IMAGE,
        min_timestep: int = 0,
        max_timestep: int | None = None,
    ) -> None:
        self.corruption = corruption
        self.image_key = image_key
        self.min_timestep = int(min_timestep)
        self.max_timestep = int(corruption.num_timesteps if max_timestep is None else max_timestep)
        if not 0 <= self.min_timestep < self.max_timestep <= corruption.num_timesteps:
            raise ValueError(
                f"timestep range [{self.min_timestep}, {self.max_timestep}) must lie inside "
                f"[0, {corruption.num_timesteps}) of the corruption."
            )

    def draw_timesteps(self, batch_size: int, device: torch.device | str | None) -> torch.Tensor:
        """One t per sample, uniform over the configured range."""
        return torch.randint(self.min_timestep, self.max_timestep, (batch_size,), device=device, dtype=torch.long)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor] | torch.Tensor,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if isinstance(batchdata, Mapping):
            if self.image_key not in batchdata:
                raise KeyError(f"batch has no key '{self.image_key}' (keys: {sorted(batchdata)}).")
            clean = batchdata[self.image_key]
        else:
            clean = batchdata
        clean = default_prepare_batch({CommonKeys.IMAGE: clean}, device, non_blocking, **kwargs)[0]
        clean = convert_to_tensor(clean, track_meta=False)  # MetaTensor bookkeeping is of no use to the step
        timesteps = self.draw_timesteps(clean.shape[0], clean.device)
        corrupted = self.corruption(clean, timesteps)
        return corrupted, clean, (), {"timesteps": timesteps}
