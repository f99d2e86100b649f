"""The prepare-batch that turns a batch of clean images into a pretraining step of an objective (MDM, MAE, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.utils import CommonKeys, convert_to_tensor


class ObjectivePrepareBatch(PrepareBatch):
    """A pretraining step of an :class:`~monai_mdm.transforms.objectives.Objective`, with its loss beside it.

    Returns ``(inputs, clean, (), {"timesteps": told})`` as the objective draws them, so the stock
    ``SupervisedTrainer`` runs ``network(inputs, timesteps=told)`` and calls :attr:`loss_function` with the
    prediction and the clean images. Objectives whose loss covers only part of the image (masked patches, a
    noise term) need more than ``(pred, target)``: the loss reads the rest from the batch this object prepared
    last (:attr:`last`), checked to be the one whose target it is given. Wire both into the same trainer.

    Args:
        objective: e.g. ``monai_mdm.transforms.objective("mae")``.
        image_key: key of the clean images when the batch is a dictionary.
    """

    def __init__(self, objective: Any, image_key: str = CommonKeys.IMAGE) -> None:
        self.objective = objective
        self.image_key = image_key
        self.last: Any = None
        self.loss_function = ObjectiveLoss(self)

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
        clean = convert_to_tensor(clean, track_meta=False)
        self.last = self.objective.draw(clean)
        return self.last.inputs, self.last.target, (), {"timesteps": self.last.timesteps}


class ObjectiveLoss(torch.nn.Module):
    """The loss of an :class:`ObjectivePrepareBatch`'s objective for the batch it prepared last."""

    def __init__(self, prepare_batch: ObjectivePrepareBatch) -> None:
        super().__init__()
        self._prepare_batch = [prepare_batch]  # a list: not registered as a submodule, no cycle in state_dict

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prepared = self._prepare_batch[0]
        batch = prepared.last
        if batch is None or batch.target.shape != target.shape or batch.target.data_ptr() != target.data_ptr():
            raise RuntimeError(
                f"the {prepared.objective.name} loss is computed for the batch its ObjectivePrepareBatch prepared "
                "last; give the trainer that prepare_batch together with this loss_function."
            )
        return prepared.objective.compute_loss(pred, batch)
