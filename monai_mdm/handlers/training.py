"""Small training-loop handlers for the few-shot heads: early stopping on the loss, saving the model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from monai_mdm.distributed import is_rank0, sum_over_ranks

logger = logging.getLogger(__name__)


class EarlyStopOnLoss:
    """Stop when the epoch's mean training loss has not improved for ``patience`` epochs after a warm-up.

    The few-shot heads have no validation set (all labels are used for training), so like the reference
    the training loss itself is watched. The patience logic is ignite's ``EarlyStopping``. In multi-process
    training the epoch loss is the mean over all ranks' iterations, so every rank stops at the same epoch.
    """

    def __init__(self, patience: int = 20, warmup_epochs: int = 0, min_delta: float = 0.0) -> None:
        self.patience, self.warmup_epochs, self.min_delta = int(patience), int(warmup_epochs), float(min_delta)
        self._sum, self._count = 0.0, 0
        self.epoch_loss = float("inf")

    def attach(self, engine: Engine) -> None:
        stopper = EarlyStopping(self.patience, lambda _: -self.epoch_loss, engine, self.min_delta)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._close_epoch)
        engine.add_event_handler(
            Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch > self.warmup_epochs), stopper
        )

    def _reset(self, engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        self._sum += float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self._count += 1

    def _close_epoch(self, engine: Engine) -> None:
        total, count = sum_over_ranks([self._sum, self._count])
        self.epoch_loss = total / max(1, count)
        engine.state.metrics["epoch_loss"] = self.epoch_loss


class SaveModel:
    """Write the trained model with :func:`monai_mdm.inferers.save_segmentation_model` when training ends.

    In multi-process training only rank 0 writes (all ranks hold the same weights).

    Args:
        model: the model to save (e.g. the ``MDMSegmenter`` wrapping the trained head).
        path: target file, written atomically.
        config: constructor settings for models that do not store their own (the baseline UNet).
        extra_json: optional ``{path: dict}`` of JSON files written beside it (e.g. the label budget).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        path: str | Path,
        config: Mapping[str, Any] | None = None,
        extra_json: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.path, self.config = model, Path(path), config
        self.extra_json = dict(extra_json or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import json

        from monai_mdm.inferers import save_segmentation_model
        from monai_mdm.utils import atomic_write

        self.model.eval()
        if not is_rank0():
            return
        save_segmentation_model(self.model, self.path, self.config)
        for name, content in self.extra_json.items():
            text = json.dumps(content, indent=2, default=str)
            atomic_write(Path(name), lambda f, t=text: f.write(t.encode()))
        logger.info(f"saved model to '{self.path}'.")
