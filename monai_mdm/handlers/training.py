"""Small training-loop handlers for the few-shot heads: the step schedule, early stopping, saving the model."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from monai_mdm.distributed import all_gather_objects
from monai_mdm.utils import prepare_output_folder

logger = logging.getLogger(__name__)


def epochs_for_steps(max_steps: int, epoch_length: int, setting: str = "max_steps") -> int:
    """Ignite epochs of ``epoch_length`` iterations that hold ``max_steps`` optimiser steps (the last epoch is cut
    short by :class:`StopAtStep`). The schedule is counted in steps so that it does not grow with the
    number of labelled images; an epoch is only the evaluation / logging period. ``setting`` names
    ``max_steps`` in errors (the pretraining bundle calls it ``max_iterations``)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"--{setting} must be an integer >= 1 (optimiser steps), got {max_steps!r}.")
    if isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 1:
        raise ValueError(f"--epoch_length must be an integer >= 1 (steps between evaluations), got {epoch_length!r}.")
    return math.ceil(max_steps / epoch_length)


class StopOnNonFiniteLoss:
    """Stop with an error at the first NaN or infinite training loss, before later handlers average, checkpoint
    or save the broken weights (attach it first). ignite's ``TerminateOnNan`` ends the run quietly instead, and
    its end would then save a model; here no model is written and the message says where and why.

    Args:
        output_transform: the loss from the engine's output.
        hint: the likely causes to name for this workflow.
    """

    def __init__(
        self,
        output_transform: Any = lambda out: out["loss"],
        hint: str = "a learning rate too high (--learning_rate), or images with NaN or infinite values",
    ) -> None:
        self.output_transform = output_transform
        self.hint = hint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss is {value} at iteration {engine.state.iteration} (epoch {engine.state.epoch}); "
                f"the run stops and saves no model. Likely causes: {self.hint}."
            )


