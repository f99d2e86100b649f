"""How fast a bundle really trains: every iteration's wall time, data loading and handlers included."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_mdm.utils import atomic_write

__all__ = ["IterationTimes"]


class IterationTimes:
    """Write the wall time of every training iteration to a JSON file when the run ends (rank 0 only).

    The benchmarks time a training step on images already on the device; this times the bundle itself, so the
    figure includes loading and augmenting the images, the copy to the device, DDP's gradient averaging and the
    handlers attached before this one (attach it last). The device is synchronised at the end of every
    iteration, so one iteration's queued GPU work is not counted in the next.

    Args:
        path: the JSON file: ``iteration_s`` (seconds of each iteration, the first from the run's start),
            ``images_per_iteration``, ``world_size``, ``median_images_per_s`` (over all but the first
            ``warmup`` iterations) and on CUDA ``peak_memory_mib`` (``torch.cuda.max_memory_allocated``).
        images_per_iteration: images of one iteration over all processes (the bundle's global ``batch_size``).
        device: synchronised at the end of each iteration when it is a CUDA device.
        warmup: iterations left out of the median (the first ones pay for cuDNN's autotuning and compilation).
    """

    def __init__(
        self, path: str | os.PathLike, images_per_iteration: int, device: torch.device | str | None = None,
        warmup: int = 2,
    ) -> None:  # fmt: skip
        self.path = path
        self.images_per_iteration = int(images_per_iteration)
        self.device = torch.device(device) if device is not None else None
        self.warmup = int(warmup)
        self.iteration_s: list[float] = []
        self._last = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._tick)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.iteration_s = []
        self._last = time.perf_counter()

    def _tick(self, engine: Engine) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.iteration_s.append(now - self._last)
        self._last = now

    def summary(self) -> dict:
        timed = self.iteration_s[self.warmup :] or self.iteration_s
        median = statistics.median(timed) if timed else float("nan")
        return {
            "iteration_s": self.iteration_s,
            "images_per_iteration": self.images_per_iteration,
            "world_size": idist.get_world_size(),
            "warmup": self.warmup,
            "median_iteration_s": median,
            "median_images_per_s": self.images_per_iteration / median if timed else float("nan"),
            "peak_memory_mib": self._peak_mib(),
        }

    def _peak_mib(self) -> float | None:
        """``torch.cuda.max_memory_allocated`` of the device since the process started, None on the CPU."""
        if self.device is None or self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def _write(self, engine: Engine) -> None:
        if idist.get_rank() == 0:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda f: json.dump(self.summary(), f, indent=2), "w")
