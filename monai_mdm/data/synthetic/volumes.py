"""Synthetic CT-like volumes in the Decathlon layout: a body with soft-tissue texture, a spine, one irregular
organ (class 1) holding a few hypodense lesions (class 2), in Hounsfield units (int16), on a rotated, anisotropic
affine, so the volume bundle's resampling and the affine of its saved predictions are exercised."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from monai_mdm.data.volumes import SPLIT_DIRS, VOLUME_CLASSES
from monai_mdm.utils import atomic_write

_SPACING = (1.5, 1.5, 2.0)  # mm, anisotropic like most CT series




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
