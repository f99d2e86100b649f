"""Dictionary transforms for MONAI dict-based pipelines: the MDM array transforms, and the loaders of the
annotation files (instance maps, face class maps) built on the readers in :mod:`monai_mdm.data`."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform, Randomizable
from monai.utils.type_conversion import convert_to_dst_type

from monai_mdm.data.faces import check_num_classes, read_class_map
from monai_mdm.data.instances import read_instance_map
from monai_mdm.transforms.array import EnsureRGB, NucleusBoundaryTarget, NucleusInstances, RandPatchMask

__all__ = [
    "NucleusBoundaryTargetd",
    "NucleusBoundaryTargetD",
    "NucleusBoundaryTargetDict",
    "NucleusInstancesd",
    "NucleusInstancesD",
    "NucleusInstancesDict",
    "RandPatchMaskd",
    "RandPatchMaskD",
    "RandPatchMaskDict",
    "EnsureRGBd",
    "EnsureRGBD",
    "EnsureRGBDict",
    "LoadInstanceMaskd",
    "LoadInstanceMaskD",
    "LoadInstanceMaskDict",
    "LoadClassMapd",
    "LoadClassMapD",
    "LoadClassMapDict",
]


class RandPatchMaskd(Randomizable, MapTransform):
    """Dictionary-based :class:`RandPatchMask`: all ``keys`` get the same t and the same mask.

    The mask is drawn once from the first present key, so the keys must share their spatial shape.

    Args:
        keys: keys of the images to mask.
        patch_size, num_timesteps, timestep, fill_value, pad: see :class:`RandPatchMask`.
        timestep_key: where the int t used is stored (None: not stored), so the network can be conditioned on it.
        mask_key: where the boolean keep mask (1, *spatial) is stored, same array type as the first image
            (None: not stored); useful for losses restricted to masked regions and for visualisation.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = RandPatchMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: int | Sequence[int] = 8,
        num_timesteps: int = 1000,
        timestep: int | None = None,
        fill_value: float = 0.0,
        pad: bool = False,
        timestep_key: str | None = "timestep",
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.masker = RandPatchMask(
            patch_size=patch_size, num_timesteps=num_timesteps, timestep=timestep, fill_value=fill_value, pad=pad
        )
        self.timestep_key = timestep_key
        self.mask_key = mask_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandPatchMaskd:
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def randomize(self, data: NdarrayOrTensor) -> None:
        self.masker.randomize(data)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first_key: Hashable = self.first_key(d)
        if first_key == ():
            return d
        first = d[first_key]
        self.randomize(first if isinstance(first, (np.ndarray, torch.Tensor)) else torch.as_tensor(first))
        for key in self.key_iterator(d):
            d[key] = self.masker(d[key], randomize=False)
        if self.timestep_key is not None:
            d[self.timestep_key] = int(self.masker.timestep)  # type: ignore[arg-type]
        if self.mask_key is not None:
            keep = self.masker.keep
            if isinstance(first, np.ndarray):
                d[self.mask_key] = keep.cpu().numpy()  # type: ignore[union-attr]
            else:
                d[self.mask_key] = convert_to_dst_type(keep, dst=first, dtype=torch.bool)[0]
        return d


