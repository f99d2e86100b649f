#!/usr/bin/env python
"""Where one MDM pretraining step spends its time: our code (timestep draw + patch masking, SSIM loss) against
the network's forward and backward and PyTorch's AdamW step.

The step is the pretraining bundle's: ``ObjectivePrepareBatch(objective("mdm"))`` prepares the masked batch,
``MDMUNet`` predicts the clean image, the objective's loss (SSIM), backward, AdamW. Each part is timed with
``time.perf_counter`` around it (CPU: the work is synchronous), median over ``--steps`` steps after
``--warmup``. Example::

    python benchmarks/pretrain_step_profile.py --preset tiny --image-size 64 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_mdm.engines import ObjectivePrepareBatch  # noqa: E402
from monai_mdm.networks import MDMUNet  # noqa: E402
from monai_mdm.transforms import objective  # noqa: E402

PARTS = ("prepare: draw t + mask (ours)", "network forward", "loss: SSIM (ours)", "backward", "AdamW step")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = MDMUNet.from_preset(args.preset).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    prepare = ObjectivePrepareBatch(objective("mdm"))
    clean = torch.rand(args.batch, net.in_channels, args.image_size, args.image_size) * 2 - 1
    seconds: dict[str, list[float]] = {name: [] for name in PARTS}
    for i in range(args.warmup + args.steps):
        marks = [time.perf_counter()]
        opt.zero_grad(set_to_none=True)
        inputs, target, _, kwargs = prepare({"image": clean}, "cpu")
        marks.append(time.perf_counter())
        pred = net(inputs, **kwargs)
        marks.append(time.perf_counter())
        loss = prepare.loss_function(pred, target)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        if i >= args.warmup:
            for name, a, b in zip(PARTS, marks, marks[1:]):
                seconds[name].append(b - a)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    total = sum(medians.values())
    print(f"one pretraining step: preset={args.preset} image={args.image_size} batch={args.batch} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median of each part)")  # fmt: skip
    for name, m in medians.items():
        print(f"{name:32s} {m * 1e3:9.1f} ms  {100 * m / total:5.1f} %")
    print(f"{'step (sum of the medians)':32s} {total * 1e3:9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
