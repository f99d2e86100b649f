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
``bundle_root`` inside that app. For MONAI Label's active learning (``next_sample``), :func:`scoring_method`
scores unlabelled images by the head ensemble's uncertainty and :func:`strategy` serves the most uncertain.
MONAI Label is imported only by those two.
"""

from __future__ import annotations

import os
from pathlib import Path

from monai.transforms import Compose

from monai_mdm.transforms.dictionary import LoadClassMapd, LoadInstanceMaskd

__all__ = [
    "APP_DIR_VARIABLE",
    "EnsembleEntropyScorer",
    "label_preprocessing",
    "pretrained_weights",
    "scoring_method",
    "strategy",
    "trains_in_app",
]

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


# ------------------------------------------------------------------------------------------- active learning

SCORE_KEY = "mdm_entropy"


class EnsembleEntropyScorer:
    """Scores the datastore's unlabelled images by :func:`monai_mdm.inferers.uncertainty.image_uncertainty` of the
    bundle's served ``models/model.pt``, with its ``inference.json`` preprocessing and sliding window.

    Each image's info gets ``<key>`` (mean entropy of the heads' averaged softmax), ``<key>_disagreement`` and
    ``<key>_model`` (the model file's mtime: an image is scored again once the model changes). MONAI Label's own
    ``Epistemic(key=...)`` strategy then serves the unlabelled image with the highest score. ``datastore`` is
    MONAI Label's (``get_unlabeled_images``, ``get_image_uri``, ``get_image_info``, ``update_image_info``).
    """

    def __init__(self, bundle_path: str | os.PathLike, key: str = SCORE_KEY, device: str = "cpu") -> None:
        self.bundle_path = Path(bundle_path)
        self.key = key
        self.device = device

    def _inference_parts(self):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.bundle_path / "configs" / "inference.json"))
        parser.config.update({"bundle_root": str(self.bundle_path)})
        return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("window_size"), \
            parser.get_parsed_content("overlap")  # fmt: skip

    def __call__(self, request: dict | None, datastore) -> dict:
        import torch

        from monai_mdm.inferers import load_segmentation_model
        from monai_mdm.inferers.uncertainty import image_uncertainty

        model_path = self.bundle_path / "models" / "model.pt"
        version = model_path.stat().st_mtime_ns if model_path.is_file() else None
        if version is None:
            return {"scored": 0, "reason": f"no trained model at '{model_path}' yet"}
        device = torch.device((request or {}).get("device", self.device))
        model = load_segmentation_model(model_path, device)
        preprocessing, window, overlap = self._inference_parts()
        scored = {}
        for image_id in datastore.get_unlabeled_images():
            if (datastore.get_image_info(image_id) or {}).get(f"{self.key}_model") == version:
                continue
            image = preprocessing({"image": datastore.get_image_uri(image_id)})["image"]
            score = image_uncertainty(model, torch.as_tensor(image)[None].to(device), window, overlap)
            info = {self.key: float(score["entropy"][0]), f"{self.key}_disagreement": float(score["disagreement"][0]),
                    f"{self.key}_model": version}  # fmt: skip
            datastore.update_image_info(image_id, info)
            scored[image_id] = info[self.key]
        return {"scored": len(scored), "scores": scored}


def scoring_method(bundle_path: str | os.PathLike, key: str = SCORE_KEY, device: str = "cpu"):
    """:class:`EnsembleEntropyScorer` as a MONAI Label ``ScoringMethod``, for an app's ``init_scoring_methods``
    (MONAI Label is imported here, not when the bundle trains)."""
    from monailabel.interfaces.tasks.scoring import ScoringMethod

    class EnsembleEntropyScoring(ScoringMethod):
        def __init__(self) -> None:
            super().__init__("Uncertainty of the few-shot head ensemble (mean entropy per image)")
            self.scorer = EnsembleEntropyScorer(bundle_path, key, device)

        def __call__(self, request, datastore):
            return self.scorer(request, datastore)

    return EnsembleEntropyScoring()


def strategy(key: str = SCORE_KEY):
    """MONAI Label's ``Epistemic`` strategy on :func:`scoring_method`'s score: the most uncertain unlabelled image."""
    from monailabel.tasks.activelearning.epistemic import Epistemic

    return Epistemic(key=key, desc="Most uncertain image for the few-shot head ensemble (mdm_entropy)")
