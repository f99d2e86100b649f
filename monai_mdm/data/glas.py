"""GlaS (Warwick-QU, MICCAI 2015) reader: datalists of the official flat folder.

The official download is one flat folder: ``train_<n>.bmp`` with ``train_<n>_anno.bmp`` (pixel value =
gland instance id), the same for ``testA_<n>`` and ``testB_<n>``, and ``Grade.csv`` (name, patient,
benign/malignant, sub-grade). Entries are sorted naturally (``train_2`` before ``train_10``) so that
budgets and seeds select the same images everywhere.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from monai_mdm.data.folder import natural_sort_key
from monai_mdm.data.instances import image_size

__all__ = ["GLAS_SPLITS", "glas_datalist", "read_glas_grades"]

logger = logging.getLogger(__name__)

GLAS_SPLITS = {"train": ("train",), "testA": ("testA",), "testB": ("testB",), "test": ("testA", "testB")}
_EXTENSIONS = (".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg")
_FILE = re.compile(r"^(?P<split>train|testA|testB)_(?P<index>\d+)(?P<anno>_anno)?$")


def read_glas_grades(csv_path: str | os.PathLike) -> dict[str, str]:
    """``{name: "benign" | "malignant"}`` from GlaS ``Grade.csv``.

    The released file has spaces after the commas (``name, patient ID, grade (GlaS), ...``) in header
    and values; they are stripped. The grade column is the one named ``grade (GlaS)``, else the first
    column whose name starts with ``grade``.
    """
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"GlaS grade file '{path}' is empty; re-download Grade.csv or remove it.")
    header = [h.lower() for h in rows[0]]
    grade_columns = [i for i, h in enumerate(header) if h == "grade (glas)"] or [
        i for i, h in enumerate(header) if h.startswith("grade")
    ]
    if "name" not in header or not grade_columns:
        raise ValueError(
            f"GlaS grade file '{path}' has header {rows[0]}; expected columns 'name' and 'grade (GlaS)'. "
            "Re-download Grade.csv or remove it."
        )
    name_col, grade_col = header.index("name"), grade_columns[0]
    grades = {}
    for row in rows[1:]:
        if len(row) > max(name_col, grade_col) and row[name_col]:
            grades[row[name_col]] = row[grade_col].lower()
    return grades


def _hint_subfolder(root: Path) -> str:
    """Name a subfolder that does hold GlaS files, for when root points one level too high."""
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(_FILE.match(p.stem) for p in sub.iterdir() if p.is_file()):
            return f" The subfolder '{sub}' holds GlaS files: pass that folder."
    return ""


def glas_datalist(
    root: str | os.PathLike, split: str = "train", grades: bool = True, verify: bool = True
) -> list[dict[str, str]]:
    """``[{"image", "label", "name", "grade"}, ...]`` of one GlaS split, sorted naturally.

    Args:
        root: the flat GlaS folder (holding ``train_1.bmp``, ``train_1_anno.bmp``, ..., ``Grade.csv``).
        split: ``"train"`` (85 images), ``"testA"`` (60), ``"testB"`` (20) or ``"test"`` (testA then testB).
        grades: add ``"grade"`` (``"benign"``/``"malignant"``) for images that ``Grade.csv`` lists.
        verify: check now, from the file headers, that every annotation has its image's size, so that a
            wrong pair stops the run before training instead of in a data-loader worker.

    ``"label"`` is the ``_anno`` file (instance ids); load it with
    :class:`monai_mdm.transforms.LoadInstanceMaskd`.
    """
    root = Path(root).expanduser()
    if split not in GLAS_SPLITS:
        raise ValueError(f"split must be one of {sorted(GLAS_SPLITS)}, got {split!r}.")
    if not root.is_dir():
        raise FileNotFoundError(
            f"GlaS folder '{root}' does not exist or is not a folder; pass the unpacked "
            "'Warwick QU Dataset (Released 2016_07_08)' folder holding train_1.bmp, train_1_anno.bmp, ..."
        )
    wanted = GLAS_SPLITS[split]
    images: dict[str, Path] = {}
    annotations: dict[str, Path] = {}
    for p in root.iterdir():
        m = _FILE.match(p.stem)
        if not (m and p.is_file() and p.suffix.lower() in _EXTENSIONS and m["split"] in wanted):
            continue
        name = f"{m['split']}_{m['index']}"
        table = annotations if m["anno"] else images
        if name in table:
            raise ValueError(
                f"GlaS folder '{root}' holds two files for '{name}{m['anno'] or ''}': '{table[name].name}' and "
                f"'{p.name}'; keep one."
            )
        table[name] = p
    if not images and not annotations:
        raise FileNotFoundError(
            f"no GlaS {'/'.join(wanted)} images ({'/'.join(w + '_<n>.bmp' for w in wanted)}) in '{root}'."
            + _hint_subfolder(root)
        )
    for name in sorted(set(images) - set(annotations), key=natural_sort_key):
        expected = root / f"{name}_anno{images[name].suffix}"
        raise FileNotFoundError(
            f"GlaS image '{images[name]}' has no annotation '{expected}'; add the annotation or remove the image."
        )
    for name in sorted(set(annotations) - set(images), key=natural_sort_key):
        expected = root / f"{name}{annotations[name].suffix}"
        raise FileNotFoundError(
            f"GlaS annotation '{annotations[name]}' has no image '{expected}'; add the image or remove the "
            "annotation."
        )

    grade_table: dict[str, str] = {}
    grade_csv = root / "Grade.csv"
    if grades and grade_csv.is_file():
        grade_table = read_glas_grades(grade_csv)
    elif grades:
        logger.info(f"no Grade.csv in '{root}': entries carry no grade.")

    # testA before testB, then natural order of the names
    names = sorted(images, key=lambda n: (wanted.index(n.split("_")[0]), natural_sort_key(n)))
    datalist = []
    for name in names:
        if verify:
            img_hw, ann_hw = image_size(images[name]), image_size(annotations[name])
            if img_hw != ann_hw:
                raise ValueError(
                    f"GlaS annotation '{annotations[name]}' is {ann_hw[0]} x {ann_hw[1]} (H x W) but image "
                    f"'{images[name]}' is {img_hw[0]} x {img_hw[1]}; the annotation must have its image's size: "
                    "check the pair, or re-export the annotation."
                )
        entry = {"image": str(images[name]), "label": str(annotations[name]), "name": name}
        if name in grade_table:
            entry["grade"] = grade_table[name]
        datalist.append(entry)
    logger.info(f"GlaS {split}: {len(datalist)} images in '{root}'.")
    return datalist
