"""A small table of per-image metrics: mean +- std within runs and across runs, saved atomically.

The paper reports mean +- std over runs (seeds), so the headline number is the mean of per-run
means and the spread is the std of those per-run means, not the spread over images.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_mdm.utils import atomic_write
from .segmentation import (
    aji,
    gland_object_dice,
    gland_object_hausdorff,
    instances_from_binary,
    pair_arrays,
    panoptic_quality,
    paper_binary_aji,
    paper_dice,
    paper_iou_from_dice,
)

__all__ = ["MetricTable", "evaluate_case", "atomic_write_text", "GLAS_KEYS", "MONUSEG_KEYS"]

GLAS_KEYS = ("paper_dice", "paper_iou", "object_dice", "object_hausdorff")
MONUSEG_KEYS = ("paper_dice", "paper_aji_binary", "aji", "pq", "dq", "sq")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text so that readers never see a half-written table (see :func:`monai_mdm.utils.atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _stats(values: list[float], ddof: int) -> dict[str, float]:
    """Mean and std of the non-NaN values (NaN marks an undefined metric; it is skipped, not zeroed)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = float(v.std(ddof=ddof)) if v.size > ddof else math.nan
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


class MetricTable:
    """Per-image rows ``{"name": ..., <run_key>: ..., metric: value, ...}`` and their summaries.

    Args:
        run_key: column naming the run (e.g. "run" or "seed"); rows without it form one run "".
            Run labels are kept as text so CSV and JSON round trips are exact.
        ddof: delta degrees of freedom of every std (0 = numpy's default, population std;
            1 = sample std). A single run has std 0 across runs with ddof=0 and NaN with ddof=1.
    """

    def __init__(self, run_key: str = "run", ddof: int = 0) -> None:
        self.run_key = run_key
        self.ddof = ddof
        self.rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, name: str, metrics: Mapping[str, float] | None = None, run: Any = None, **more: float) -> None:
        """Add one image: ``table.add("img_1", evaluate_case(...), run=0)`` or with keyword metrics."""
        row: dict[str, Any] = {"name": str(name)}
        if run is not None and str(run) != "":
            row[self.run_key] = str(run)
        for k, v in {**(metrics or {}), **more}.items():
            if k in ("name", self.run_key):
                raise ValueError(f"'{k}' is reserved for the image name / run label.")
            row[k] = float(v)
        self.rows.append(row)

    def add_row(self, row: Mapping[str, Any]) -> None:
        """Add a row given as one mapping holding "name", optionally the run key, and metrics."""
        rest = {k: v for k, v in row.items() if k not in ("name", self.run_key)}
        self.add(row["name"], rest, run=row.get(self.run_key))

    @property
    def metric_names(self) -> list[str]:
        """Metric columns in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.rows:
            for k in row:
                if k not in ("name", self.run_key):
                    names.setdefault(k)
        return list(names)

    @property
    def runs(self) -> list[str]:
        """Run labels in order of first appearance ("" for rows without one)."""
        return list(dict.fromkeys(row.get(self.run_key, "") for row in self.rows))

    def per_run(self) -> dict[str, dict[str, dict[str, float]]]:
        """{run: {metric: {"mean", "std", "n"}}} over the images of each run."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for run in self.runs:
            rows = [r for r in self.rows if r.get(self.run_key, "") == run]
            out[run] = {m: _stats([r[m] for r in rows if m in r], self.ddof) for m in self.metric_names}
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """{metric: {"mean", "std", "n_runs", "n_images"}}: mean and std of the per-run means."""
        per_run = self.per_run()
        out = {}
        for m in self.metric_names:
            run_stats = [per_run[r][m] for r in per_run]
            s = _stats([st["mean"] for st in run_stats], self.ddof)
            n_images = sum(st["n"] for st in run_stats)
            out[m] = {"mean": s["mean"], "std": s["std"], "n_runs": s["n"], "n_images": n_images}
        return out

    def format(self, scale: float = 1.0, digits: int = 4) -> str:
        """Plain-text summary table; ``scale=100`` prints percentages like the paper's table."""
        header = ("metric", "mean", "std", "runs", "images")
        lines = [header]
        for m, s in self.summary().items():
            mean, std = s["mean"] * scale, s["std"] * scale
            lines.append((m, f"{mean:.{digits}f}", f"{std:.{digits}f}", str(s["n_runs"]), str(s["n_images"])))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = []
        for line in lines:
            cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
            text.append("  ".join(cells))
        return "\n".join(text)

    # --- files ------------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        has_run = any(self.run_key in r for r in self.rows)
        return ["name"] + ([self.run_key] if has_run else []) + self.metric_names

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One line per image; a metric missing for an image is an empty cell. Floats are written
        with ``repr`` so they read back bit-identical."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        return atomic_write_text(path, buf.getvalue())

    def write_json(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Rows, per-run statistics, the summary and ``extra`` (e.g. settings of the evaluation);
        NaN is written as null to stay valid JSON."""
        doc = {
            "run_key": self.run_key,
            "ddof": self.ddof,
            "extra": dict(extra or {}),
            "rows": self.rows,
            "per_run": self.per_run(),
            "summary": self.summary(),
        }
        return atomic_write_text(path, json.dumps(_nan_to_none(doc), indent=2) + "\n")

    to_csv = write_csv
    to_json = write_json

    @classmethod
    def from_csv(cls, path: str | os.PathLike, run_key: str = "run", ddof: int = 0) -> MetricTable:
        table = cls(run_key=run_key, ddof=ddof)
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                metrics = {k: float(v) for k, v in row.items() if k not in ("name", run_key) and v != ""}
                table.add(row["name"], metrics, run=row.get(run_key) or None)
        return table

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MetricTable:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        table = cls(run_key=doc.get("run_key", "run"), ddof=doc.get("ddof", 0))
        for row in doc["rows"]:
            table.add_row({k: (math.nan if v is None else v) for k, v in row.items()})
        return table


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def evaluate_case(
    pred_semantic: Any,
    gt_instances: Any,
    dataset: str = "glas",
    *,
    pred_instances: Any | None = None,
    min_size: int = 0,
    connectivity: int = 2,
) -> dict[str, float]:
    """All metrics of one image, with names that say which protocol they follow.

    ``pred_semantic`` is the predicted class map (foreground = value > 0); ``gt_instances`` the
    instance annotation. Paper protocol (both binarised): ``paper_dice`` and ``paper_iou`` (GlaS) or
    ``paper_dice`` and ``paper_aji_binary`` (MoNuSeg). Instance metrics on predicted objects =
    connected components of the prediction (``instances_from_binary`` with ``min_size`` and
    ``connectivity``) unless ``pred_instances`` is given: ``object_dice`` and ``object_hausdorff``
    (GlaS) or ``aji``, ``pq``, ``dq``, ``sq`` (MoNuSeg). Keys: ``GLAS_KEYS`` / ``MONUSEG_KEYS``.
    """
    key = dataset.lower()
    if key not in ("glas", "monuseg"):
        raise ValueError(f"dataset must be 'glas' or 'monuseg', got {dataset!r}.")
    pred, gt = pair_arrays(pred_semantic, gt_instances)
    if pred_instances is None:
        inst = instances_from_binary(pred, min_size=min_size, connectivity=connectivity)
    else:
        inst, _ = pair_arrays(pred_instances, gt)
    dice = paper_dice(pred, gt)
    if key == "glas":
        return {
            "paper_dice": dice,
            "paper_iou": paper_iou_from_dice(dice),
            "object_dice": gland_object_dice(inst, gt),
            "object_hausdorff": gland_object_hausdorff(inst, gt),
        }
    pq = panoptic_quality(inst, gt)
    return {
        "paper_dice": dice,
        "paper_aji_binary": paper_binary_aji(pred, gt),
        "aji": aji(inst, gt),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
    }
