"""3D volumes: a checked datalist for the Decathlon layout, conversion to NIfTI (the synthetic sets:
``monai_mdm.data.synthetic.volumes``).

Layout (the Medical Segmentation Decathlon's): ``imagesTr/<case>.nii.gz`` with ``labelsTr/<case>.nii.gz`` of the
same name, and ``imagesTs/`` (plus ``labelsTs/`` when test labels exist). :func:`volume_datalist` reads only the
NIfTI headers, so a broken file (missing label, shape mismatch, a 4D series, an affine that cannot be inverted)
stops a run before anything is trained or written, with the file and the problem named, instead of failing in a
data-loader worker. The voxels themselves are read by MONAI's ``LoadImaged`` (``NibabelReader`` or ``ITKReader``)
in the bundles.

Examples::

    python -m monai_mdm.data.volumes synthetic --out demo_data/Volumes --seed 0
    python -m monai_mdm.data.volumes convert scan.mha scan.nii.gz      # .mha/.mhd/.nrrd/.nii or a DICOM folder
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import NibabelWriter

from monai_mdm.utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "VOLUME_CLASSES",
    "AtomicNibabelWriter",
    "check_volume",
    "convert_to_nifti",
    "nifti_folder_datalist",
    "volume_datalist",
]

VOLUME_CLASSES = ("background", "organ", "lesion")
SPLIT_DIRS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# ----------------------------------------------------------------------------------------------
# checked datalists


def _case_name(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def _check_complete(path: Path, img: Any) -> None:
    """Refuse a file whose voxel data ends early, naming it: the header reads fine and the reader fails (or the
    process aborts in a loader thread) only when the data is loaded, far from any file name."""
    expected = int(np.prod(img.shape)) * np.dtype(img.get_data_dtype()).itemsize
    offset = int(img.header.get_data_offset()) if hasattr(img.header, "get_data_offset") else 0
    try:
        if path.suffix.lower() == ".gz":
            import gzip

            size = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (OSError, EOFError) as e:
        raise ValueError(f"NIfTI '{path}' is truncated or damaged ({type(e).__name__}: {e}); replace or remove "
                         "the file (copy it again).") from e
    if size < offset + expected:
        raise ValueError(f"NIfTI '{path}' is truncated: {size} bytes of data, its header needs {offset + expected}; "
                         "replace or remove the file (copy it again).")


def check_volume(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of a 3D NIfTI from its header alone; ``ValueError`` naming the file if it is unusable.

    Refused: files nibabel cannot read, images that are not 3D (a 4D series, a 2D slice), and affines that are
    not finite or cannot be inverted (zero spacing, collapsed directions), which would break resampling later.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises several kinds for truncated or foreign files
        raise ValueError(f"cannot read NIfTI '{path}' ({type(e).__name__}: {e}); replace or remove the file.") from e
    _check_complete(path, img)
    if len(shape) != 3:
        fix = (
            "split the series into one 3D file per channel or time point"
            if len(shape) > 3
            else "use a 2D bundle for single slices"
        )
        raise ValueError(f"'{path}' is {len(shape)}D (shape {shape}), but a 3D volume (x, y, z) is expected: {fix}.")
    linear = affine[:3, :3]
    det = float(np.linalg.det(linear)) if np.isfinite(affine).all() else float("nan")
    if not np.isfinite(det) or abs(det) < 1e-6 * max(float(np.abs(linear).max()), 1e-12) ** 3:
        raise ValueError(
            f"'{path}' has a non-invertible affine (determinant {det:.3g}):\n{np.array2string(affine, precision=4)}\n"
            "its voxel spacing (pixdim) or direction (sform/qform) is broken; fix the header before using it."
        )
    return shape, affine


def _nifti_files(folder: Path) -> list[Path]:
    # "._*" are macOS resource forks, which the Decathlon tarballs ship beside every volume
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
    )


def nifti_folder_datalist(folder: str | os.PathLike, image_key: str = "image") -> list[dict[str, str]]:
    """``[{"image": path, "name": case}, ...]`` for the NIfTI files directly in ``folder``, each checked by
    :func:`check_volume`; the input of the inference bundle."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir '{folder}' does not exist or is not a folder of .nii/.nii.gz files.")
    files = _nifti_files(folder)
    if not files:
        raise FileNotFoundError(f"no .nii or .nii.gz files in '{folder}'; check --dataset_dir.")
    for path in files:
        check_volume(path)
    return [{image_key: str(p), "name": _case_name(p)} for p in files]


