"""MDM few-shot segmenter: feature extractor + pixel head as one ``nn.Module``, savable in one file.

The module maps images to class scores, so MONAI's ``SlidingWindowInferer`` (256 px windows, overlap 0.2,
Gaussian blending, as in the paper) can run it over whole slides. Use windows of the size the head was trained
on: the per-image L2 normalisation makes features depend on the image area, so a head trained on 256 x 256 crops
should also see 256 x 256 windows.

Inference never builds the assembled feature map (1728 channels at the window's size for the paper's blocks):
the head's first layer runs on each decoder block at the block's own resolution and only its 128-channel output
is upsampled (:meth:`MDMSegmenter.scores_of_blocks`); the scores equal the assembled path's up to float rounding.

``torch.jit.trace`` (``python -m monai.bundle ckpt_export --use_trace True``) exports it for one window size: the
seeded feature mask of that size is stored in the trace and other sizes are refused (see the bundles' README).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.utils import fall_back_tuple
from torch import nn
from tqdm import tqdm

from monai_mdm.networks.features import MDMFeatureExtractor
from monai_mdm.networks.interchange import check_model_file, model_file
from monai_mdm.networks.mdm_unet import MDMUNet
from monai_mdm.networks.pixel_head import PixelHeadEnsemble, PixelMLPHead
from monai_mdm.transforms.corruption import Corruption, GaussianNoise, PatchMasking
from monai_mdm.utils import atomic_torch_save, guard_traced_size, load_torch_file

__all__ = ["MDMSegmenter", "ProgressSlidingWindowInferer", "make_sliding_window_inferer"]

SEGMENTER_FORMAT = "monai_mdm.segmenter"
_UNSET = object()


class ProgressSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` with a window-count progress bar (tqdm) for images that take a while.

    Args:
        progress: ``"auto"`` (default): a bar that appears once an image has taken ``progress_delay`` seconds and
            only when stderr is a terminal, so a whole-slide image run by hand shows how far it is while tests,
            log files and quick images stay clean (a bar in a log file is a long line of carriage returns);
            ``True``: always (from the first window); ``False``: never.
        progress_delay: seconds before the ``"auto"`` bar appears.
        kwargs: :class:`monai.inferers.SlidingWindowInferer`'s arguments (its own ``progress`` is replaced).
    """

    def __init__(self, *args: Any, progress: bool | str = "auto", progress_delay: float = 2.0, **kwargs: Any):
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}.")
        super().__init__(*args, progress=False, **kwargs)
        self.show_progress = progress
        self.progress_delay = float(progress_delay)
        self.progress_file: Any = None  # where the bar goes; None = sys.stderr

    def count_windows(self, spatial_size: Sequence[int]) -> int:
        """Windows per image of ``spatial_size``, as MONAI places them (images smaller than the window are
        padded to it; the scan interval is ``int(roi * (1 - overlap))``, at least 1)."""
        roi = fall_back_tuple(self.roi_size, spatial_size)
        size = [max(int(s), int(r)) for s, r in zip(spatial_size, roi)]
        overlap = self.overlap if isinstance(self.overlap, Sequence) else [self.overlap] * len(size)
        interval = [r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(size, roi, overlap)]
        return len(dense_patch_slices(size, roi, interval))

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        stream = self.progress_file if self.progress_file is not None else sys.stderr
        show = self.show_progress is True or (self.show_progress == "auto" and stream.isatty())
        if not show:
            return super().__call__(inputs, network, *args, **kwargs)
        total = self.count_windows(inputs.shape[2:]) * int(inputs.shape[0])
        always = self.show_progress is True  # asked for: shown from the start and left on screen when done
        delay = 0.0 if always else self.progress_delay
        with tqdm(total=total, unit="window", desc="sliding window", file=stream, delay=delay, leave=always) as bar:

            def counted(windows: torch.Tensor, *a: Any, **k: Any) -> Any:
                out = network(windows, *a, **k)
                bar.update(int(windows.shape[0]))
                return out

            return super().__call__(inputs, counted, *args, **kwargs)


def make_sliding_window_inferer(
    roi_size: int | Sequence[int] = 256, overlap: float = 0.2, sw_batch_size: int = 4, **kwargs: Any
) -> ProgressSlidingWindowInferer:
    """The paper's inference: windows of ``roi_size``, ``overlap``, Gaussian blending.

    MONAI pads images smaller than the window (centred, constant 0 = mid-grey for [-1, 1] images) and crops the
    output back, so every window the segmenter sees has exactly ``roi_size``. Host memory grows with
    ``sw_batch_size`` (the paper network holds ~0.45 GB of activations per 256 px window); on a CPU, where
    batching windows buys little speed, ``sw_batch_size=1`` keeps the peak lowest. Extra ``kwargs`` go to
    :class:`ProgressSlidingWindowInferer` (``progress``: ``"auto"``, ``True``, ``False``) and
    :class:`monai.inferers.SlidingWindowInferer` (e.g. ``sw_device``, ``device``).
    """
    kwargs.setdefault("mode", "gaussian")
    kwargs.setdefault("padding_mode", "constant")
    kwargs.setdefault("cval", 0.0)
    return ProgressSlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, **kwargs)