class EnsureRGBd(MapTransform):
    """Dictionary-based :class:`EnsureRGB` (apply to image keys only, never to label maps)."""

    backend = EnsureRGB.backend

    def __init__(self, keys: KeysCollection, max_value: float | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureRGB(max_value=max_value)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


def _path_of(value: Any) -> str | None:
    """The file behind a datalist value: a path, or the ``filename_or_obj`` of an already loaded MetaTensor."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if isinstance(name, (str, os.PathLike)) and os.fspath(name):
            return os.fspath(name)
    return None


def _image_file(d: Mapping[Hashable, Any], image_key: str | None) -> str | None:
    """The image file that an entry's annotation is checked against; None (no check) without an image."""
    return _path_of(d[image_key]) if image_key is not None and image_key in d else None


class LoadInstanceMaskd(MapTransform):
    """Load annotation files into a binary class map and an instance map.

    For each key: ``d[key]`` (the annotation path) becomes the ``(1, H, W)`` uint8 foreground map
    (0/1), and ``d[key + instance_postfix]`` the ``(1, H, W)`` int32 instance map, both numpy.
    Put it before ``LoadImaged`` (or after it: the image file is then taken from the MetaTensor's
    ``filename_or_obj``), so that the annotation is checked against the size of its image, which
    also gives MoNuSeg XML polygons their raster size.

    Args:
        keys: keys of annotation paths.
        image_key: key of the image (path or loaded MetaTensor); None skips the size check.
        instance_postfix: the instance map goes to ``key + instance_postfix`` (``"label_instances"``).
        binarize: True: masks (> 0 = foreground, instances = connected components); False: pixel values
            are instance ids; None: per entry, binarise when ``d[format_key] == "binary"`` (set by
            :func:`monai_mdm.data.preprocessed.preprocessed_datalist`).
        format_key: entry key read when ``binarize`` is None.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str | None = "image",
        instance_postfix: str = "_instances",
        binarize: bool | None = None,
        format_key: str = "label_format",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not instance_postfix:
            raise ValueError("instance_postfix must be non-empty, or the instance map would replace the class map.")
        self.image_key = image_key
        self.instance_postfix = instance_postfix
        self.binarize = binarize
        self.format_key = format_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = _image_file(d, self.image_key)
        binarize = self.binarize if self.binarize is not None else d.get(self.format_key) == "binary"
        for key in self.key_iterator(d):
            path = _path_of(d[key])
            if path is None:
                raise TypeError(
                    f"LoadInstanceMaskd expects d[{key!r}] to be an annotation path, got {type(d[key]).__name__}; "
                    "put LoadInstanceMaskd before any transform that loads the label."
                )
            inst = read_instance_map(path, image=image, binarize=binarize)
            d[f"{key}{self.instance_postfix}"] = inst[None]
            d[key] = (inst > 0).astype(np.uint8)[None]
        return d


class LoadClassMapd(MapTransform):
    """Load class maps (``.npy``, or label images as MONAI Label saves them) to ``(1, H, W)`` arrays, checking
    them against their image and the class count (a value outside the classes fails, naming the file).

    ``d[key]`` is the map's path; when it is missing or None the map is looked for as ``<image stem>.npy`` next
    to the image. Put it before or after ``LoadImaged`` (the image file is then taken from the MetaTensor).

    Args:
        keys: keys of the class maps.
        num_classes: K (34 for FFHQ-34, 19 for CelebA-19); other values than 0..K-1 and ``ignore_index`` fail.
        image_key: key of the image (path or loaded MetaTensor); None skips the size check.
        ignore_index: the "ignore" value, kept as it is.
        dtype: output type; the default uint8 holds 0..254 and 255 = ignore, at 1/8 of int64's memory (cast to
            int64 where a loss needs it). Values that do not fit switch it to int64.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_classes: int = 34,
        image_key: str | None = "image",
        ignore_index: int = 255,
        dtype: Any = np.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = check_num_classes(num_classes, ignore_index)
        self.image_key = image_key
        self.ignore_index = int(ignore_index)
        dtype = np.dtype(dtype)
        lo, hi = min(0, self.ignore_index), max(self.num_classes - 1, self.ignore_index)
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).min > lo or np.iinfo(dtype).max < hi:
            dtype = np.dtype(np.int64)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = _image_file(d, self.image_key)
        for key in self.keys:
            value = d.get(key)
            if value is None:
                if image is None:
                    if self.allow_missing_keys:
                        continue
                    raise KeyError(f"no class map under {key!r} and no image path to find '<n>.npy' from.")
                path: str | None = str(Path(image).with_suffix(".npy"))
            else:
                path = _path_of(value)
                if path is None:
                    raise TypeError(
                        f"LoadClassMapd expects d[{key!r}] to be a class map path, got {type(value).__name__}; put it "
                        "before any transform that loads the label."
                    )
            arr = read_class_map(path, self.num_classes, self.ignore_index, image=image)
            d[key] = arr.astype(self.dtype)[None]
        return d


class NucleusBoundaryTargetd(MapTransform):
    """Dictionary-based :class:`NucleusBoundaryTarget`: ``d[key]`` becomes the 3-class target (background,
    nucleus interior, nucleus boundary) of the instance map ``d[key + instance_postfix]`` that
    :class:`LoadInstanceMaskd` wrote, with the type, dtype and device of the ``d[key]`` it replaces (put it anywhere
    after :class:`LoadInstanceMaskd`). The instance map stays for the instance metrics. Without one (MONAI Label
    stores class maps) the nuclei are the connected components of the label's non-zero pixels."""

    backend = NucleusBoundaryTarget.backend

    def __init__(self, keys: KeysCollection = "label", instance_postfix: str = "_instances",
                 allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.instance_postfix = instance_postfix
        self.target = NucleusBoundaryTarget()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d.get(f"{key}{self.instance_postfix}")
            if source is None:  # a class map without instances (MONAI Label's labels): its connected nuclei
                from monai_mdm.metrics.segmentation import instances_from_binary

                label = np.asarray(d[key].detach().cpu() if isinstance(d[key], torch.Tensor) else d[key])
                source = instances_from_binary(label.reshape(label.shape[-2:]) > 0).reshape(label.shape)
            d[key] = convert_to_dst_type(self.target(source), d[key])[0]  # the label's type, dtype, device
        return d


class NucleusInstancesd(MapTransform):
    """Dictionary-based :class:`NucleusInstances`: the nucleus instances of the class map ``d[key]`` (after
    argmax, ``(1, H, W)``) go to ``d[key + instance_postfix]`` (``"pred_instances"``); ``d[key]`` is kept.

    Args:
        keys: keys of class maps.
        method: ``"watershed"`` or ``"connected_components"`` (the bundles' ``--instances``).
        instance_postfix: where the instances go.
        min_marker_size: see :func:`monai_mdm.transforms.nucleus_instances`.
    """

    backend = NucleusInstances.backend

    def __init__(self, keys: KeysCollection = "pred", method: str = "watershed", instance_postfix: str = "_instances",
                 min_marker_size: int = 3, allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.instance_postfix = instance_postfix
        self.instances = NucleusInstances(method, min_marker_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}{self.instance_postfix}"] = self.instances(d[key])
        return d


NucleusBoundaryTargetD = NucleusBoundaryTargetDict = NucleusBoundaryTargetd
NucleusInstancesD = NucleusInstancesDict = NucleusInstancesd
RandPatchMaskD = RandPatchMaskDict = RandPatchMaskd
EnsureRGBD = EnsureRGBDict = EnsureRGBd
LoadInstanceMaskD = LoadInstanceMaskDict = LoadInstanceMaskd
LoadClassMapD = LoadClassMapDict = LoadClassMapd
