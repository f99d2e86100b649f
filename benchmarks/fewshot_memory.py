#!/usr/bin/env python
"""Memory and time of few-shot head training on frozen MDM features: feature cache vs recomputing every batch.

The paper's setting (GlaS, all 85 labelled images): the ``paper`` network, decoder blocks 8..12 (1728 channels),
one random 256 x 256 crop per labelled image, batch 1, a per-pixel MLP head trained with cross-entropy and Adam.
The script measures, in one process:

1. the host memory: the feature cache's own size (``FeatureCache.nbytes``) and the process's peak resident set
   size (``VmHWM``) after building the cache and training the head for ``--steps`` steps on it;
2. the time to build the cache and the time of one head-training step with the cache
   (``CachedFeaturePrepareBatch`` + ``BlockwiseHead``: the head's first layer runs on the native-resolution
   blocks, the assembled feature map is never built; ``--assembled-cache``: the old way, upsample, concatenate
   and normalise the blocks, then the plain head) and when the features are recomputed for every batch, as the
   reference code does (``OnlineFeaturePrepareBatch``), and from those the total for ``--epochs`` epochs both
   ways;
3. the time of the paper's sliding-window inference (256 px windows, overlap 0.2, Gaussian blending) over one
   full-size image with ``MDMSegmenter``;
4. for comparison, the RAM DDPM-seg's approach would need (every training pixel's float32 features), computed
   from the shapes, not measured.

Weights are random and the images synthetic (only memory and time matter). Examples::

    python benchmarks/fewshot_memory.py                                  # the paper's setting (slow on a CPU)
    python benchmarks/fewshot_memory.py --preset paper --num-images 2 --steps 2
    python benchmarks/fewshot_memory.py --preset tiny --crop-size 64 --blocks 3 4 5 6 7 --num-images 8 --steps 5
    python benchmarks/fewshot_memory.py --preset paper --num-images 2 --steps 3 --assembled-cache
    python benchmarks/fewshot_memory.py --device cuda

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script

from common import HostPeak, describe_machine, resolve_device, timed  # noqa: E402

from monai_mdm.data.feature_cache import FeatureCache  # noqa: E402
from monai_mdm.utils import atomic_write  # noqa: E402
from monai_mdm.data.synthetic import synthesize_tile  # noqa: E402
from monai_mdm.engines.feature_batch import CachedFeaturePrepareBatch, OnlineFeaturePrepareBatch  # noqa: E402
from monai_mdm.inferers.segmenter import MDMSegmenter, make_sliding_window_inferer  # noqa: E402
from monai_mdm.losses.ensemble import EnsembleCrossEntropy  # noqa: E402
from monai_mdm.networks.features import MDMFeatureExtractor  # noqa: E402
from monai_mdm.networks.mdm_unet import MDMUNet  # noqa: E402
from monai_mdm.networks.pixel_head import BlockwiseHead, EnsembleLogits, PixelHeadEnsemble, PixelMLPHead  # noqa: E402

#: decoder blocks used when ``--blocks`` is not given (paper: the medical setting; tiny: its counterpart)
DEFAULT_BLOCKS = {"paper": (8, 9, 10, 11, 12), "tiny": (3, 4, 5, 6, 7)}
GLAS_SIZE = (522, 775)  # (H, W) of most GlaS images
IGNORE_INDEX = 255
HEAD_LR = 1e-3
OVERLAP = 0.2
MIB = 2**20
GIB = 2**30

TABLE_COLUMNS = ("figure", "value", "unit", "kind", "meaning")

#: every figure the table prints, in order (``gpu_*`` rows only on CUDA)
FIGURES = (
    "rss_before_cache",
    "cache_nbytes",
    "cache_planned",
    "cache_per_crop",
    "peak_rss_cache_and_training",
    "rss_after_cached_training",
    "peak_rss_recompute_training",
    "peak_rss_inference",
    "cache_build_time",
    "cache_build_per_crop",
    "step_cached",
    "step_recompute",
    "speedup_per_step",
    "steps_per_epoch",
    "total_cached",
    "total_recompute",
    "speedup_total",
    "sliding_window_time",
    "sliding_window_windows",
    "ddpmseg_features_ram",
    "ddpmseg_vs_cache",
)
GPU_FIGURES = ("gpu_peak_cache_build", "gpu_peak_cached_training", "gpu_peak_recompute_training", "gpu_peak_inference")


# ----------------------------------------------------------------------------- memory and timing helpers


def _gpu_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else 0.0


# ----------------------------------------------------------------------------- synthetic labelled images


class SyntheticLabelledImages:
    """``num_images`` labelled images of ``size`` (H, W), held as uint8 like a decoded data set.

    Item ``i`` is ``(image (3, H, W) float32 in [-1, 1], label (1, H, W) int64)``; the float image is made on
    access, so only the uint8 arrays stay in memory. ``tiles=True`` renders H&E-like tiles with gland labels
    (``synthesize_tile``, about 0.4 s per GlaS-size image), otherwise uniform noise with random binary labels.
    """

    def __init__(self, num_images: int, size: Sequence[int], tiles: bool = False, seed: int = 0) -> None:
        h, w = int(size[0]), int(size[1])
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        for i in range(num_images):
            rng = np.random.default_rng([int(seed), i])
            if tiles:
                rgb, instances = synthesize_tile((h, w), rng, kind="glas")
                self.images.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))
                self.labels.append(torch.from_numpy((instances > 0).astype(np.uint8))[None])
            else:
                self.images.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
                self.labels.append(torch.from_numpy(rng.integers(0, 2, (1, h, w), dtype=np.uint8)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float() / 127.5 - 1.0, self.labels[index].long()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.images, *self.labels))

    def random_crop(self, index: int, crop: Sequence[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A fresh random crop of image ``index``, as the reference draws one per iteration."""
        image, label = self[index]
        starts = [int(torch.randint(0, s - c + 1, (1,), generator=gen)) for s, c in zip(image.shape[1:], crop)]
        window = tuple(slice(a, a + c) for a, c in zip(starts, crop))
        return {"image": image[(slice(None), *window)].clone(), "label": label[(slice(None), *window)].clone()}


