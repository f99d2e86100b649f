"""Per-image evaluation of a segmentation run: metrics table, predictions and overlays on disk."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from PIL import Image

from monai_mdm.handlers.reconstruction_grid import to_uint8_rgb
from monai_mdm.handlers.tracking import log_artifact, log_metrics
from monai_mdm.utils import StagedFolder, atomic_write

logger = logging.getLogger(__name__)

# one colour per class for overlays (0 = background is left transparent)
_PALETTE = np.array(
    [[0, 0, 0], [0, 200, 70], [230, 40, 40], [40, 90, 230], [240, 200, 0], [200, 0, 200], [0, 200, 200]], np.uint8
)


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Colour the non-background classes of ``classes`` (H, W) over ``image`` (H, W, 3) with MONAI's
    ``blend_images``; class ``c`` takes palette colour ``c`` (past the palette's end the class colours repeat),
    given to the colour map as the centre of that colour's bin."""
    from matplotlib.colors import ListedColormap
    from monai.visualize import blend_images

    c = np.asarray(classes).astype(np.int64)
    k = np.where(c > 0, 1 + (c - 1) % (len(_PALETTE) - 1), 0)
    label = np.where(k > 0, (k + 0.5) / len(_PALETTE), 0.0)[None]  # 0 stays transparent
    blended = blend_images(
        np.moveaxis(image, -1, 0).astype(np.float64) / 255.0, label, alpha=alpha,
        cmap=ListedColormap(_PALETTE / 255.0), rescale_arrays=False, transparent_background=True,
    )  # fmt: skip
    return (np.moveaxis(blended, 0, -1) * 255.0 + 0.5).astype(np.uint8)


def overlay_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, gap: int = 4) -> np.ndarray:
    """Image | truth overlay | prediction overlay, side by side."""
    h, w = image.shape[:2]
    panel = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    for i, tile in enumerate((image, overlay(image, truth), overlay(image, prediction))):
        panel[:, i * (w + gap) : i * (w + gap) + w] = tile
    return panel


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


class StagedReport:
    """Base of the evaluation reports: files go to ``self.out``, a staging folder from the evaluation's start
    that replaces ``output_dir`` when it completes (see :class:`~monai_mdm.utils.StagedFolder`). Subclasses
    define ``iteration_completed`` and ``completed`` (which calls :meth:`publish`)."""

    output_dir: Path

    @property
    def out(self) -> Path:
        staged = getattr(self, "_staged", None)
        return staged.partial if staged is not None else self.output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._begin)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _begin(self, engine: Engine) -> None:
        self._staged = StagedFolder(self.output_dir)
        self._staged.begin()

    def publish(self) -> None:
        """Move the staged files into ``output_dir`` (call once everything is written)."""
        staged, self._staged = getattr(self, "_staged", None), None
        if staged is not None:
            staged.commit()


