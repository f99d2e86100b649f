#!/usr/bin/env python
"""Few-shot inference throughput and memory: ``MDMSegmenter`` against the bare network it runs.

Two measurements in one process:

1. **pipeline vs floor**, interleaved: the same batch of ``--sw-batch`` windows goes alternately through the
   segmenter (mask, UNet up to the deepest used decoder block, norms, head, scores) and through the bare
   network over the same windows up to the same block (``MDMUNet.decoder_features``, the floor of this
   pipeline: the UNet's own work); ``--compare-assembled`` adds the old head path (upsample, concatenate and
   normalise the blocks, then the plain head). Interleaving makes load from other processes hit every path
   alike, so the ratio survives a busy machine better than the absolute times.
2. **one image**: ``segment`` of one ``--image-size`` image with the paper's sliding window (Gaussian blending,
   overlap 0.2): wall time, megapixels/s and the process's peak RSS during it.

Weights are random and the images synthetic: only time and memory matter. Examples::

    python benchmarks/inference_throughput.py --preset tiny
    python benchmarks/inference_throughput.py --preset paper --reps 2
    python benchmarks/inference_throughput.py --preset paper --device cuda --reps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script

from common import HostPeak, describe_machine, resolve_device, sync  # noqa: E402

from monai_mdm.inferers.segmenter import MDMSegmenter, make_sliding_window_inferer  # noqa: E402
from monai_mdm.networks.features import MDMFeatureExtractor  # noqa: E402
from monai_mdm.networks.mdm_unet import MDMUNet  # noqa: E402
from monai_mdm.networks.pixel_head import PixelHeadEnsemble  # noqa: E402

#: per preset: decoder blocks, window edge and image size (H, W) when not given
DEFAULTS = {
    "tiny": {"blocks": (3, 4, 5, 6, 7), "window": 64, "image_size": (512, 512)},
    "paper": {"blocks": (8, 9, 10, 11, 12), "window": 256, "image_size": (522, 775)},
}
OVERLAP = 0.2
MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="tiny", help="MDMUNet preset")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="decoder blocks (default: the preset's)")
    p.add_argument("--window", type=int, default=None, help="window edge in px (default: 64 tiny, 256 paper)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image of the one-image run (default: 512 512 tiny, 522 775 paper = GlaS)")  # fmt: skip
    p.add_argument("--sw-batch", type=int, default=4, help="windows per network call")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=1, help="heads of the ensemble (faces: 10)")
    p.add_argument("--reps", type=int, default=10, help="interleaved repetitions of each path")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--compare-assembled", action="store_true", help="also time the old assembled head path")
    p.add_argument("--skip-image", action="store_true", help="leave out the one-image run")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def interleaved(paths: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device):
    """Seconds of each path per repetition, the paths taken in turn within every repetition."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(warmup + reps):
        for name, fn in paths.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in
             [header, ["-" * w for w in widths], *rows]]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if min(args.sw_batch, args.reps, args.num_classes, args.num_heads) < 1 or args.warmup < 0:
        parser.error("--sw-batch, --reps, --num-classes and --num-heads must be at least 1, --warmup at least 0.")
    defaults = DEFAULTS[args.preset]
    blocks = tuple(args.blocks) if args.blocks else defaults["blocks"]
    window = args.window or defaults["window"]
    image_size = tuple(args.image_size) if args.image_size else defaults["image_size"]
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, parser, blocks, window, image_size, device)
    finally:
        torch.set_num_threads(threads)


def run(args, parser, blocks, window, image_size, device) -> int:
    host = HostPeak()
    torch.manual_seed(args.seed)
    network = MDMUNet.from_preset(args.preset).to(device).eval()
    try:
        extractor = MDMFeatureExtractor(network, blocks=blocks, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    if window % extractor.size_multiple:
        parser.error(f"--window must be a multiple of {extractor.size_multiple} for this network.")
    head = PixelHeadEnsemble(extractor.out_channels, args.num_classes, num_heads=args.num_heads)
    segmenter = MDMSegmenter(extractor, head).to(device).eval()
    n_params = sum(p.numel() for p in network.parameters())
    print("MDM few-shot inference: segmenter against the bare network up to the deepest used decoder block")
    print(f"command  : python benchmarks/inference_throughput.py {' '.join(args.argv)}".rstrip())
    print(
        f"settings : preset={args.preset} ({n_params / 1e6:.1f} M parameters, random weights) blocks={list(blocks)} "
        f"channels={extractor.out_channels} window={window} sw_batch={args.sw_batch} heads={args.num_heads} "
        f"classes={args.num_classes} reps={args.reps} warmup={args.warmup} device={device.type}"
    )
    for line in describe_machine(device):
        print(line)
    print(f"memory   : host peak = {host.how}; RSS now {host.current_mib():.1f} MiB (network loaded)")
    print(flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    windows = (torch.rand(args.sw_batch, 3, window, window, generator=gen) * 2 - 1).to(device)
    t = torch.full((args.sw_batch,), extractor.timestep, dtype=torch.long, device=device)
    paths: dict[str, Callable[[], object]] = {
        "segmenter": lambda: segmenter(windows),
        "bare decoder": lambda: network.decoder_features(windows, t, blocks),
    }
    if args.compare_assembled:
        paths["assembled head (old)"] = lambda: segmenter.head(extractor(windows))
    with torch.inference_mode():
        times = interleaved(paths, args.reps, args.warmup, device)
    floor = times["bare decoder"]
    rows = []
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, floor)]
        med = statistics.median(ts)
        rows.append([name, f"{med / args.sw_batch * 1e3:.2f}", f"{min(ts) / args.sw_batch * 1e3:.2f}",
                     f"{args.sw_batch * window * window / med / 1e6:.3f}", f"{statistics.median(ratios):.3f}",
                     f"{min(ts) / min(floor):.3f}"])  # fmt: skip
    print("x_floor: median over repetitions of (path / bare decoder) in the same repetition; "
          "x_floor_min: fastest path / fastest bare decoder")  # fmt: skip
    print(f"Per window ({window} x {window}, batches of {args.sw_batch}, {args.reps} interleaved repetitions)")
    print(format_table(["path", "ms/window", "min_ms", "Mpx/s", "x_floor", "x_floor_min"], rows))
    print(flush=True)

    if not args.skip_image:
        inferer = make_sliding_window_inferer(window, OVERLAP, sw_batch_size=args.sw_batch, progress=False)
        image = (torch.rand(1, 3, *image_size, generator=gen) * 2 - 1).to(device)
        n_windows = inferer.count_windows(image_size)
        host.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            labels = segmenter.segment(image, inferer)
            sync(device)
            seconds = time.perf_counter() - start
        assert tuple(labels.shape[2:]) == tuple(image_size)
        mpx = image_size[0] * image_size[1] / 1e6
        rows = [
            ["time", f"{seconds:.2f}", "s", f"segment() of one {image_size[0]} x {image_size[1]} image, "
             f"{n_windows} windows of {window} px, overlap {OVERLAP}, gaussian"],
            ["throughput", f"{mpx / seconds:.4f}", "Mpx/s", "image megapixels / time"],
            ["peak_rss", f"{host.peak_mib():.1f}", "MiB", "process peak RSS during segment() (network included)"],
        ]  # fmt: skip
        if device.type == "cuda":
            rows.append(["gpu_peak", f"{torch.cuda.max_memory_allocated(device) / MIB:.1f}", "MiB",
                         "torch.cuda.max_memory_allocated during segment()"])  # fmt: skip
        print("One image")
        print(format_table(["figure", "value", "unit", "meaning"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