def volume_datalist(
    dataset_dir: str | os.PathLike, split: str = "train", labels: bool = True
) -> list[dict[str, str]]:
    """``[{"image", "label", "name"}, ...]`` of one split of a Decathlon-layout folder, every file checked.

    Args:
        dataset_dir: folder holding ``imagesTr/`` + ``labelsTr/`` (``split="train"``) or ``imagesTs/`` +
            ``labelsTs/`` (``split="test"``).
        split: "train" or "test".
        labels: pair every image with the label of the same file name (refusing a missing one, another shape or
            another affine); ``False`` lists the images alone (self-supervised pretraining).
    """
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be one of {sorted(SPLIT_DIRS)}, got {split!r}.")
    root = Path(dataset_dir).expanduser()
    image_dir, label_dir = (root / d for d in SPLIT_DIRS[split])
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"'{image_dir}' not found: dataset_dir '{root}' should hold {SPLIT_DIRS[split][0]}/ "
            f"and {SPLIT_DIRS[split][1]}/ (the Medical Segmentation Decathlon layout)."
        )
    datalist = nifti_folder_datalist(image_dir)
    if not labels:
        return datalist
    for entry in datalist:
        image = Path(entry["image"])
        label = label_dir / image.name
        if not label.is_file():
            raise FileNotFoundError(f"label '{label}' for image '{image}' is missing; add it or remove the image.")
        image_shape, image_affine = check_volume(image)
        label_shape, label_affine = check_volume(label)
        if label_shape != image_shape:
            raise ValueError(f"label '{label}' has shape {label_shape} but image '{image}' has {image_shape}.")
        if not np.allclose(label_affine, image_affine, atol=1e-3):
            raise ValueError(
                f"label '{label}' and image '{image}' have different affines, so they do not cover the same voxels:"
                f"\n{np.array2string(label_affine, precision=4)}\nvs\n{np.array2string(image_affine, precision=4)}"
            )
        entry["label"] = str(label)
    return datalist


# ----------------------------------------------------------------------------------------------
# writing and conversion


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through a temporary file, so a killed run never leaves half a NIfTI."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs) -> None:
        target = Path(filename)
        with atomic_path(target, ".nii.gz" if target.name.endswith(".gz") else ".nii") as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:
            logger.info(f"wrote '{target}'.")


def _read_sitk(source: Path, series_id: str | None):
    import SimpleITK as sitk

    if source.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = list(reader.GetGDCMSeriesIDs(str(source)))
        if not ids:
            raise ValueError(f"no DICOM series found in folder '{source}'.")
        if series_id is None and len(ids) > 1:
            raise ValueError(f"folder '{source}' holds {len(ids)} DICOM series {ids}; choose one with --series-id.")
        chosen = series_id or ids[0]
        if chosen not in ids:
            raise ValueError(f"series '{chosen}' is not in folder '{source}' (series found: {ids}).")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source), chosen))
        return reader.Execute()
    if not source.is_file():
        raise FileNotFoundError(f"'{source}' does not exist.")
    try:
        return sitk.ReadImage(str(source))
    except RuntimeError as e:
        raise ValueError(f"SimpleITK cannot read '{source}': {str(e).strip().splitlines()[-1]}") from e


def convert_to_nifti(source: str | os.PathLike, target: str | os.PathLike, series_id: str | None = None) -> Path:
    """Convert a 3D scalar image readable by SimpleITK (.mha/.mhd/.nrrd/.nii, or a folder with a DICOM series) to
    NIfTI at ``target`` (.nii or .nii.gz), keeping spacing, origin and direction (SimpleITK writes them as the
    NIfTI affine). The file appears whole or not at all; an existing ``target`` is only replaced on success."""
    import SimpleITK as sitk

    source, target = Path(source), Path(target)
    if not target.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"target '{target}' must end with .nii or .nii.gz.")
    if source.resolve() == target.resolve():
        raise ValueError(f"target '{target}' is the source itself; choose another output file.")
    image = _read_sitk(source, series_id)
    if image.GetDimension() != 3:
        raise ValueError(f"'{source}' is {image.GetDimension()}D (size {image.GetSize()}); a 3D volume is expected.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"'{source}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector data); "
            "a scalar volume is expected."
        )
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    if abs(np.linalg.det(direction)) < 1e-12:
        raise ValueError(f"'{source}' has a non-invertible direction/spacing {image.GetDirection()}, "
                         f"{image.GetSpacing()}.")  # fmt: skip
    compress = target.name.endswith(".gz")
    with atomic_path(target, ".nii.gz" if compress else ".nii") as tmp:
        sitk.WriteImage(image, tmp, useCompression=compress)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_mdm.data.volumes",
        description="Synthetic CT-like NIfTI volumes in the Decathlon layout, and conversion of scans to NIfTI.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthetic", help="write a synthetic set: imagesTr/ labelsTr/ imagesTs/ labelsTs/")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=6, help="labelled training volumes")
    synth.add_argument("--n-test", type=int, default=2, help="test volumes")
    synth.add_argument("--size", type=int, nargs=3, default=(32, 32, 24), metavar=("X", "Y", "Z"))
    synth.add_argument("--list", action="store_true", help="print every file written")
    conv = commands.add_parser("convert", help="convert .mha/.mhd/.nrrd/.nii or a DICOM folder to NIfTI")
    conv.add_argument("source", type=Path, help="image file or folder holding one DICOM series")
    conv.add_argument("target", type=Path, help="output .nii or .nii.gz")
    conv.add_argument("--series-id", default=None, help="DICOM series to take when the folder holds several")
    args = parser.parse_args(argv)

    if args.command == "convert":
        out = convert_to_nifti(args.source, args.target, args.series_id)
        shape, affine = check_volume(out)
        print(f"{args.source} -> {out}: shape {shape}, spacing {np.round(np.linalg.norm(affine[:3, :3], axis=0), 4)}")
        return 0
    from monai_mdm.data.synthetic.volumes import write_volumes

    root = write_volumes(args.out, args.n_train, args.n_test, tuple(args.size), args.seed)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    print(f"volumes: {root} ({len(files)} files: {args.n_train} training and {args.n_test} test cases)")
    if args.list:
        for p in files:
            print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