class StopAtStep:
    """End training after ``max_steps`` iterations: mid-epoch when the last epoch is a short one, otherwise once
    the epoch's handlers (logging, early stopping) have run, so the last full epoch is logged like the others.
    Attach it after them."""

    def __init__(self, max_steps: int) -> None:
        epochs_for_steps(max_steps, 1)  # the same check and message
        self.max_steps = int(max_steps)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps and engine.state.iteration % engine.state.epoch_length:
            engine.terminate()

    def _epoch(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_steps:
            engine.terminate()


class HeldOutEarlyStopping:
    """Evaluate on held-out labelled pixels every epoch, stop after ``patience`` epochs without improvement,
    and put the best weights back when training ends (before the model is saved: attach it first).

    ``data`` are items of the same kind as the training batches (held-out windows from
    :func:`~monai_mdm.data.holdout_split`, or their :func:`~monai_mdm.data.heldout_cache` features); they
    go through the trainer's own ``prepare_batch`` and ``network``, so the handler serves a head on cached
    features, a head on online features and a UNet alike. The score is the mean cross entropy over labelled
    pixels (``metric="loss"``) or the mean foreground Dice over all held-out pixels (``metric="dice"``); both
    are logged as ``heldout_loss`` / ``heldout_dice``, with the epoch's mean training loss as ``epoch_loss``.
    An ensemble's stacked logits (B, heads, classes, ...) are scored by their mean probability.

    ``model`` is what is kept and restored: by default the trainer's network; end-to-end fine-tuning passes the
    whole segmenter, because the UNet it trains sits in the feature extractor, outside the trainer's network, and
    a best head restored onto the last epoch's UNet would not be the model that scored best.

    Multi-process: each rank scores every ``world_size``-th item and the sums are added over ranks, so every
    rank sees the same score and stops at the same epoch. Without held-out labelled pixels (none held out, or
    the images too small) it logs a warning and training runs its full length, keeping the last weights.
    Patience and warm-up (epochs before the first check; the best weights are tracked from the start) use
    ignite's ``EarlyStopping``.
    """

    def __init__(
        self,
        data: Sequence[Any],
        patience: int = 10,
        warmup_epochs: int = 0,
        metric: str = "loss",
        min_delta: float = 0.0,
        batch_size: int = 4,
        ignore_index: int = 255,
        model: torch.nn.Module | None = None,
    ) -> None:
        if metric not in ("loss", "dice"):
            raise ValueError(f"metric must be 'loss' or 'dice', got {metric!r}.")
        if int(patience) < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {patience}.")
        self.data = data if data is not None else []
        self.patience, self.warmup_epochs, self.metric = int(patience), int(warmup_epochs), metric
        self.min_delta, self.batch_size, self.ignore_index = float(min_delta), int(batch_size), int(ignore_index)
        self.best_score, self.best_epoch, self.best_iteration, self.best_state = -math.inf, 0, 0, None
        self.score = -math.inf
        self.model = model
        self._sum, self._count, self._evaluated_at = 0.0, 0, -1

    def attach(self, engine: Engine) -> None:
        self._stopper = EarlyStopping(self.patience, lambda _: self.score, engine, self.min_delta)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._close_epoch)
        engine.add_event_handler(Events.COMPLETED, self._restore)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
        self._sum += float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self._count += 1

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Held-out ``{"loss", "dice", "pixels"}`` of the engine's network now (summed over ranks)."""
        from torch.utils.data import DataLoader, Subset

        network, device = engine.network, getattr(engine.state, "device", None)
        rank, world = idist.get_rank(), idist.get_world_size()
        mine = Subset(self.data, list(range(rank, len(self.data), world)))
        ce, pixels, inter, total = 0.0, 0.0, None, None
        was_training = network.training
        network.eval()
        for batch in DataLoader(mine, batch_size=self.batch_size):
            prepared = engine.prepare_batch(batch, device, getattr(engine, "non_blocking", False))
            inputs, labels = prepared[0], prepared[1]
            args, kwargs = (prepared[2], prepared[3]) if len(prepared) == 4 else ((), {})
            logits = network(inputs, *args, **kwargs).float()
            labels = labels.long()
            if labels.ndim == logits.ndim and labels.shape[1] == 1:
                labels = labels.squeeze(1)  # (B, 1, *spatial) -> (B, *spatial)
            if logits.ndim == labels.ndim + 2:  # ensemble: (B, heads, classes, ...) -> mean probability
                logp = logits.softmax(2).mean(1).clamp_min(1e-12).log()
            else:
                logp = logits.log_softmax(1)
            valid = labels != self.ignore_index
            target = torch.where(valid, labels, torch.zeros_like(labels))
            ce -= float(logp.gather(1, target.unsqueeze(1)).squeeze(1)[valid].sum())
            pixels += float(valid.sum())
            predicted, truth, classes = logp.argmax(1)[valid], target[valid], logp.shape[1]
            pred = F.one_hot(predicted, classes).sum(0).double()
            true = F.one_hot(truth, classes).sum(0).double()
            both = F.one_hot(truth[predicted == truth], classes).sum(0).double()
            inter = both if inter is None else inter + both
            total = pred + true if total is None else total + pred + true
        network.train(was_training)
        # gathered as objects: a rank without held-out items has no per-class sums to add
        sums = ([], []) if inter is None else (inter.tolist(), total.tolist())
        parts = all_gather_objects((ce, pixels, *sums))
        ce, pixels = sum(p[0] for p in parts), sum(p[1] for p in parts)
        n = max(len(p[2]) for p in parts)
        inter_t, total_t = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for p in parts:
            if p[2]:
                inter_t += torch.tensor(p[2], dtype=torch.float64)
                total_t += torch.tensor(p[3], dtype=torch.float64)
        if pixels == 0:
            return {"loss": math.inf, "dice": 0.0, "pixels": 0.0}
        fg = [float(2 * inter_t[c] / total_t[c]) for c in range(1, n) if total_t[c] > 0]
        return {"loss": ce / pixels, "dice": sum(fg) / len(fg) if fg else 1.0, "pixels": pixels}

    def _close_epoch(self, engine: Engine) -> None:
        total, count = idist.all_reduce(torch.tensor([self._sum, self._count], dtype=torch.float64)).tolist()
        engine.state.metrics["epoch_loss"] = total / max(1, count)
        self._check(engine)

    def _check(self, engine: Engine, final: bool = False) -> None:
        if self._evaluated_at == engine.state.iteration or self.best_epoch < 0:
            return
        self._evaluated_at = engine.state.iteration
        result = self.evaluate(engine)
        if result["pixels"] == 0:
            logger.warning(
                "no held-out labelled pixels (holdout_fraction 0 or the labelled images too small): early "
                "stopping is off, training runs max_steps and keeps the last weights."
            )
            self.best_epoch = -1  # checked once
            return
        engine.state.metrics["heldout_loss"], engine.state.metrics["heldout_dice"] = result["loss"], result["dice"]
        self.score = -result["loss"] if self.metric == "loss" else result["dice"]
        if self.score > self.best_score + self.min_delta or self.best_state is None:
            self.best_score, self.best_epoch = self.score, engine.state.epoch
            self.best_iteration = engine.state.iteration
            # a copy, not references: the optimiser updates the parameters in place
            self.best_state = copy.deepcopy(self._kept(engine).state_dict())
        if engine.state.epoch > self.warmup_epochs and not final:
            self._stopper(engine)

    def _kept(self, engine: Engine) -> torch.nn.Module:
        return engine.network if self.model is None else self.model

    def _restore(self, engine: Engine) -> None:
        self._check(engine, final=True)  # a last, shortened epoch (StopAtStep) is scored too
        if self.best_state is None:
            return
        self._kept(engine).load_state_dict(self.best_state)
        logger.info(
            f"restored the {'head' if self.model is None else 'model'} of epoch {self.best_epoch} (iteration {self.best_iteration}, "
            f"held-out {self.metric} {abs(self.best_score):.4f}) of {engine.state.iteration} iterations."
        )


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
        engine.add_event_handler(Events.STARTED, self.prepare)
        engine.add_event_handler(Events.COMPLETED, self)

    def prepare(self, engine: Engine) -> None:
        if idist.get_rank() == 0:
            prepare_output_folder(self.path.parent, "output_dir")

    def __call__(self, engine: Engine) -> None:
        import json

        from monai_mdm.inferers import save_segmentation_model
        from monai_mdm.utils import atomic_write

        self.model.eval()
        if idist.get_rank() != 0:
            return
        save_segmentation_model(self.model, self.path, self.config)
        for name, content in self.extra_json.items():
            text = json.dumps(content, indent=2, default=str)
            atomic_write(Path(name), lambda f, t=text: f.write(t.encode()))
        logger.info(f"saved model to '{self.path}'.")