class PublishWhenComplete:
    """Let a writer (MONAI's ``SaveImaged``) write into ``staging`` and move its files into ``output_dir`` only
    when the run completes: an inference that fails midway adds no prediction and changes none, and the folder's
    other files stay (unlike the reports, which replace their whole folder)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.folder = StagedFolder(output_dir)

    @staticmethod
    def staging_for(output_dir: str | Path) -> str:
        """Where the writer should write: the hidden sibling of ``output_dir``."""
        return str(StagedFolder(output_dir).partial)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.folder.begin())
        engine.add_event_handler(Events.COMPLETED, lambda _: self.folder.merge())


class NucleusInstanceWriter:
    """Write the nucleus instances that inference's postprocessing put in ``output[instance_key]``
    (:class:`monai_mdm.transforms.NucleusInstancesd`): ``<image stem>_nuclei.tif`` (labelled TIFF) and
    ``<image stem>_nuclei.geojson`` (QuPath polygons) in ``output_dir``, each written atomically (give it the
    staging folder of :class:`PublishWhenComplete` so that they appear with the masks when the run completes).
    """

    def __init__(self, output_dir: str | Path, instance_key: str = "pred_instances", image_key: str = "image",
                 object_type: str = "detection") -> None:  # fmt: skip
        self.output_dir = Path(output_dir)
        self.instance_key, self.image_key = instance_key, image_key
        self.object_type = object_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from monai_mdm.data.instance_export import write_nucleus_instances

        outputs = engine.state.output
        for item in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            if self.instance_key not in item:
                raise KeyError(
                    f"NucleusInstanceWriter: the output holds no {self.instance_key!r}; add NucleusInstancesd to the "
                    "postprocessing before this handler runs."
                )
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            source = meta.get("filename_or_obj")
            if not source:
                raise ValueError("NucleusInstanceWriter: the image carries no file name to name its outputs by.")
            nuclei = np.asarray(torch.as_tensor(item[self.instance_key]).cpu()).squeeze(0)
            write_nucleus_instances(self.output_dir, f"{Path(str(source)).stem}_nuclei", nuclei,
                                    object_type=self.object_type)  # fmt: skip


class SegmentationReport(StagedReport):
    """Score every image an evaluator segments, save what it predicted, and write the tables at the end.

    For each image of the batch (the evaluator's ``pred`` holds class scores): the argmax class map is
    scored with :func:`monai_mdm.metrics.evaluate_case` against the instance annotation in
    ``batch[instance_key]``; the class map is saved as ``predictions/<name>.png`` (and ``.nii.gz`` when
    ``save_nifti``); ``overlays/<name>.png`` shows image | truth | prediction. On completion
    ``metrics.csv`` (one row per image) and ``metrics.json`` (rows and mean +- std) are written and the
    summary is printed; with MLflow tracking the means are logged as metrics and the tables and overlays
    as artifacts.

    With ``instances`` (MoNuSeg) the predicted nuclei are :func:`monai_mdm.transforms.nucleus_instances` of the
    class map by that method, scored by AJI and PQ, and written as ``instances/<name>.tif`` (labelled TIFF) and
    ``instances/<name>.geojson`` (QuPath polygons); without it the instance metrics take the connected
    components of the foreground.

    Args:
        output_dir: folder for the tables, predictions and overlays.
        dataset: "glas" or "monuseg": which metrics apply.
        run: label of this run (e.g. model and seed) in the table.
        instance_key / name_key: batch keys of the instance annotation and the image name.
        save_nifti: also write predictions as NIfTI.
        instances: None, ``"watershed"`` (needs a model of the nucleus boundary target, 3 classes) or
            ``"connected_components"``.
        extra: settings recorded in metrics.json (e.g. the label budget).
    """

    def __init__(
        self,
        output_dir: str | Path,
        dataset: str = "glas",
        run: str = "",
        instance_key: str = "label_instances",
        name_key: str = "name",
        save_nifti: bool = False,
        save_overlays: bool = True,
        instances: str | None = None,
        extra: dict | None = None,
    ) -> None:
        from monai_mdm.metrics import MetricTable
        from monai_mdm.transforms import check_instance_method

        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.run = run
        self.instance_key = instance_key
        self.name_key = name_key
        self.save_nifti = save_nifti
        self.save_overlays = save_overlays
        self.instances = None if instances is None else check_instance_method(instances)
        self.extra = dict(extra or {})
        self.table = MetricTable(run_key="run")

    def iteration_completed(self, engine: Engine) -> None:
        from monai_mdm.metrics import evaluate_case

        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, (list, tuple)):  # decollated
            preds = [o[CommonKeys.PRED] for o in output]
            images = [o[CommonKeys.IMAGE] for o in output]
        else:
            preds, images = list(output[CommonKeys.PRED]), list(output[CommonKeys.IMAGE])
        names = _as_list(batch[self.name_key])
        truths = _as_list(batch[self.instance_key])
        for name, pred, image, truth in zip(names, preds, images, truths):
            classes = torch.as_tensor(pred).argmax(0).cpu().numpy().astype(np.uint8)
            gt = np.asarray(torch.as_tensor(truth).cpu()).squeeze(0)
            nuclei = self._nuclei(name, classes, torch.as_tensor(pred).shape[0])
            self.table.add(name, evaluate_case(classes, gt, self.dataset, pred_instances=nuclei), run=self.run or None)
            _save_png(self.out / "predictions" / f"{name}.png", classes * (255 // max(1, classes.max(initial=1))))
            if self.save_nifti:
                self._save_nifti(name, classes, image)
            if self.save_overlays:
                rgb = to_uint8_rgb(torch.as_tensor(image)[None])[0]
                _save_png(self.out / "overlays" / f"{name}.png", overlay_panel(rgb, gt > 0, classes))

    def _nuclei(self, name: str, classes: np.ndarray, num_classes: int) -> np.ndarray | None:
        """The predicted instances by ``self.instances``, written as labelled TIFF and GeoJSON; None without it."""
        from monai_mdm.data.instance_export import write_nucleus_instances
        from monai_mdm.transforms import NUCLEUS_CLASSES, nucleus_instances

        if self.instances is None:
            return None
        if self.instances == "watershed" and num_classes != len(NUCLEUS_CLASSES):
            raise ValueError(
                f"--instances watershed needs a model trained on the nucleus boundary target "
                f"({len(NUCLEUS_CLASSES)} classes: {', '.join(NUCLEUS_CLASSES)}); this model predicts {num_classes}. "
                "Retrain it with this bundle's train.json, or use --instances connected_components."
            )
        nuclei = nucleus_instances(classes, self.instances)
        write_nucleus_instances(self.out / "instances", str(name), nuclei)
        return nuclei

    def _save_nifti(self, name: str, classes: np.ndarray, image) -> None:
        import nibabel as nib

        affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
        if affine.shape != (4, 4):
            affine = np.eye(4)
        data = classes.T[..., None]  # nibabel stores (x, y, z): columns first, one slice
        img = nib.Nifti1Image(data.astype(np.uint8), affine)
        atomic_write(self.out / "predictions" / f"{name}.nii.gz", lambda f: f.write(img.to_bytes()))

    def completed(self, engine: Engine) -> None:
        if not len(self.table):
            raise RuntimeError("the evaluation saw no images; check the test datalist.")
        self.table.write_csv(self.out / "metrics.csv")
        self.table.write_json(self.out / "metrics.json", extra=self.extra)
        self.publish()
        csv_path, json_path = self.output_dir / "metrics.csv", self.output_dir / "metrics.json"
        summary = self.table.summary()
        print(self.table.format())
        log_metrics(engine, {f"test_{k}": v["mean"] for k, v in summary.items()})
        for path in (csv_path, json_path):
            log_artifact(engine, path, "evaluation")
        log_artifact(engine, self.output_dir / "overlays", "evaluation/overlays")


def _as_list(x) -> Sequence:
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return list(x)
    return [x]


class ClassIoUReport(StagedReport):
    """Evaluation of a multi-class (face parts) run: mean IoU over the whole test set, per class.

    Intersections and unions are summed over all test images (the FFHQ-34 / CelebA-19 protocol, see
    :class:`monai_mdm.metrics.MultiClassIoU`); ``ignore_index`` pixels do not count. Writes
    ``class_iou.csv`` (one row per class), ``metrics.json`` (per-class IoU, mIoU, settings), colour
    predictions ``predictions/<name>.png`` and overlays ``overlays/<name>.png`` (image | truth |
    prediction) with the class palette, and ``legend.png`` naming the colours. With MLflow tracking the
    mIoU and per-class IoUs are logged as metrics and the files as artifacts.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        ignore_index: int = 255,
        run: str = "",
        label_key: str = "label",
        name_key: str = "name",
        save_overlays: bool = True,
        extra: dict | None = None,
    ) -> None:
        from monai_mdm.data.faces import face_palette
        from monai_mdm.metrics import MultiClassIoU

        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.run = run
        self.label_key, self.name_key = label_key, name_key
        self.save_overlays = save_overlays
        self.extra = dict(extra or {})
        self.palette = face_palette(len(self.class_names))
        self.iou = MultiClassIoU(len(self.class_names), ignore_index)
        self.names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.iou.reset())
        super().attach(engine)

    def _colour(self, classes: np.ndarray) -> np.ndarray:
        out = self.palette[np.clip(classes, 0, len(self.palette) - 1)]
        out[classes == self.ignore_index] = 255
        return out

    def iteration_completed(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        preds, images = list(output[CommonKeys.PRED]), list(output[CommonKeys.IMAGE])
        for name, pred, image, label in zip(_as_list(batch[self.name_key]), preds, images, batch[self.label_key]):
            classes = torch.as_tensor(pred).argmax(0).cpu().numpy().astype(np.int64)
            truth = np.asarray(torch.as_tensor(label).cpu()).squeeze(0).astype(np.int64)
            self.iou.update(classes, truth)
            self.names.append(str(name))
            _save_png(self.out / "predictions" / f"{name}.png", self._colour(classes))
            if self.save_overlays:
                rgb = to_uint8_rgb(torch.as_tensor(image)[None])[0]
                h, w = classes.shape
                panel = np.full((h, 3 * w + 8, 3), 255, np.uint8)
                for i, tile in enumerate((rgb, self._colour(truth), self._colour(classes))):
                    blend = tile if i == 0 else (0.5 * rgb + 0.5 * tile).astype(np.uint8)
                    panel[:, i * (w + 4) : i * (w + 4) + w] = blend
                _save_png(self.out / "overlays" / f"{name}.png", panel)

    def completed(self, engine: Engine) -> None:
        import json

        if not self.names:
            raise RuntimeError("the evaluation saw no images; check the test datalist.")
        per_class = self.iou.per_class()
        miou = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
        rows = ["class_id,class_name,iou"] + [
            f"{i},{n},{'' if np.isnan(v) else f'{v:.6f}'}" for i, (n, v) in enumerate(zip(self.class_names, per_class))
        ]
        atomic_write(self.out / "class_iou.csv", lambda f: f.write(("\n".join(rows) + "\n").encode()))
        doc = {
            "run": self.run,
            "images": self.names,
            "mean_iou": miou,
            "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.class_names, per_class)},
            **self.extra,
        }
        atomic_write(self.out / "metrics.json", lambda f: f.write(json.dumps(doc, indent=2).encode()))
        self._save_legend()
        self.publish()
        print(f"mean IoU over {len(self.names)} images: {miou:.4f}")
        for n, v in zip(self.class_names, per_class):
            print(f"  {n:<40} {'n/a' if np.isnan(v) else f'{v:.4f}'}")
        per_class_metrics = {f"test_iou/{n}": v for n, v in zip(self.class_names, per_class)}
        log_metrics(engine, {"test_mean_iou": miou, **per_class_metrics})
        for name in ("class_iou.csv", "metrics.json", "legend.png"):
            log_artifact(engine, self.output_dir / name, "evaluation")
        log_artifact(engine, self.output_dir / "overlays", "evaluation/overlays")

    def _save_legend(self, row: int = 14) -> None:
        from PIL import ImageDraw

        legend = Image.new("RGB", (320, row * len(self.class_names) + 4), "white")
        draw = ImageDraw.Draw(legend)
        for i, name in enumerate(self.class_names):
            draw.rectangle([2, 2 + i * row, 14, 12 + i * row], fill=tuple(int(c) for c in self.palette[i]))
            draw.text((20, 1 + i * row), f"{i} {name}", fill="black")
        atomic_write(self.out / "legend.png", lambda f: legend.save(f, format="PNG"))
