"""Data sets: readers for GlaS, MoNuSeg and the face sets, and embedded synthetic demo data."""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; resolved on first access so that ``python -m monai_mdm.data.synthetic``
# does not import its own module twice
_EXPORTS = {
    "synthesize_tile": "synthetic",
    "write_demo_data": "synthetic",
    "write_glas": "synthetic",
    "write_monuseg": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