# ----------------------------------------------------------------------------- head training


def make_head_and_optimizer(in_channels: int, num_classes: int, device: torch.device, seed: int, num_heads: int = 1):
    """One head (medical bundles), or an ensemble trained in one engine as the face bundle does (its
    ``EnsembleLogits`` view takes blocks or features and stacks every head's logits)."""
    torch.manual_seed(seed)
    if num_heads == 1:
        head = PixelMLPHead(in_channels, num_classes).to(device).train()
    else:
        head = EnsembleLogits(PixelHeadEnsemble(in_channels, num_classes, num_heads)).to(device).train()
    return head, torch.optim.Adam(head.parameters(), lr=HEAD_LR)


def train_steps(
    prepare_batch: Callable[..., tuple],
    next_batch: Callable[[int], dict[str, Any]],
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[list[float], float]:
    """Run ``warmup + steps`` training iterations; wall seconds of each timed one and the last loss.

    One timed iteration = ``prepare_batch(batch, device)`` (cached blocks to the device, or assembled cached
    features, or a frozen network forward) + ``network(inputs, *args, **kwargs)`` (as MONAI's SupervisedTrainer
    calls it: the prepare-batch may return ``(inputs, labels)`` or ``(inputs, labels, args, kwargs)``) +
    cross-entropy + backward + Adam step. Producing the batch itself (a cache item, or a random crop of a
    synthetic image, collated) is done before the clock starts, for both ways alike.
    """
    ensemble = isinstance(network, EnsembleLogits)
    loss_fn = (EnsembleCrossEntropy if ensemble else torch.nn.CrossEntropyLoss)(ignore_index=IGNORE_INDEX)
    times: list[float] = []
    loss_value = float("nan")
    for i in range(warmup + steps):
        batch = next_batch(i)

        def iteration() -> float:
            prepared = prepare_batch(batch, device)
            inputs, labels = prepared[:2]
            args, kwargs = (prepared[2], prepared[3]) if len(prepared) == 4 else ((), {})
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(inputs, *args, **kwargs), labels)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        seconds, loss_value = timed(iteration, device)
        if i >= warmup:
            times.append(seconds)
    return times, loss_value


