"""Reader of the preprocessed layout that the paper's public code trains on.

``root/img/<name>.png`` with ``root/labelcol/<name>_anno.png`` (GlaS) or ``root/labelcol/<name>.png``
(MoNuSeg): binary masks, any value > 0 meaning foreground (often stored as 255), or instance maps (one id per
object), whose ids are kept so that touching nuclei stay apart for AJI and PQ. Supporting it lets users of
the original code reuse their prepared folders; the naming is detected, not configured.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai_mdm.data.folder import files_by_stem, natural_sort_key

__all__ = ["preprocessed_datalist"]

logger = logging.getLogger(__name__)

_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _find_root(root: Path, split: str | None, image_dir: str) -> Path:
    if split is None:
        return root
    candidates = [root / split, root / f"{split.capitalize()}_Folder", root / f"{split}_Folder"]
    for c in candidates:
        if (c / image_dir).is_dir():
            return c
    raise FileNotFoundError(
        f"no '{image_dir}' folder for split {split!r} under '{root}'; looked in "
        + ", ".join(f"'{c / image_dir}'" for c in candidates)
        + "."
    )


def preprocessed_datalist(
    root: str | os.PathLike,
    split: str | None = None,
    image_dir: str = "img",
    label_dir: str = "labelcol",
) -> list[dict[str, str]]:
    """``[{"image", "label", "name", "label_format": "binary"}, ...]`` of a preprocessed folder, sorted naturally.

    Args:
        root: folder holding ``img/`` and ``labelcol/``; or, with ``split``, the folder holding
            ``<split>/`` or ``<Split>_Folder/`` (the public code's ``Train_Folder``, ``Test_Folder``).
        split: optional sub-folder, see above.
        image_dir, label_dir: names of the two folders.

    The label naming (``<name>_anno.<ext>`` or ``<name>.<ext>``) is detected from the files. Every image
    needs its label and every label its image. ``"label_format": "binary"`` tells
    :class:`monai_mdm.transforms.LoadInstanceMaskd` to binarise (> 0) and take connected
    components as instances, unless the label file numbers its instances (then they are kept).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"preprocessed data folder '{root}' does not exist or is not a folder; pass the folder holding "
            f"'{image_dir}/' and '{label_dir}/'."
        )
    base = _find_root(root, split, image_dir)
    img_folder, lab_folder = base / image_dir, base / label_dir
    for folder in (img_folder, lab_folder):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"folder '{folder}' is missing; the preprocessed layout is '{image_dir}/<name>.png' with "
                f"'{label_dir}/<name>_anno.png' (GlaS) or '{label_dir}/<name>.png' (MoNuSeg) under '{base}'."
            )
    images, labels = files_by_stem(img_folder, _EXTENSIONS), files_by_stem(lab_folder, _EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(_EXTENSIONS)}) in '{img_folder}'; the folder is empty.")
    if not labels:
        raise FileNotFoundError(f"no label images in '{lab_folder}'; the folder is empty.")

    # detect the naming: the one under which more images find a label (ties: GlaS "_anno")
    with_anno = sum(f"{n}_anno" in labels for n in images)
    plain = sum(n in labels for n in images)
    suffix = "_anno" if with_anno >= plain and with_anno > 0 else ""
    expected_ext = next(iter(labels.values())).suffix

    datalist = []
    for name in sorted(images, key=natural_sort_key):
        label = labels.get(name + suffix)
        if label is None:
            raise FileNotFoundError(
                f"image '{images[name]}' has no label '{lab_folder / (name + suffix + expected_ext)}' "
                f"(the folder uses the naming '<name>{suffix}{expected_ext}'); add the label or remove the image."
            )
        datalist.append({"image": str(images[name]), "label": str(label), "name": name, "label_format": "binary"})
    used = {name + suffix for name in images}
    for stem in sorted(set(labels) - used, key=natural_sort_key):
        image_name = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
        raise FileNotFoundError(
            f"label '{labels[stem]}' has no image '{img_folder / (image_name + '.png')}'; add the image or remove "
            "the label."
        )
    logger.info(f"preprocessed: {len(datalist)} pairs in '{base}' (labels named '<name>{suffix}').")
    return datalist
