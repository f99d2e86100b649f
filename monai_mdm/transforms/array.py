"""Array (single image, channel-first) transforms for MDM: random patch masking, RGB normalisation, and the
nucleus boundary target with the post-processing that turns its class map into nucleus instances."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms.transform import Randomizable, Transform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from monai_mdm.transforms.corruption import PatchMasking

__all__ = [
    "RandPatchMask",
    "EnsureRGB",
    "INSTANCE_METHODS",
    "NUCLEUS_CLASSES",
    "NucleusBoundaryTarget",
    "NucleusInstances",
    "check_instance_method",
    "nucleus_instances",
]


class RandPatchMask(Randomizable, Transform):
    """Mask a random fraction t/T of the patches of one channel-first image (C, *spatial), 2D or 3D.

    The same code as :class:`PatchMasking` is used (batch of one), driven by a ``torch.Generator`` seeded
    from ``self.R``, so ``set_random_state(seed)`` makes masks reproducible. Useful for previews and
    dataloader-side corruption; training normally masks whole batches on the GPU with ``PatchMasking``.

    Args:
        patch_size: patch edge (int) or one size per spatial dimension.
        num_timesteps: T.
        timestep: fixed t in [0, T) (e.g. 50 for feature extraction); None draws t uniformly in [0, T) per call.
        fill_value: value of masked pixels (0 = mid-grey in [-1, 1]).
        pad: allow sizes not divisible by the patch size (partial border patches), see :class:`PatchMasking`.

    After a call, ``self.timestep`` holds the t used and ``self.keep`` the boolean keep mask (1, *spatial).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        patch_size: int | Sequence[int] = 8,
        num_timesteps: int = 1000,
        timestep: int | None = None,
        fill_value: float = 0.0,
        pad: bool = False,
    ) -> None:
        self.masking = PatchMasking(patch_size=patch_size, num_timesteps=num_timesteps, fill_value=fill_value, pad=pad)
        if timestep is not None and not 0 <= int(timestep) < self.masking.num_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.masking.num_timesteps}), got {timestep}.")
        self.fixed_timestep = None if timestep is None else int(timestep)
        self.timestep: int | None = self.fixed_timestep
        self.keep: torch.Tensor | None = None

    def randomize(self, data: NdarrayOrTensor) -> None:
        """Draw t (unless fixed) and the keep mask for an image shaped like ``data`` (C, *spatial)."""
        t = self.fixed_timestep
        if t is None:
            t = int(self.R.randint(0, self.masking.num_timesteps))
        generator = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
        device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
        keep = self.masking.keep_mask(data.shape[1:], torch.tensor([t]), device=device, generator=generator)
        self.timestep = t
        self.keep = keep[0]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Mask ``img``; ``randomize=False`` replays the last t and mask (same spatial shape required)."""
        img_t = convert_to_tensor(img, track_meta=False)
        if img_t.ndim < 2:
            raise ValueError(f"expected a channel-first image (C, *spatial), got shape {tuple(img_t.shape)}.")
        if randomize:
            self.randomize(img_t)
        if self.keep is None:
            raise RuntimeError("call randomize() (or the transform with randomize=True) first.")
        if tuple(self.keep.shape[1:]) != tuple(img_t.shape[1:]):
            raise ValueError(
                f"stored mask has spatial shape {tuple(self.keep.shape[1:])}, image has {tuple(img_t.shape[1:])}."
            )
        out = img_t.masked_fill(~self.keep.to(img_t.device), self.masking.fill_value)
        return convert_to_dst_type(out, dst=img)[0]


def _filename(img: NdarrayOrTensor) -> str:
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name is not None:
            return str(name)
    return "<unknown file>"


class EnsureRGB(Transform):
    """Make a channel-first image 3-channel RGB, so grayscale or RGBA files in a histology set do not break the network.

    1 channel (gray) is repeated; 2 channels (gray + alpha) and 4 channels (RGBA) are alpha-composited over
    white, because transparent regions of slide tiles are background and slide background is white.
    ``max_value`` is the white level / full opacity: None means the dtype maximum for integer images, and for
    float images 255 if any value exceeds 1 (MONAI's LoadImage gives float 0..255) else 1.
    3 channels pass through. The first conversion in the process emits a warning naming the file (only once,
    so large datasets do not flood the log); other channel counts raise ValueError naming the file.

    Values above 255 (a 16-bit TIFF, or a float image of one) are rescaled from the image's own min..max to
    0..255 and warned about once: the bundles scale 0..255 to the network's range, so such an image would be
    clipped to white or, cast to 8 bits, wrap around.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    _warned: bool = False  # once per process, shared by all instances
    _warned_depth: bool = False

    def __init__(self, max_value: float | None = None) -> None:
        self.max_value = max_value

    def _white(self, img: torch.Tensor) -> float:
        if self.max_value is not None:
            return float(self.max_value)
        if img.dtype == torch.bool:
            return 1.0
        if not img.dtype.is_floating_point:
            return float(torch.iinfo(img.dtype).max)
        return 255.0 if img.numel() > 0 and float(img.max()) > 1.0 else 1.0

    def _eight_bit(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=False)
        if x.numel() == 0 or x.dtype in (torch.uint8, torch.bool) or self.max_value is not None:
            return img
        hi, lo = float(x.max()), float(x.min())
        if hi <= 255.0:
            return img
        scaled = (x.to(torch.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
        if not EnsureRGB._warned_depth:
            EnsureRGB._warned_depth = True
            warnings.warn(
                f"EnsureRGB rescaled an image with values {lo:g}..{hi:g} (more than 8 bits) to 0..255 from its own "
                f"range for file {_filename(img)}; further rescaled images are not reported.",
                stacklevel=3,
            )
        if x.dtype.is_floating_point:
            return convert_to_dst_type(scaled, dst=img, dtype=img.dtype)[0]
        return convert_to_dst_type(scaled.round().to(torch.uint8), dst=img, dtype=torch.uint8)[0]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        img = self._eight_bit(img)
        channels = img.shape[0] if img.ndim > 0 else 0
        if channels == 3:
            return img
        if img.ndim < 2 or channels not in (1, 2, 4):
            raise ValueError(
                f"EnsureRGB expects a channel-first image with 1, 2, 3 or 4 channels, got shape "
                f"{tuple(img.shape)} for file {_filename(img)}."
            )
        x = convert_to_tensor(img, track_meta=False)
        if channels == 1:
            out = x.expand(3, *x.shape[1:]).clone()
            kind = "grayscale"
        else:
            white = self._white(x)
            xf = x.to(torch.float32) if not x.dtype.is_floating_point else x
            color = xf[:1].expand(3, *xf.shape[1:]) if channels == 2 else xf[:3]
            alpha = (xf[-1:] / white).clamp(0.0, 1.0)
            out = color * alpha + white * (1.0 - alpha)
            if not x.dtype.is_floating_point:
                out = out.round()
            kind = "grayscale+alpha" if channels == 2 else "RGBA"
        if not EnsureRGB._warned:
            EnsureRGB._warned = True
            warnings.warn(
                f"EnsureRGB converted a {kind} image ({channels}-channel) to RGB for file {_filename(img)}; "
                "further conversions are not reported.",
                stacklevel=2,
            )
        return convert_to_dst_type(out, dst=img, dtype=img.dtype)[0]


# ----------------------------------------------------------------------------------------------
# nucleus instances: a boundary-aware target and the watershed that splits touching nuclei

NUCLEUS_CLASSES = ("background", "nucleus", "nucleus boundary")
INSTANCE_METHODS = ("watershed", "connected_components")
_INTERIOR, _BOUNDARY = 1, 2


def check_instance_method(method: str, setting: str = "instances") -> str:
    """``method`` if it is one of :data:`INSTANCE_METHODS`, else a ValueError naming ``--<setting>``."""
    if method not in INSTANCE_METHODS:
        raise ValueError(f"--{setting} must be one of {', '.join(INSTANCE_METHODS)}, got {method!r}.")
    return method


class NucleusBoundaryTarget(Transform):
    """Instance map -> 3-class target: 0 background, 1 nucleus interior, 2 nucleus boundary.

    The boundary is each nucleus's own outer pixel ring (``find_boundaries(mode="inner")``: pixels with a
    4-neighbour of another label), so two touching nuclei are separated by two rings of class 2 and their
    interiors never touch. Trained on this target, a pixel classifier learns where one nucleus ends and the
    next begins, which the binary nucleus mask cannot express; :func:`nucleus_instances` then grows one
    nucleus from each interior. Input ``(1, H, W)`` or ``(H, W)`` integer instance ids; the output has the
    input's shape, uint8.
    """

    backend = [TransformBackends.NUMPY]

    def __call__(self, instances: NdarrayOrTensor) -> NdarrayOrTensor:
        from skimage.segmentation import find_boundaries

        inst = np.asarray(instances.detach().cpu() if isinstance(instances, torch.Tensor) else instances)
        if not np.issubdtype(inst.dtype, np.integer) and inst.dtype != bool:
            raise ValueError(f"NucleusBoundaryTarget needs integer instance ids, got {inst.dtype}.")
        plane = inst.reshape(inst.shape[-2:]) if inst.ndim == 3 and inst.shape[0] == 1 else inst
        if plane.ndim != 2:
            raise ValueError(f"NucleusBoundaryTarget needs a (1, H, W) or (H, W) instance map, got {inst.shape}.")
        target = (plane > 0).astype(np.uint8)
        target[find_boundaries(plane, connectivity=1, mode="inner") & (plane > 0)] = _BOUNDARY
        return convert_to_dst_type(target.reshape(inst.shape), instances, dtype=np.uint8)[0]


def nucleus_instances(classes: np.ndarray, method: str = "watershed", min_marker_size: int = 3) -> np.ndarray:
    """``(H, W)`` int32 nucleus instances (0 background, 1..N) of a predicted class map.

    Nucleus pixels are all classes > 0 (interior and boundary), so the instances cover what the semantic
    metrics score. ``"connected_components"``: each 8-connected nucleus region is one instance, so touching
    nuclei merge. ``"watershed"`` (a class map of :data:`NUCLEUS_CLASSES`): every 4-connected interior
    region of at least ``min_marker_size`` pixels is a marker, and a marker-controlled watershed over the
    nucleus pixels gives each boundary pixel to its nearest interior (flooding the distance to the
    interiors), so nuclei that touch are split along the boundary the classifier predicted; a nucleus
    region without any marker (too small to have an interior) stays one instance.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential, watershed

    from monai_mdm.metrics.segmentation import instances_from_binary

    check_instance_method(method)
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"nucleus_instances needs an (H, W) class map, got shape {classes.shape}.")
    nucleus = classes > 0
    if method == "connected_components":
        return instances_from_binary(nucleus, connectivity=2)
    interior = classes == _INTERIOR
    markers = ndi.label(interior)[0]  # 4-connected: interiors meeting at a corner stay apart
    if min_marker_size > 1 and markers.any():
        small = np.bincount(markers.ravel()) < min_marker_size
        small[0] = False
        markers[small[markers]] = 0
    distance = ndi.distance_transform_edt(markers == 0)
    # equal distances flood in raster order (the stable rank of the distance is the priority): the split then
    # depends on the pixels around a nucleus only, so a slide post-processed in tiles with a margin
    # (monai_mdm.data.tiled_nucleus_instances) gets the whole map's nuclei; skimage breaks ties by queue age
    priority = np.empty(distance.size, np.float64)
    priority[np.argsort(np.rint(distance.ravel() ** 2), kind="stable")] = np.arange(distance.size)
    # skimage's watershed directly: MONAI's pathology Watershed is this call, but importing monai.apps.pathology
    # compiles TorchScript for seconds (20 s measured on the 2-core machine) in every process that post-processes
    grown = watershed(priority.reshape(distance.shape), markers=markers, mask=nucleus, connectivity=1)
    unclaimed = nucleus & (grown == 0)
    if unclaimed.any():
        rest = instances_from_binary(unclaimed, connectivity=2)
        grown = np.where(rest > 0, rest + grown.max(), grown)
    return relabel_sequential(np.asarray(grown, dtype=np.int32))[0].astype(np.int32)


class NucleusInstances(Transform):
    """Array transform of :func:`nucleus_instances`: a ``(1, H, W)`` class map to ``(1, H, W)`` int32 instances.

    Args:
        method: ``"watershed"`` (needs the boundary class, :data:`NUCLEUS_CLASSES`) or ``"connected_components"``.
        min_marker_size: interiors smaller than this seed no nucleus of their own (noise).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, method: str = "watershed", min_marker_size: int = 3) -> None:
        self.method = check_instance_method(method)
        self.min_marker_size = min_marker_size

    def __call__(self, classes: NdarrayOrTensor) -> NdarrayOrTensor:
        arr = np.asarray(classes.detach().cpu() if isinstance(classes, torch.Tensor) else classes)
        plane = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
        inst = nucleus_instances(plane, self.method, self.min_marker_size)
        return convert_to_dst_type(inst.reshape(arr.shape), classes, dtype=np.int32)[0]
