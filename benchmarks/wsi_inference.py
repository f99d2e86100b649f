#!/usr/bin/env python
"""Peak host memory and time of whole-slide inference (``inference_wsi.json``'s ``SlideInferer``).

A synthetic pyramidal slide (embedded GlaS tiles on glass, 3 levels, written tile by tile so generating it stays
small too) is segmented by a tiny MDM segmenter with random weights (only memory and time matter): tile-wise
reading, the tissue mask, ``PatchInferer`` with ``ZarrAvgMerger`` on disk, the pyramidal label TIFF. The peak
resident set size is measured from just before inference to the end (``VmHWM`` reset after writing the slide);
the goal for a 20,000 x 20,000 slide is below 2 GB. Examples::

    python benchmarks/wsi_inference.py                                   # 20,000 x 20,000 (hours on a small CPU)
    python benchmarks/wsi_inference.py --size 2000 2000 --window 64
    python benchmarks/wsi_inference.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script

from common import HostPeak, describe_machine, resolve_device  # noqa: E402

from monai_mdm.data.synthetic import write_synthetic_slide  # noqa: E402
from monai_mdm.inferers import MDMSegmenter, SlideInferer  # noqa: E402
from monai_mdm.networks import MDMFeatureExtractor, MDMUNet, PixelHeadEnsemble  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(20000, 20000), metavar=("H", "W"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--blocks", type=int, nargs="+", default=(5, 6, 7, 8), help="decoder blocks (tiny: 0..8)")
    parser.add_argument("--window", type=int, default=256, help="sliding window side (the paper's: 256)")
    parser.add_argument("--batch", type=int, default=4, help="windows per network call")
    parser.add_argument("--tissue", type=float, default=0.5, help="fraction of the slide's cells holding tissue")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="where the slide and output go (default: temp)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    peak = HostPeak()
    for line in describe_machine(device):
        print(line)
    print(f"memory   : peak_MiB = CPU peak RSS ({peak.how})")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="wsi_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        slide = work / "slide.tif"
        start = time.perf_counter()
        write_synthetic_slide(slide, tuple(args.size), mpp=0.62, tissue=args.tissue)
        written = time.perf_counter() - start
        print(f"slide    : {args.size[0]} x {args.size[1]} px, 3 levels, {slide.stat().st_size / 2**20:.0f} MiB, "
              f"written in {written:.1f} s (peak {peak.peak_mib():.0f} MiB)")  # fmt: skip

        torch.manual_seed(0)
        extractor = MDMFeatureExtractor(MDMUNet.from_preset(args.preset), blocks=tuple(args.blocks))
        model = MDMSegmenter(extractor, PixelHeadEnsemble(extractor.out_channels, 2)).eval().to(device)
        inferer = SlideInferer(mpp=0.62, window_size=args.window, batch_size=args.batch, device=device)
        peak.reset()
        before = peak.current_mib()
        start = time.perf_counter()
        info = inferer(str(slide), model, str(work / "out"))
        seconds = time.perf_counter() - start
        output = Path(info["output"]).stat().st_size / 2**20
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"windows  : {info['run']} run on tissue, {info['skipped']} skipped (glass), {args.window} px, "
          f"batch {args.batch}, preset {args.preset}")  # fmt: skip
    print(f"time     : {seconds:.1f} s ({1000 * seconds / max(info['run'], 1):.0f} ms per window run)")
    print(f"peak_MiB : {peak.peak_mib():.0f} (RSS before inference {before:.0f}); output {output:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
