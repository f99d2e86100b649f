"""A checked datalist for a folder of images (the input of self-supervised pretraining), and the folder listing
that every data set reader shares: files paired by stem, names in natural order."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def natural_sort_key(text: str | os.PathLike) -> tuple:
    """Sort key that orders embedded numbers by value, so ``train_2`` comes before ``train_10``."""
    parts = re.split(r"(\d+)", os.fspath(text))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def files_by_stem(folder: Path, suffixes: Sequence[str], kind: str = "files") -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` with one of ``suffixes`` (hidden files skipped).

    Readers pair images with annotations by stem, so two files with one stem (``a.png`` and ``a.tif``) are an
    error naming both rather than a silent choice.
    """
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in out:
                raise ValueError(
                    f"'{folder}' holds two {kind} named '{p.stem}': '{out[p.stem].name}' and '{p.name}'; keep one."
                )
            out[p.stem] = p
    return out


# folders that hold the label images of the supported layouts (preprocessed ``img/`` + ``labelcol/``,
# the Decathlon's ``imagesTr/`` + ``labelsTr/``)
LABEL_FOLDERS = ("labelcol", "labelsTr", "labelsTs")


def _is_annotation(path: Path, root: Path) -> bool:
    """Label images of the supported layouts: GlaS ``*_anno.bmp`` beside the images, or anything in a label folder."""
    return path.stem.endswith("_anno") or any(part in LABEL_FOLDERS for part in path.relative_to(root).parts[:-1])


def image_folder_datalist(
    dataset_dir: str | Path,
    min_size: int | Sequence[int] = 0,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude_annotations: bool = True,
    verify: bool = True,
    image_key: str = "image",
    recursive: bool = True,
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image under ``dataset_dir`` (searched recursively, sorted).

    Each image is opened up front (and fully decoded when ``verify``), so that an unreadable or truncated
    file, or one smaller than the training crop, stops the run before training with its name and the fix,
    instead of failing inside a data-loader worker hours later.

    Args:
        dataset_dir: folder of png/jpg/bmp/tif images.
        min_size: smallest allowed (height, width), e.g. the crop size.
        extensions: file suffixes to take (case-insensitive).
        exclude_annotations: skip label images: ``*_anno.*`` (GlaS keeps them beside the images) and the files
            in the label folders of the supported layouts (:data:`LABEL_FOLDERS`).
        verify: decode every image once to catch truncated files.
        image_key: key of the path in each datalist entry.
        recursive: search sub-folders too; inference takes the folder's own images only, so that an output
            folder inside it is never read back as input.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset_dir '{root}' does not exist or is not a folder; pass --dataset_dir with a folder of "
            f"{'/'.join(e.lstrip('.') for e in extensions)} images."
        )
    suffixes = {e.lower() for e in extensions}
    found = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes)
    skipped = [p for p in files if _is_annotation(p, root)] if exclude_annotations else []
    if skipped:
        files = [p for p in files if not _is_annotation(p, root)]
    if not files and skipped:
        raise FileNotFoundError(
            f"'{root}' holds only label images ({len(skipped)}: *_anno files or {'/, '.join(LABEL_FOLDERS)}/), which "
            "pretraining skips; point --dataset_dir at the folder that holds the images."
        )
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(sorted(suffixes))}) found under '{root}'; check --dataset_dir."
        )
    min_hw = (int(min_size), int(min_size)) if isinstance(min_size, (int, float)) else tuple(int(s) for s in min_size)
    for path in files:
        try:
            with Image.open(path) as im:
                width, height = im.size
                if verify:
                    im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(
                f"cannot read image '{path}' ({e}); it may be truncated or not an image: replace or remove it."
            ) from e
        if height < min_hw[0] or width < min_hw[1]:
            raise ValueError(
                f"image '{path}' is {height} x {width} pixels, smaller than the crop {min_hw[0]} x {min_hw[1]}; "
                "lower --image_size or remove the image."
            )
    by_folder = Counter(p.parent.relative_to(root).as_posix() for p in files)
    where = ", ".join(f"{n} in '{f}'" for f, n in by_folder.items())
    note = f"; skipped {len(skipped)} label images (*_anno, {'/, '.join(LABEL_FOLDERS)}/)" if skipped else ""
    logger.info(f"using {len(files)} images under '{root}': {where}{note}.")
    return [{image_key: str(p)} for p in files]
