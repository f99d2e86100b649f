"""EMA weights kept during training (ignite's EMAHandler, updated once per optimiser step), with a warm-up."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler


class EMA(EMAHandler):
    """ignite's ``EMAHandler`` expressed as a decay, with a warm-up, attachable from a bundle's handler list.

    Warm-up: update ``n`` (counted from 0) uses ``decay_n = min(decay, (1 + n) / (10 + n))``. Without it a
    decay of 0.9999 keeps the average ~99 % the random initialisation for the first ten thousand updates, so a
    short run's EMA is useless. This rule was chosen over ignite's ``momentum_warmup``/``warmup_iters``
    because it needs no extra length setting, and because its one input, the update count, is this handler's
    own state (``state_dict``), saved in checkpoints and restored on resume; ignite's warm-up schedule restarts
    with every run. ``decay`` stays the long-run decay (reached after about ``9 / (1 - decay)`` updates).

    With gradient accumulation the weights change only every ``every`` iterations, so the average is updated
    then too: a decay of 0.9999 then means the same thing as in the reference's training.

    Args:
        model: the network being trained.
        decay: long-run EMA decay (0.9999 in the paper); ignite's momentum is ``1 - decay_n``.
        every: iterations per optimiser step (the trainer's ``accumulation_steps``).
        warmup: use the warm-up rule above; False keeps ``decay`` from the first update.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, every: int = 1, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}.")
        super().__init__(model, momentum=1.0 - decay)
        self.decay = float(decay)
        self.every = max(1, int(every))
        self.warmup = bool(warmup)
        self.updates = 0  # EMA updates so far
        self.init_weight = 1.0  # weight of the initial weights in the average: product of the decays used

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def attach(self, engine: Engine, name: str = "ema_momentum", **kwargs) -> None:  # type: ignore[override]
        event = Events.ITERATION_COMPLETED(every=self.every) if self.every > 1 else Events.ITERATION_COMPLETED
        super().attach(engine, name=name, event=kwargs.pop("event", event), **kwargs)

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        decay = self.current_decay()
        setattr(engine.state, name, 1.0 - decay)
        super()._update_ema_model(engine, name)
        self.updates += 1
        self.init_weight *= decay

    def state_dict(self) -> dict[str, Any]:
        """The EMA's settings and progress (what a checkpoint keeps so that a resumed run continues the warm-up)."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "init_weight": self.init_weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.init_weight = float(state["init_weight"])

    def resume_without_state(self, engine: Engine) -> None:
        """Resuming a checkpoint written before the EMA state was saved: those runs used ``decay`` throughout."""
        self.updates = int(engine.state.iteration) // self.every
        self.init_weight = self.decay**self.updates

    def describe(self, engine: Engine, module: torch.nn.Module | None = None) -> dict[str, Any]:
        """What a pretraining checkpoint or model file records: iteration, EMA state and, for ``module``,
        which weights it holds ("ema" for this handler's average, "raw" otherwise)."""
        record: dict[str, Any] = {"iteration": int(engine.state.iteration), "ema": self.state_dict()}
        if module is not None:
            record["weights"] = "ema" if module is self.ema_model else "raw"
        return record
