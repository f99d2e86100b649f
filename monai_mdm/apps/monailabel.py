"""What the few-shot bundles' ``train.json`` does differently when MONAI Label trains it (``BundleTrainTask``).

MONAI Label 0.8.5 runs the bundle's own ``configs/train.json`` on its copy of the bundle (``<app>/model/<name>``,
passed as ``bundle_root``), with the labelled images as ``train#dataset#data`` and nothing else of ours it could
set. Three things must then follow the app's copy rather than the command line's defaults, and only these:

* the trained model goes to ``<bundle_root>/models/model.pt``, the file MONAI Label's inference reads (and
  reloads when it changes), instead of ``<output_dir>/models/model.pt``;
* the pretrained UNet comes from the bundle: ``models/pretrained.pt`` if present, else the UNet inside the
  served ``models/model.pt`` (so a bundle installed for inference can be trained as it is);
* the labels are label images as MONAI Label saves them (one class index per pixel), read as class maps and
  refused, naming the file, when a value lies outside the classes.

MONAI Label is recognised by the ``MONAI_LABEL_APP_DIR`` its server exports to the training process, with
``bundle_root`` inside that app. This module does not import MONAI Label; the scoring method for its
active learning is in :mod:`monai_mdm.apps.monailabel_scoring`.
"""

from __future__ import annotations

import os
from pathlib import Path

from monai.transforms import Compose

from monai_mdm.transforms.dictionary import LoadClassMapd, LoadInstanceMaskd

__all__ = ["APP_DIR_VARIABLE", "label_preprocessing", "pretrained_weights", "trains_in_app"]

APP_DIR_VARIABLE = "MONAI_LABEL_APP_DIR"


def trains_in_app(bundle_root: str | os.PathLike) -> bool:
    """True when MONAI Label runs this training on its copy of the bundle (``bundle_root`` inside its app)."""
    app = os.environ.get(APP_DIR_VARIABLE)
    if not app:
        return False
    return Path(bundle_root).resolve().is_relative_to(Path(app).resolve())


def pretrained_weights(bundle_root: str | os.PathLike, default: str | os.PathLike) -> str:
    """``default`` (``--pretrained_weights``), except in MONAI Label: there ``models/pretrained.pt`` of the bundle,
    else its served ``models/model.pt`` (whose frozen UNet is the pretrained one)."""
    if not trains_in_app(bundle_root):
        return str(default)
    models = Path(bundle_root) / "models"
    for name in ("pretrained.pt", "model.pt"):
        if (models / name).is_file():
            return str(models / name)
    raise FileNotFoundError(
        f"MONAI Label trains the bundle '{bundle_root}' but its models/ holds neither pretrained.pt nor model.pt: "
        "copy the pretraining run's model_ema.pt to models/pretrained.pt (or a trained model.pt to models/model.pt)."
    )


def label_preprocessing(preprocessing: Compose, num_classes: int, ignore_index: int = 255) -> Compose:
    """``preprocessing`` with its annotation loader replaced by :class:`LoadClassMapd`: MONAI Label stores labels
    as class-index images, not as the data set's instance maps, and a value outside ``0..num_classes-1`` (other
    than ``ignore_index``) must stop the training with the file's name instead of becoming a class."""
    transforms = []
    for t in preprocessing.transforms:
        if isinstance(t, LoadInstanceMaskd):
            t = LoadClassMapd(t.keys, num_classes, image_key=t.image_key, ignore_index=ignore_index)
        transforms.append(t)
    return Compose(transforms)