def _corruption_to_dict(corruption: Corruption | None) -> dict[str, Any] | None:
    if corruption is None:
        return None
    if isinstance(corruption, PatchMasking):
        ps = corruption.patch_size
        return {
            "type": "PatchMasking",
            "patch_size": ps if isinstance(ps, int) else list(ps),
            "num_timesteps": corruption.num_timesteps,
            "fill_value": float(corruption.fill_value),
            "pad": bool(corruption.pad),
        }
    if isinstance(corruption, GaussianNoise):
        return {
            "type": "GaussianNoise",
            "num_timesteps": corruption.num_timesteps,
            "shared_noise": bool(corruption.shared_noise),
            "noise_seed": int(corruption.noise_seed),
        }
    return {"type": f"{type(corruption).__module__}.{type(corruption).__qualname__}", "repr": repr(corruption)}


def _corruption_from_dict(data: Mapping[str, Any] | None, source: str) -> Corruption | None:
    if data is None:
        return None
    if data.get("type") == "PatchMasking":
        return PatchMasking(
            data["patch_size"], data["num_timesteps"], data.get("fill_value", 0.0), data.get("pad", False)
        )
    if data.get("type") == "GaussianNoise":
        return GaussianNoise(data["num_timesteps"], data.get("shared_noise", False), data.get("noise_seed", 0))
    raise ValueError(
        f"{source}: the features were computed with the corruption {data.get('repr', data.get('type'))}, which "
        "cannot be rebuilt from the file; pass it to MDMSegmenter.load(..., corruption=...)."
    )


def _check_widths(extractor: MDMFeatureExtractor, head: PixelHeadEnsemble, source: str) -> None:
    if head.in_channels != extractor.out_channels:
        raise ValueError(
            f"{source}: the pixel head expects {head.in_channels}-channel features, but the feature extractor "
            f"gives {extractor.out_channels} channels (decoder blocks {list(extractor.blocks)} of a network with "
            f"decoder_channels {list(extractor.network.decoder_channels)}). The head was probably trained on "
            "other decoder blocks or on features of another network preset; use the blocks and network it was "
            "trained with."
        )


