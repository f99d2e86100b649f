"""Choosing the labelled subset of a few-shot run, and recording it.

The paper trains the segmentation head on a fraction of the training images (10% of GlaS = 8 of 85,
of MoNuSeg = 3 of 30), so a fraction becomes ``max(1, floor(fraction * N))`` images. The choice is a
seeded permutation of the (sorted) datalist, so it is the same on every machine, and for one seed a
smaller budget is a subset of a larger one. :func:`budget_record` gives what a run stores to say
exactly which images it was trained on.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["budget_count", "budget_record", "select_labelled"]

# guards floor() against binary rounding, e.g. 0.29 * 100 = 28.999999999999996
_EPS = 1e-9


def budget_count(budget: float | int, total: int) -> int:
    """How many of ``total`` images a fraction (float in (0, 1]) or a count (int) means."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"--label_budget must be a fraction (float), a count (int) or a list of names, got {budget!r}.")
    if total < 1:
        raise ValueError("the datalist is empty: there is nothing to select from.")
    if isinstance(budget, numbers.Integral):
        count = int(budget)
        if count < 1:
            raise ValueError(f"--label_budget {count}: a count must be >= 1 (or give a fraction such as 0.1).")
        if count > total:
            raise ValueError(
                f"--label_budget {count} is larger than the {total} labelled images available; lower it or pass a "
                "fraction such as 0.1."
            )
        return count
    fraction = float(budget)
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(
            f"--label_budget {fraction}: a fraction must be in (0, 1]; e.g. 0.1 for 10% (pass an int for a count)."
        )
    return max(1, math.floor(fraction * total + _EPS))


def _name(entry: Mapping, index: int) -> str:
    if "name" not in entry:
        raise KeyError(f"datalist entry {index} has no 'name' key; selecting by name needs named entries.")
    return str(entry["name"])


def select_labelled(
    datalist: Sequence[Mapping[str, Any]], budget: float | int | str | Sequence[str], seed: int = 0
) -> list:
    """The labelled subset of ``datalist``, in datalist order.

    Args:
        datalist: entries (dicts); selecting by name uses their ``"name"``.
        budget: a fraction in (0, 1] (``0.1`` = 10%: ``max(1, floor(0.1 * N))`` images), an int count
            (``1`` = one image; ``1.0`` = all), or an explicit list of names (a single name may be a str).
        seed: seed of ``numpy.random.default_rng`` for fractions and counts; names ignore it.
    """
    datalist = list(datalist)
    if isinstance(budget, str):
        budget = [budget]
    if isinstance(budget, Sequence) or (isinstance(budget, np.ndarray) and budget.dtype.kind in "US"):
        wanted = [str(b) for b in budget]
        if not wanted:
            raise ValueError("--label_budget is an empty list of names; name at least one image.")
        names = [_name(e, i) for i, e in enumerate(datalist)]
        known = set(names)
        seen: set[str] = set()
        for w in wanted:
            if w not in known:
                close = difflib.get_close_matches(w, names, n=5, cutoff=0.6)
                hint = f" Close names: {', '.join(close)}." if close else f" Names look like: {', '.join(names[:5])}."
                raise ValueError(f"--label_budget names an unknown image {w!r}; it is not in the datalist.{hint}")
            if w in seen:
                raise ValueError(f"--label_budget names {w!r} twice; list each image once.")
            seen.add(w)
        return [e for e, n in zip(datalist, names) if n in seen]
    count = budget_count(budget, len(datalist))
    order = np.random.default_rng(int(seed)).permutation(len(datalist))
    chosen = sorted(int(i) for i in order[:count])
    return [datalist[i] for i in chosen]


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON types."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def budget_record(selected: Sequence[Mapping[str, Any]], budget: Any, seed: int | None) -> dict[str, Any]:
    """JSON-serialisable record of a selection: ``{"budget", "seed", "count", "names"}``.

    ``names`` are the entries' ``"name"`` (else the image file stem), in selection order; feeding them
    back as the budget reproduces the selection.
    """
    names = []
    for i, entry in enumerate(selected):
        if "name" in entry:
            names.append(str(entry["name"]))
        elif "image" in entry:
            names.append(str(entry["image"]).replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0])
        else:
            raise KeyError(f"selected entry {i} has neither 'name' nor 'image'; cannot record it.")
    return {
        "budget": _plain(budget),
        "seed": None if seed is None else int(seed),
        "count": len(names),
        "names": names,
    }
