"""3D volumes: synthetic CT-like NIfTI sets, a checked datalist for the Decathlon layout, conversion to NIfTI.

Layout (the Medical Segmentation Decathlon's): ``imagesTr/<case>.nii.gz`` with ``labelsTr/<case>.nii.gz`` of the
same name, and ``imagesTs/`` (plus ``labelsTs/`` when test labels exist). :func:`volume_datalist` reads only the
NIfTI headers, so a broken file (missing label, shape mismatch, a 4D series, an affine that cannot be inverted)
stops a run before anything is trained or written, with the file and the problem named, instead of failing in a
data-loader worker. The voxels themselves are read by MONAI's ``LoadImaged`` (``NibabelReader`` or ``ITKReader``)
in the bundles.

The synthetic volumes are CT-like (Hounsfield units, int16): a body with soft-tissue texture, a spine, one
irregular organ (class 1) holding a few hypodense lesions (class 2), on a rotated, anisotropic affine, so the
bundles' resampling and the affine of the saved predictions are exercised. Nothing is downloaded.

Examples::

    python -m monai_mdm.data.volumes synthetic --out demo_data/Volumes --seed 0
    python -m monai_mdm.data.volumes convert scan.mha scan.nii.gz      # .mha/.mhd/.nrrd/.nii or a DICOM folder
"""

from __future__ import annotations

import argparse
import sys
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import NibabelWriter
from scipy import ndimage as ndi

from monai_mdm.utils import atomic_path, atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "VOLUME_CLASSES",
    "AtomicNibabelWriter",
    "check_volume",
    "convert_to_nifti",
    "nifti_folder_datalist",
    "synthesize_volume",
    "volume_datalist",
    "write_volumes",
]

VOLUME_CLASSES = ("background", "organ", "lesion")
SPLIT_DIRS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SPACING = (1.5, 1.5, 2.0)  # mm, anisotropic like most CT series


# ----------------------------------------------------------------------------------------------
# synthetic volumes


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``sigma`` voxels."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _affine(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS affine: a few degrees of rotation about z, anisotropic spacing, origin away from 0."""
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(_SPACING)
    centre = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = rng.uniform(-40.0, 40.0, 3) - affine[:3, :3] @ centre
    return affine


def synthesize_volume(
    index: int, size: Sequence[int] = (32, 32, 24), seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One deterministic CT-like volume: ``(image int16 HU, label uint8, 4 x 4 affine)``, arrays in (x, y, z).

    Labels: 0 background, 1 organ, 2 lesion (see :data:`VOLUME_CLASSES`). The same ``(index, size, seed, split)``
    gives the same arrays on every machine.
    """
    shape = tuple(int(s) for s in size)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"size must be (x, y, z) with every size >= 8, got {tuple(size)}.")
    rng = np.random.default_rng([int(seed), ("train", "test").index(split), int(index)])
    # physical coordinates in mm, centred, so shapes keep their proportions on anisotropic voxels
    axes = [(np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(shape, _SPACING)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = np.array([n * sp / 2.0 for n, sp in zip(shape, _SPACING)])

    body = (x / (0.9 * half[0])) ** 2 + (y / (0.75 * half[1])) ** 2 < 1.0
    spine = ((x / (0.12 * half[0])) ** 2 + ((y + 0.5 * half[1]) / (0.12 * half[1])) ** 2 < 1.0) & body
    centre = rng.uniform(-0.2, 0.2, 3) * half
    radii = rng.uniform(0.5, 0.65, 3) * half
    warp = 0.25 * _smooth_field(rng, shape, sigma=max(shape) / 6.0)
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip((x, y, z), centre, radii))
    organ = (dist + warp < 1.0) & body & ~spine
    label = organ.astype(np.uint8)
    inside = np.argwhere(ndi.binary_erosion(organ, iterations=2))
    for _ in range(int(rng.integers(1, 4)) if len(inside) else 0):
        vx = inside[int(rng.integers(len(inside)))]
        r = rng.uniform(0.08, 0.14) * half.min()
        point = np.array([axes[d][vx[d]] for d in range(3)])
        lesion = ((x - point[0]) ** 2 + (y - point[1]) ** 2 + (z - point[2]) ** 2 < r * r) & organ
        label[lesion] = 2

    hu = np.full(shape, -1000.0)
    hu[body] = 35.0 + 12.0 * _smooth_field(rng, shape, 1.5)[body]  # muscle / fat mix
    hu[spine] = 450.0
    hu[label == 1] = 95.0 + 10.0 * _smooth_field(rng, shape, 1.0)[label == 1]
    hu[label == 2] = 25.0
    hu = ndi.gaussian_filter(hu, 0.6) + rng.normal(0.0, 8.0, shape)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return image, label, _affine(rng, shape)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    atomic_write(path, lambda f: f.write(_gzip(img.to_bytes()) if path.name.endswith(".gz") else img.to_bytes()))


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=6, mtime=0)  # mtime 0: the same volume gives the same bytes


def write_volumes(
    root: str | os.PathLike,
    n_train: int = 6,
    n_test: int = 2,
    size: Sequence[int] = (32, 32, 24),
    seed: int = 0,
) -> Path:
    """Write a synthetic CT-like set in the Decathlon layout and return ``root``.

    Files: ``imagesTr/vol_<i>.nii.gz`` + ``labelsTr/vol_<i>.nii.gz``, ``imagesTs/`` + ``labelsTs/`` (the real
    Decathlon holds no test labels; here they allow evaluation), and a Decathlon-style ``dataset.json``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}.")
    root = Path(root)
    entries: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for split, count in (("train", n_train), ("test", n_test)):
        image_dir, label_dir = SPLIT_DIRS[split]
        for index in range(1, count + 1):
            name = f"vol_{index:03d}.nii.gz" if split == "train" else f"vol_test_{index:03d}.nii.gz"
            image, label, affine = synthesize_volume(index, size, seed, split)
            _save_nifti(root / image_dir / name, image, affine)
            _save_nifti(root / label_dir / name, label, affine)
            entries[split].append({"image": f"./{image_dir}/{name}", "label": f"./{label_dir}/{name}"})
    doc = {
        "name": "SyntheticOrgan",
        "description": "synthetic CT-like volumes written by monai_mdm.data.volumes (not real patients)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(i): c for i, c in enumerate(VOLUME_CLASSES)},
        "numTraining": n_train,
        "numTest": n_test,
        "training": entries["train"],
        "test": [e["image"] for e in entries["test"]],
    }
    atomic_write(root / "dataset.json", lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
    return root


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
    root = write_volumes(args.out, args.n_train, args.n_test, tuple(args.size), args.seed)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    print(f"volumes: {root} ({len(files)} files: {args.n_train} training and {args.n_test} test cases)")
    if args.list:
        for p in files:
            print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
