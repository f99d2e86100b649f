"""Dictionary versions of the MDM array transforms, for MONAI dict-based pipelines."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform, Randomizable
from monai.utils.type_conversion import convert_to_dst_type

from monai_mdm.transforms.array import EnsureRGB, RandPatchMask

__all__ = [
    "RandPatchMaskd",
    "RandPatchMaskD",
    "RandPatchMaskDict",
    "EnsureRGBd",
    "EnsureRGBD",
    "EnsureRGBDict",
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


RandPatchMaskD = RandPatchMaskDict = RandPatchMaskd
EnsureRGBD = EnsureRGBDict = EnsureRGBd
