"""Per-case Dice of each class of a multi-class (e.g. 3D organ) segmentation run, written as tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys

from monai_mdm.handlers.segmentation_report import StagedReport
from monai_mdm.handlers.tracking import log_artifact, log_metrics


class DiceReport(StagedReport):
    """Score every case an evaluator segments with one Dice per foreground class; write the tables at the end.

    The argmax of the evaluator's ``pred`` (class scores) is compared with ``batch[label_key]`` class by class:
    ``dice_<class>`` is :func:`monai_mdm.metrics.paper_dice` of ``pred == c`` against ``label == c`` (1.0 when the
    class is absent from both), ``mean_dice`` their mean. Voxels labelled ``ignore_index`` count for nothing.
    On completion ``metrics.csv`` (one row per case) and ``metrics.json`` (rows, mean and std) are written with
    :class:`monai_mdm.metrics.MetricTable`, as the 2D bundles' reports are, and the summary is printed; with
    MLflow tracking the means are logged as ``test_<metric>`` metrics and the tables as artifacts.
    Use the evaluator with ``decollate=False``.

    Args:
        output_dir: folder of the tables.
        class_names: one name per class, background first.
        run: label of this run in the table.
        label_key / name_key: batch keys of the label map and the case name.
        ignore_index: label value to leave out.
        extra: settings recorded in metrics.json.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        run: str = "",
        label_key: str = CommonKeys.LABEL,
        name_key: str = "name",
        ignore_index: int = 255,
        extra: dict | None = None,
    ) -> None:
        from monai_mdm.metrics import MetricTable

        if len(class_names) < 2:
            raise ValueError(f"class_names must name the background and at least one class, got {class_names}.")
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.run = run
        self.label_key, self.name_key = label_key, name_key
        self.ignore_index = int(ignore_index)
        self.extra = dict(extra or {})
        self.table = MetricTable(run_key="run")

    def case_dice(self, classes: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """``{"dice_<class>": ..., "mean_dice": ...}`` of one class map against its label (same shape)."""
        from monai_mdm.metrics import pair_arrays, paper_dice

        classes, truth = pair_arrays(classes, truth)
        keep = truth != self.ignore_index
        classes, truth = classes[keep], truth[keep]
        scores = {f"dice_{n}": paper_dice(classes == c, truth == c) for c, n in enumerate(self.class_names) if c}
        return {**scores, "mean_dice": float(np.mean(list(scores.values())))}

    def iteration_completed(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, (list, tuple)):
            raise TypeError("DiceReport needs the evaluator's batched output: set decollate=False.")
        names = batch[self.name_key]
        names = [names] if isinstance(names, str) else list(names)
        for name, pred, label in zip(names, output[CommonKeys.PRED], batch[self.label_key]):
            classes = torch.as_tensor(pred).argmax(0).cpu().numpy()
            truth = np.rint(np.asarray(torch.as_tensor(label).float().cpu())).astype(np.int64)
            self.table.add(str(name), self.case_dice(classes, truth.reshape(classes.shape)), run=self.run or None)

    def completed(self, engine: Engine) -> None:
        if not len(self.table):
            raise RuntimeError("the evaluation saw no cases; check the test datalist.")
        self.table.write_csv(self.out / "metrics.csv")
        self.table.write_json(self.out / "metrics.json", extra={"class_names": self.class_names, **self.extra})
        self.publish()
        paths = [self.output_dir / "metrics.csv", self.output_dir / "metrics.json"]
        print(self.table.format())
        log_metrics(engine, {f"test_{k}": v["mean"] for k, v in self.table.summary().items()})
        for path in paths:
            log_artifact(engine, str(path), "evaluation")
