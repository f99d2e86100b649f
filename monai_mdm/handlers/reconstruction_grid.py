"""PNG grids of masked input / reconstruction / target, so a run's progress can be seen, not only read."""

from __future__ import annotations

from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from PIL import Image

from monai_mdm.handlers.tracking import log_artifact
from monai_mdm.utils import atomic_write


def to_uint8_rgb(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(B, C, H, W) in ``value_range`` -> (B, H, W, 3) uint8 for viewing; 3D volumes show their middle slice."""
    x = images.detach().float().cpu()
    while x.ndim > 4:  # (B, C, D, H, W): middle slice along the first spatial axis
        x = x[:, :, x.shape[2] // 2]
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    return (x.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def reconstruction_grid(
    inputs: torch.Tensor,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    max_samples: int = 4,
    value_range: tuple[float, float] = (-1.0, 1.0),
    gap: int = 2,
) -> np.ndarray:
    """One row per sample: corrupted input | reconstruction | clean target, white gaps between tiles."""
    rows = []
    n = min(max_samples, inputs.shape[0])
    columns = [to_uint8_rgb(t[:n], value_range) for t in (inputs, predictions, targets)]
    h, w = columns[0].shape[1:3]
    for i in range(n):
        row = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
        for j, col in enumerate(columns):
            row[:, j * (w + gap) : j * (w + gap) + w] = col[i]
        rows.append(row)
        rows.append(np.full((gap, row.shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


_GRID_KEYS = (CommonKeys.IMAGE, CommonKeys.PRED, CommonKeys.LABEL)


class ReconstructionGridSaver:
    """Every ``interval`` iterations write ``<output_dir>/recon_<iteration>.png`` from the trainer output.

    The trainer's output holds the corrupted input (``image``), the clean target (``label``) and the
    network's prediction (``pred``). When an MLflow handler is attached, each grid is also logged as a
    run artifact under ``artifact_path``. In multi-process training only rank 0 writes grids.
    """

    def __init__(
        self,
        output_dir: str | Path,
        interval: int = 100,
        max_samples: int = 4,
        value_range: tuple[float, float] = (-1.0, 1.0),
        artifact_path: str = "reconstructions",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.interval = int(interval)
        self.max_samples = max_samples
        self.value_range = tuple(value_range)
        self.artifact_path = artifact_path

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and idist.get_rank() == 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> Path:
        out = engine.state.output
        if isinstance(out, (list, tuple)):  # a decollated batch: one dict per sample
            out = {k: torch.stack([torch.as_tensor(o[k]) for o in out[: self.max_samples]]) for k in _GRID_KEYS}
        grid = reconstruction_grid(*(out[k] for k in _GRID_KEYS), self.max_samples, self.value_range)
        path = self.output_dir / f"recon_{engine.state.iteration:07d}.png"
        atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
        log_artifact(engine, str(path), self.artifact_path)
        return path