class MDMSegmenter(nn.Module):
    """Images (B, C, *spatial) in [-1, 1] -> class scores (B, classes, *spatial), blendable by a sliding window.

    Args:
        extractor: the :class:`MDMFeatureExtractor` (frozen, or trainable while it is fine-tuned end to end).
        head: a :class:`PixelHeadEnsemble`, or a single :class:`PixelMLPHead` (wrapped in a one-head ensemble,
            so the scores are softmax probabilities).
        class_names: optional names, one per class, stored with the model.
        pad_to_multiple: zero-pad inputs whose size is not a multiple of ``extractor.size_multiple`` and crop
            the scores back (sliding windows of a suitable size never need it).
        pretraining: which pretrained weights the UNet holds (file, EMA or raw, why), saved with the model;
            by default the ``pretraining`` dict that :func:`monai_mdm.networks.load_pretrained` puts on the UNet.
        finetuned: the network's weights were trained with the head (recorded as ``features["finetuned"]`` in
            the saved file; a trainable extractor counts as fine-tuned).
    """

    def __init__(
        self,
        extractor: MDMFeatureExtractor,
        head: PixelHeadEnsemble | PixelMLPHead,
        class_names: Sequence[str] | None = None,
        pad_to_multiple: bool = True,
        pretraining: Mapping[str, Any] | None = None,
        finetuned: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(head, PixelMLPHead):
            head = PixelHeadEnsemble.from_heads([head])
        _check_widths(extractor, head, "MDMSegmenter")
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != head.num_classes:
                raise ValueError(f"{len(class_names)} class names for a head with {head.num_classes} classes.")
        self.extractor = extractor
        self.head = head
        self.class_names = class_names
        self.pad_to_multiple = pad_to_multiple
        if pretraining is None:
            pretraining = getattr(extractor.network, "pretraining", None)
        self.pretraining = dict(pretraining) if pretraining is not None else None
        self.finetuned = bool(finetuned)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = guard_traced_size(images)  # a traced (exported) model pads and masks for the traced size only
        spatial = tuple(int(s) for s in images.shape[2:])
        m = self.extractor.size_multiple
        target = tuple(math.ceil(s / m) * m for s in spatial)
        if target != spatial:
            if not self.pad_to_multiple:
                raise ValueError(f"image size {spatial} is not a multiple of {m} and pad_to_multiple is False.")
            pad: list[int] = []
            for s, t in zip(reversed(spatial), reversed(target)):
                pad += [0, t - s]
            images = F.pad(images, pad, mode="constant", value=0.0)
        scores = self.scores_of_blocks(self.extractor.extract_blocks(images), target)
        if target != spatial:
            scores = scores[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return scores

    def scores_of_blocks(self, blocks: Sequence[torch.Tensor], spatial_size: Sequence[int]) -> torch.Tensor:
        """Class scores from the native-resolution decoder blocks, equal (up to float rounding) to
        ``head(extractor.assemble(blocks, spatial_size))`` without building the assembled map.

        The head's first layer is linear and the upsampling is linear per channel, so each block is projected to
        the first hidden width at its own resolution, then upsampled (:meth:`PixelMLPHead.forward_blocks`); the
        L2 norms come from the blocks too (:meth:`MDMFeatureExtractor.assemble_norms`). For the paper network,
        blocks 8..12 and a 256 px window that is 128 upsampled channels instead of 1728 per pixel (0.5 GB less
        per window, and the concatenation and division are gone).
        """
        ex = self.extractor
        with ex._grad_mode():  # as assemble: a frozen extractor records no graph even under grad mode
            norms = ex.assemble_norms(blocks, spatial_size) if ex.normalize else None
        if self.head.training or torch.is_grad_enabled():  # training (fine-tuning) needs autograd and BatchNorm
            return self.head.forward_blocks(blocks, spatial_size, norms)
        return self.head.infer_blocks(blocks, spatial_size, norms)

    @torch.no_grad()
    def segment(self, images: torch.Tensor, inferer: Any = None) -> torch.Tensor:
        """Label map (B, 1, *spatial): argmax of the scores, through ``inferer`` (e.g. a sliding window) if given."""
        scores = self(images) if inferer is None else inferer(images, self)
        return scores.argmax(dim=1, keepdim=True)

    # ------------------------------------------------------------------ persistence

    def to_state(self, include_network: bool = True) -> dict[str, Any]:
        """Everything needed to rebuild the segmenter (see :meth:`from_state`).

        With the network, the weights are this module's whole ``state_dict`` under ``"model"``: the key
        MONAI Label and MONAI bundles read from ``models/model.pt`` to load ``network_def``.
        """
        ex = self.extractor
        weights = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return model_file(
            SEGMENTER_FORMAT,
            ex.network.to_guided_diffusion_config(),
            weights if include_network else None,
            features={
                "blocks": list(ex.blocks),
                "timestep": ex.timestep,
                "seed": ex.seed,
                "normalize": ex.normalize,
                "corruption": _corruption_to_dict(ex.corruption),
                "out_channels": ex.out_channels,
                "finetuned": self.finetuned or ex.trainable,
            },
            head=self.head.config(),
            head_state={k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")},
            class_names=self.class_names,
            pretraining=self.pretraining,
        )

    def save(self, path: str | os.PathLike, include_network: bool = True) -> None:
        """Write :meth:`to_state` atomically. ``include_network=False`` leaves out the UNet weights (1.2 GB for the
        paper network); :meth:`load` then needs ``network=``."""
        atomic_torch_save(self.to_state(include_network), path)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        network: MDMUNet | None = None,
        source: str = "segmenter state",
        **feature_overrides: Any,
    ) -> MDMSegmenter:
        """Rebuild from :meth:`to_state`'s dict, in eval mode, with a frozen extractor.

        Args:
            state: the dict.
            network: use this UNet instead of the stored config/weights.
            source: how errors name the origin (the file path when called from :meth:`load`).
            feature_overrides: replace stored feature settings: ``blocks``, ``timestep``, ``seed``, ``normalize``,
                ``corruption``.
        """
        if not check_model_file(state, source, [SEGMENTER_FORMAT]):
            raise ValueError(f"{source} is not an MDMSegmenter file (format {state.get('format')!r}).")
        unknown = set(feature_overrides) - {"blocks", "timestep", "seed", "normalize", "corruption"}
        if unknown:
            raise TypeError(f"unknown feature settings {sorted(unknown)}.")
        if network is None:
            if state.get("model") is None:
                raise ValueError(
                    f"{source} holds no network weights (saved with include_network=False); pass network=."
                )
            prefix = "extractor.network."
            network_state = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
            network = MDMUNet.from_guided_diffusion(network_state, state["network_config"])
        feats = dict(state["features"])
        corruption = feature_overrides.pop("corruption", _UNSET)
        if corruption is _UNSET:
            corruption = _corruption_from_dict(feats.get("corruption"), source)
        settings = {k: feats[k] for k in ("blocks", "timestep", "seed", "normalize")}
        settings.update(feature_overrides)
        extractor = MDMFeatureExtractor(network, corruption=corruption, **settings)
        hcfg = dict(state["head"])
        head = PixelHeadEnsemble(
            hcfg["in_channels"],
            hcfg["num_classes"],
            hcfg.get("num_heads", 1),
            hcfg["hidden_channels"],
            hcfg["spatial_dims"],
        )
        _check_widths(extractor, head, source)
        head.load_state_dict(state["head_state"])
        model = cls(
            extractor, head, state.get("class_names"), pretraining=state.get("pretraining"),
            finetuned=feats.get("finetuned", False),
        )
        return model.eval()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        network: MDMUNet | None = None,
        **feature_overrides: Any,
    ) -> MDMSegmenter:
        """Rebuild a segmenter written by :meth:`save` (see :meth:`from_state` for the arguments)."""
        state = load_torch_file(path, "segmenter", "Fix: give the path of a complete model.pt written by training.",
                                map_location=map_location, weights_only=True)
        return cls.from_state(state, network=network, source=str(path), **feature_overrides)
