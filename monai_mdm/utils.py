"""Small helpers shared across the package: atomic file writes, a size guard for traced (exported) models."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, List

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it is renamed over ``path``, on error removed.

    For writers that want a file name rather than a file object (NIfTI, SimpleITK): readers see either the
    old file or the whole new one, never a truncated file. ``suffix`` keeps the extension writers look at.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file through ``write(file_object)`` so that readers see either the old file or the whole new one.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over ``path``:
    an interrupted run (kill, full disk, exception) never leaves a truncated file behind.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def prepare_output_folder(folder: str | os.PathLike, setting: str = "output_dir") -> Path:
    """Create ``folder``, prove it writable now (not at the first checkpoint, hours later) and remove the
    temporary files that a killed atomic write left in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(
            f"--{setting}: cannot write to '{folder}' ({e.strerror or e}); choose a folder you can write to."
        ) from e
    for stale in folder.glob(".*.tmp"):  # atomic_path's temporary files: a write was killed midway
        stale.unlink(missing_ok=True)
    return folder


class StagedFolder:
    """A folder whose files appear as a set: they are written into a hidden sibling that replaces ``final``
    only on :meth:`commit`, so a run that fails midway leaves the previous folder whole (never new predictions
    beside old metrics). A sibling left by a killed run is removed by the next :meth:`begin`."""

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final)
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self._old = self.final.parent / f".{self.final.name}.old"

    def begin(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self.partial

    def merge(self) -> Path:
        """Move the staged files into ``final`` (replacing files of the same name, keeping the others)."""
        for src in sorted(self.partial.rglob("*")):
            if src.is_file():
                dst = self.final / src.relative_to(self.partial)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.final

    def commit(self) -> Path:
        shutil.rmtree(self._old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, self._old)
        os.replace(self.partial, self.final)
        shutil.rmtree(self._old, ignore_errors=True)
        return self.final


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partial checkpoint (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _damage(path: Path) -> str | None:
    """What is wrong with a file that should be a torch file, judged by its first bytes, or None if it looks fine."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the copy or download did not finish"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle
        return None
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "is a web page (HTML), not a weights file: the download saved a login or error page"
    if text.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the weights: fetch the real file with `git lfs pull`"
    return f"is not a PyTorch file ({size} bytes starting {head[:16]!r})"


def load_torch_file(path: str | os.PathLike, what: str, fix: str, **kwargs: Any) -> Any:
    """``torch.load`` whose errors name the file, say what is wrong with it and what to do (``fix``).

    torch's own messages name no file and mislead for the usual accidents: an HTML page saved instead of a
    download (``invalid load key, '<'``), an empty file (``Ran out of input``), a truncated copy
    (``PytorchStreamReader failed reading zip archive``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found: {fix}")
    damage = _damage(path)
    if damage is not None:
        raise ValueError(f"{what} '{path}' {damage}. {fix}")
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, **kwargs)
    except (EOFError, OSError, RuntimeError) as e:  # a damaged zip archive surfaces as any of these
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e) and "zip archive" not in str(e):
            raise
        raise ValueError(f"{what} '{path}' is truncated or damaged ({type(e).__name__}: {str(e)[:80]}). {fix}") from e


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
