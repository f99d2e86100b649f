"""Small helpers shared across the package: atomic file writes, a size guard for traced (exported) models."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, List

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file through ``write(file_object)`` so that readers see either the old file or the whole new one.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over ``path``:
    an interrupted run (kill, full disk, exception) never leaves a truncated file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partial checkpoint (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _require_spatial_size(images: torch.Tensor, expected: List[int]) -> torch.Tensor:
    if images.shape[2:] != expected:
        raise ValueError(
            f"this exported model was traced for images of spatial size {expected} and cannot run on "
            f"{images.shape[2:]}: run it in a sliding window with roi_size {expected}, or export it again with "
            "--input_shape for the size you need."
        )
    return images


@functools.cache
def _scripted_size_check() -> Callable:
    return torch.jit.script(_require_spatial_size)


def guard_traced_size(images: torch.Tensor) -> torch.Tensor:
    """``images`` as they are; under ``torch.jit.trace``, passed through a check kept in the trace as TorchScript.

    Modules that freeze something of the traced size into the trace (a seeded feature mask, padding amounts)
    call this first, so the exported model refuses other sizes with a clear error instead of failing deep inside
    or silently computing something else.
    """
    if not torch.jit.is_tracing():
        return images
    return _scripted_size_check()(images, [int(s) for s in images.shape[2:]])
