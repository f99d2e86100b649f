"""EMA weights kept during training (ignite's EMAHandler, updated once per optimiser step)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler


class EMA(EMAHandler):
    """ignite's ``EMAHandler`` expressed as a decay and attachable from a bundle's handler list.

    With gradient accumulation the weights change only every ``every`` iterations, so the average is
    updated then too: a decay of 0.9999 then means the same thing as in the reference's training.

    Args:
        model: the network being trained.
        decay: EMA decay (0.9999 in the paper); ignite's momentum is ``1 - decay``.
        every: iterations per optimiser step (the trainer's ``accumulation_steps``).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}.")
        super().__init__(model, momentum=1.0 - decay)
        self.every = max(1, int(every))

    def attach(self, engine: Engine, name: str = "ema_momentum", **kwargs) -> None:  # type: ignore[override]
        event = Events.ITERATION_COMPLETED(every=self.every) if self.every > 1 else Events.ITERATION_COMPLETED
        super().attach(engine, name=name, event=kwargs.pop("event", event), **kwargs)