# ----------------------------------------------------------------------------- output


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.3f}"
    return f"{value:.4g}"


def format_table(rows: Sequence[tuple[str, float | int, str, str, str]]) -> str:
    """Plain aligned table; the first four columns never contain spaces, the meaning is free text."""
    cells = [[name, _fmt(value), unit, kind, meaning] for name, value, unit, kind, meaning in rows]
    widths = [max(len(c[i]) for c in [list(TABLE_COLUMNS), *cells]) for i in range(4)]

    def line(values: Sequence[str]) -> str:
        left = [values[0].ljust(widths[0]), values[1].rjust(widths[1]), values[2].ljust(widths[2])]
        left.append(values[3].ljust(widths[3]))
        return "  ".join(left + [values[4]]).rstrip()

    out = [line(TABLE_COLUMNS), line(["-" * w for w in widths] + ["-" * len(TABLE_COLUMNS[4])])]
    out += [line(c) for c in cells]
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_DefaultsFormatter)
    p.add_argument("--preset", choices=sorted(DEFAULT_BLOCKS), default="paper", help="MDMUNet preset")
    p.add_argument(
        "--blocks", type=int, nargs="+", default=None,
        help="decoder blocks whose outputs are the features (default: 8..12 for paper, 3..7 for tiny)",
    )  # fmt: skip
    p.add_argument("--crop-size", type=int, default=256, help="training crop and sliding-window edge (px)")
    p.add_argument("--num-images", type=int, default=85, help="labelled images (GlaS train: 85)")
    p.add_argument("--crops-per-image", type=int, default=1, help="cached crops per labelled image")
    p.add_argument("--image-size", type=int, nargs=2, default=list(GLAS_SIZE), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=2, help="classes of the head (GlaS: gland / background)")
    p.add_argument("--num-heads", type=int, default=1, help="heads trained together (faces: an ensemble of 10)")
    p.add_argument("--batch", type=int, default=1, help="crops per head-training step (GlaS: 1, MoNuSeg: 16)")
    p.add_argument("--steps", type=int, default=10, help="timed head-training steps, each way")
    p.add_argument("--warmup", type=int, default=1, help="untimed head-training steps before the timed ones")
    p.add_argument("--epochs", type=int, default=50, help="epochs for the projected totals")
    p.add_argument("--extract-batch", type=int, default=1, help="crops per network call while building the cache")
    p.add_argument("--sw-batch", type=int, default=4, help="windows per network call in sliding-window inference")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--fp16-cache", action=argparse.BooleanOptionalAction, default=True,
        help="store the cached blocks in float16 (--no-fp16-cache: float32)",
    )  # fmt: skip
    p.add_argument(
        "--assembled-cache", action="store_true",
        help="cached steps build the assembled feature map for the plain head (the old way) instead of running "
        "the head's first layer blockwise on the native-resolution blocks (BlockwiseHead)",
    )  # fmt: skip
    p.add_argument(
        "--disk-cache", default=None, metavar="DIR",
        help="keep the cached blocks in a temporary file in DIR (FeatureCache disk_dir) instead of in memory",
    )  # fmt: skip
    p.add_argument(
        "--network-bf16", action="store_true",
        help="the frozen network in bfloat16 (half the weights' memory; features within ~1%% of float32)",
    )  # fmt: skip
    p.add_argument("--tiles", action="store_true", help="H&E-like synthetic tiles instead of noise images")
    p.add_argument("--skip-inference", action="store_true", help="leave out the sliding-window timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the table's figures to this JSON file")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    positive = ("crop_size", "num_images", "crops_per_image", "num_classes", "batch", "steps", "epochs")
    for name in positive + ("extract_batch", "sw_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if args.warmup < 0:
        parser.error("--warmup must not be negative.")
    if any(s < args.crop_size for s in args.image_size):
        parser.error(f"--image-size {args.image_size} must be at least --crop-size {args.crop_size} in both dims.")
    if args.disk_cache is not None and not Path(args.disk_cache).is_dir():
        parser.error(f"--disk-cache {args.disk_cache}: not a directory (the cache file is written there).")
    if args.num_classes > IGNORE_INDEX:
        parser.error(f"--num-classes must be below the ignore index {IGNORE_INDEX}.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_benchmark(args, parser, device)
    finally:
        torch.set_num_threads(threads)  # main() may be called from another program (the tests)


def run_benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device) -> int:
    blocks = tuple(args.blocks) if args.blocks else DEFAULT_BLOCKS[args.preset]
    crop = (args.crop_size, args.crop_size)
    n_img, k = args.num_images, args.crops_per_image
    blockwise = not args.assembled_cache
    cached_way = "blockwise" if blockwise else "assembled"
    host = HostPeak()
    rss_start = host.current_mib()

    # ---- network, extractor and data (random weights, synthetic images)
    torch.manual_seed(args.seed)
    network = MDMUNet.from_preset(args.preset).to(device)
    if args.network_bf16:
        network = network.to(torch.bfloat16)  # the network casts its input to its weights' dtype
    try:
        extractor = MDMFeatureExtractor(network, blocks=blocks, timestep=50, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    if args.crop_size % extractor.size_multiple:
        parser.error(f"--crop-size must be a multiple of {extractor.size_multiple} for this network.")
    channels = extractor.out_channels
    data = SyntheticLabelledImages(n_img, args.image_size, tiles=args.tiles, seed=args.seed)
    n_params = sum(p.numel() for p in network.parameters())

    print("MDM few-shot head training: feature cache vs recomputing features every batch")
    print(
        f"settings : preset={args.preset} ({n_params / 1e6:.1f} M parameters, random weights) blocks={list(blocks)} "
        f"channels={channels} crop={crop[0]}x{crop[1]} images={n_img} of {args.image_size[0]}x{args.image_size[1]} "
        f"({'H&E-like tiles' if args.tiles else 'noise'}) crops/image={k} batch={args.batch} classes={args.num_classes} heads={args.num_heads}"
    )
    print(
        f"           steps={args.steps} warmup={args.warmup} epochs={args.epochs} fp16_cache={args.fp16_cache} "
        f"extract_batch={args.extract_batch} sw_batch={args.sw_batch} overlap={OVERLAP} t=50 device={device.type} "
        f"seed={args.seed} cached_head={cached_way} network={'bf16' if args.network_bf16 else 'fp32'} "
        f"cache_in={'disk: ' + args.disk_cache if args.disk_cache else 'memory'}"
    )
    for line in describe_machine(device):
        print(line)
    print(f"memory   : host peak = {host.how} before each phase")
    print(
        f"           RSS at start of main {rss_start:.1f} MiB; synthetic images held as uint8: "
        f"{data.nbytes() / MIB:.1f} MiB (part of every RSS figure)"
    )
    print(flush=True)
    if args.warmup:  # first calls pay one-off set-up costs (kernel selection, allocator growth): not the cache's
        extractor.extract_blocks(data[0][0][None, :, : crop[0], : crop[1]].to(device))
    rss_before = host.current_mib()

    # ---- 1. build the cache (features computed once), then train the head on it
    host.reset()
    _gpu_reset(device)
    build_s, cache = timed(
        lambda: FeatureCache(
            extractor, data, crop_size=crop, crops_per_image=k, fp16=args.fp16_cache, seed=args.seed,
            batch_size=args.extract_batch, device=device, ignore_index=IGNORE_INDEX, disk_dir=args.disk_cache,
        ),
        device,
    )  # fmt: skip
    gpu_build = _gpu_peak_mib(device)
    cache_bytes = cache.nbytes()
    planned_per_crop = FeatureCache.bytes_per_crop(extractor, crop, fp16=args.fp16_cache)
    print(f"cache built: {len(cache)} crops in {build_s:.2f} s, {cache_bytes / MIB:.1f} MiB", flush=True)

    _gpu_reset(device)
    cached_prepare = CachedFeaturePrepareBatch(extractor, ignore_index=IGNORE_INDEX, blockwise=blockwise)
    head, opt = make_head_and_optimizer(channels, args.num_classes, device, args.seed, args.num_heads)
    # the bundles' trainer network in cached mode (EnsembleLogits takes blocks itself)
    cached_network = BlockwiseHead(head) if blockwise and args.num_heads == 1 else head

    def cached_batch(i: int) -> dict[str, Any]:
        first = (i * args.batch) % len(cache)
        return default_collate([cache[(first + j) % len(cache)] for j in range(args.batch)])

    cached_times, cached_loss = train_steps(
        cached_prepare, cached_batch, cached_network, opt, args.steps, args.warmup, device
    )
    peak_cache_train = host.peak_mib()  # covers the cache build and the cached training
    rss_after_train = host.current_mib()
    gpu_cached = _gpu_peak_mib(device)
    print(f"cached training ({cached_way}): {args.steps} steps, loss {cached_loss:.4f}", flush=True)

    # ---- 2. the reference's way: a fresh random crop and a network forward every step (cache freed first)
    del cache, cached_prepare, cached_network, head, opt
    host.reset()
    _gpu_reset(device)
    online_prepare = OnlineFeaturePrepareBatch(extractor, ignore_index=IGNORE_INDEX)
    head, opt = make_head_and_optimizer(channels, args.num_classes, device, args.seed, args.num_heads)
    crop_gen = torch.Generator().manual_seed(args.seed + 1)

    def online_batch(i: int) -> dict[str, Any]:
        first = i * args.batch
        return default_collate([data.random_crop((first + j) % n_img, crop, crop_gen) for j in range(args.batch)])

    online_times, online_loss = train_steps(online_prepare, online_batch, head, opt, args.steps, args.warmup, device)
    peak_online = host.peak_mib()
    gpu_online = _gpu_peak_mib(device)
    print(f"recompute training: {args.steps} steps, loss {online_loss:.4f}", flush=True)

    # ---- 3. sliding-window inference over one full-size image
    infer_s, windows, peak_infer, gpu_infer = 0.0, 0, 0.0, 0.0
    if not args.skip_inference:
        segmenter = MDMSegmenter(extractor, head).to(device).eval()
        inferer = make_sliding_window_inferer(args.crop_size, OVERLAP, sw_batch_size=args.sw_batch)
        image = data[0][0][None].to(device)
        seen = [0]

        def count_windows(module: torch.nn.Module, inputs: tuple) -> None:
            seen[0] += int(inputs[0].shape[0])

        hook = segmenter.register_forward_pre_hook(count_windows)
        host.reset()
        _gpu_reset(device)
        infer_s, pred = timed(lambda: segmenter.segment(image, inferer), device)
        hook.remove()
        windows = seen[0]
        peak_infer = host.peak_mib()
        gpu_infer = _gpu_peak_mib(device)
        assert tuple(pred.shape[2:]) == tuple(args.image_size)
        print(f"inference: {windows} windows in {infer_s:.2f} s", flush=True)
    print()

    # ---- derived figures
    step_c = statistics.median(cached_times)
    step_o = statistics.median(online_times)
    steps_per_epoch = math.ceil(n_img / args.batch)
    total_c = build_s + args.epochs * steps_per_epoch * step_c
    total_o = args.epochs * steps_per_epoch * step_o
    ddpm_bytes = n_img * math.prod(crop) * channels * 4
    e, s = args.epochs, steps_per_epoch
    h_img, w_img = args.image_size
    cache_kind = "fp16" if args.fp16_cache else "fp32"
    if blockwise:
        cached_step = "blockwise: layer 1 at native resolution, no assembled map + head fwd/CE/bwd/Adam"
    else:
        cached_step = "assembled: upsample+concat+normalise + head fwd/CE/bwd/Adam"

    rows: list[tuple[str, float | int, str, str, str]] = [
        ("rss_before_cache", rss_before, "MiB", "measured",
         "process RSS with the network and the images loaded, before the cache (VmRSS)"),
        ("cache_nbytes", cache_bytes / MIB, "MiB", "measured",
         f"FeatureCache.nbytes(): {n_img * k} crops, native-resolution {cache_kind} blocks + labels + norms"),
        ("cache_planned", planned_per_crop * n_img * k / MIB, "MiB", "computed",
         "FeatureCache.bytes_per_crop x crops (planning figure, should equal cache_nbytes)"),
        ("cache_per_crop", cache_bytes / (n_img * k) / MIB, "MiB", "measured", "cache_nbytes / crops"),
        ("peak_rss_cache_and_training", peak_cache_train, "MiB", "measured",
         f"process peak RSS over building the cache and {args.warmup}+{args.steps} cached head steps"),
        ("rss_after_cached_training", rss_after_train, "MiB", "measured",
         "process RSS after cached training (cache, network, head, images resident)"),
        ("peak_rss_recompute_training", peak_online, "MiB", "measured",
         f"process peak RSS over {args.warmup}+{args.steps} recompute steps (cache freed before)"),
        ("peak_rss_inference", peak_infer, "MiB", "measured",
         "process peak RSS during the sliding-window inference (0 = skipped)"),
        ("cache_build_time", build_s, "s", "measured",
         f"building the cache: {n_img * k} crops, one network forward each (features computed once)"),
        ("cache_build_per_crop", build_s / (n_img * k), "s", "measured", "cache_build_time / crops"),
        ("step_cached", step_c * 1e3, "ms", "measured",
         f"median head step with the cache ({cached_step}), batch {args.batch}, {len(cached_times)} steps"),
        ("step_recompute", step_o * 1e3, "ms", "measured",
         f"median head step recomputing features (network forward + the same), {len(online_times)} steps"),
        ("speedup_per_step", step_o / step_c, "x", "computed", "step_recompute / step_cached"),
        ("steps_per_epoch", steps_per_epoch, "steps", "computed",
         f"S = ceil(N / batch) = ceil({n_img} / {args.batch})"),
        ("total_cached", total_c, "s", "computed",
         f"build + E*S*step_cached = {build_s:.4g} + {e}*{s}*{step_c:.4g} s"),
        ("total_recompute", total_o, "s", "computed", f"E*S*step_recompute = {e}*{s}*{step_o:.4g} s"),
        ("speedup_total", total_o / total_c, "x", "computed", f"total_recompute / total_cached over E={e} epochs"),
        ("sliding_window_time", infer_s, "s", "measured",
         f"segment one {h_img}x{w_img} image: {args.crop_size} px windows, overlap {OVERLAP}, gaussian, "
         f"sw_batch {args.sw_batch} (0 = skipped)"),
        ("sliding_window_windows", windows, "windows", "measured", "network calls' images counted by a hook"),
        ("ddpmseg_features_ram", ddpm_bytes / GIB, "GiB", "computed",
         f"not measured: N*H*W*C*4 B = {n_img}*{crop[0]}*{crop[1]}*{channels}*4 = {ddpm_bytes / 1e9:.4g} GB "
         "(every pixel's fp32 features)"),
        ("ddpmseg_vs_cache", ddpm_bytes / cache_bytes, "x", "computed", "ddpmseg_features_ram / cache_nbytes"),
    ]  # fmt: skip
    if device.type == "cuda":
        rows += [
            ("gpu_peak_cache_build", gpu_build, "MiB", "measured", "torch.cuda.max_memory_allocated, cache build"),
            ("gpu_peak_cached_training", gpu_cached, "MiB", "measured", "the same, cached head training"),
            ("gpu_peak_recompute_training", gpu_online, "MiB", "measured", "the same, recompute head training"),
            ("gpu_peak_inference", gpu_infer, "MiB", "measured", "the same, sliding-window inference"),
        ]
    print("Few-shot head training: memory and time")
    print(format_table(rows))
    print()
    print(
        f"totals   : E={e} epochs of N={n_img} labelled images, S={s} steps per epoch; "
        f"cached = build + E*S*step_cached, recompute = E*S*step_recompute"
    )
    print(f"losses   : last cached step {cached_loss:.4f}, last recompute step {online_loss:.4f}")
    if args.json is not None:
        figures = {name: {"value": value, "unit": unit, "kind": kind} for name, value, unit, kind, _ in rows}
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda f: json.dump({"settings": settings, "figures": figures}, f, indent=2), "w")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
