#!/usr/bin/env python
"""Speed-up of DDP pretraining on N processes over 1 process, same global batch, CPU (gloo) or GPUs (nccl).

One training step is the pretraining bundle's: draw t per sample, mask 8 x 8 patches (``PatchMasking``),
``MDMUNet`` forward, SSIM loss, backward (DDP averages the gradients over the processes), AdamW step. The
global batch is split evenly over the processes, as ``multi_gpu_train.json`` does; the images are random
tensors already in memory, so data loading is not measured.

On CPU the processes share the cores, so two comparisons are printed:

* **1 thread per process**: 1 process x 1 thread against N processes x 1 thread (N times the cores);
* **equal total threads**: 1 process x N threads against N processes x 1 thread (the same cores, used
  by intra-op threads or by processes).

Examples::

    python benchmarks/ddp_speedup.py --preset tiny --image-size 64 --global-batch 8 --steps 10 --warmup 2
    python benchmarks/ddp_speedup.py --device cuda --preset paper --image-size 256 --global-batch 64 --processes 4

See ``benchmarks/README.md`` for what the figures mean.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_mdm.distributed import per_rank_batch_size  # noqa: E402
from monai_mdm.losses.reconstruction import reconstruction_loss  # noqa: E402
from monai_mdm.networks.mdm_unet import MDMUNet  # noqa: E402
from monai_mdm.transforms.corruption import PatchMasking  # noqa: E402

COLUMNS = ("comparison", "processes", "threads/proc", "batch/proc", "ms/step", "min_ms", "images/s", "speed-up")


@dataclass
class Setting:
    comparison: str
    processes: int
    threads: int


@dataclass
class Result:
    setting: Setting
    batch_per_process: int
    step_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, queue) -> None:
    """One process: build the same network as every other rank, train, and (rank 0) report step times."""
    torch.set_num_threads(threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = MDMUNet.from_preset(args.preset).to(device).train()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = reconstruction_loss("ssim", spatial_dims=2)
    masking = PatchMasking(patch_size=8, num_timesteps=1000)
    torch.manual_seed(1 + rank)  # each rank its own images and masks
    batch = per_rank_batch_size(args.global_batch, world)
    clean = torch.rand(batch, model.in_channels, args.image_size, args.image_size, device=device) * 2 - 1

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (batch,), device=device)
        loss = loss_fn(net(masking(clean, t), t), clean)
        loss.backward()
        optimizer.step()
        sync()  # the step ends when the slowest rank is done
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    if rank == 0:
        queue.put((batch, times))
    if world > 1:
        dist.destroy_process_group()


def measure(setting: Setting, args: argparse.Namespace) -> Result:
    """Start ``setting.processes`` fresh processes (also for 1, so every row pays the same start-up)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    mp.start_processes(
        _worker, args=(setting.processes, port, args, setting.threads, queue), nprocs=setting.processes,
        start_method="spawn",
    )  # fmt: skip
    batch, times = queue.get()
    return Result(setting, batch, times)


def settings_for(args: argparse.Namespace) -> list[Setting]:
    n = args.processes
    if args.device == "cuda":
        return [Setting("GPUs", 1, args.threads or 1), Setting("GPUs", n, args.threads or 1)]
    rows = []
    if "one-thread" in args.comparisons:
        rows += [Setting("1 thread/proc", 1, 1), Setting("1 thread/proc", n, 1)]
    if "equal-threads" in args.comparisons:
        rows += [Setting("equal threads", 1, n), Setting("equal threads", n, 1)]
    return rows


def format_table(results: Sequence[Result]) -> str:
    baseline = {r.setting.comparison: r for r in results if r.setting.processes == 1}
    rows = []
    for r in results:
        s = r.setting
        images_per_s = 1e3 * (r.batch_per_process * s.processes) / r.median_ms
        speed_up = baseline[s.comparison].median_ms / r.median_ms
        rows.append([s.comparison, s.processes, s.threads, r.batch_per_process, f"{r.median_ms:.1f}",
                     f"{min(r.step_ms):.1f}", f"{images_per_s:.1f}", f"{speed_up:.2f}"])  # fmt: skip
    widths = [max(len(str(c)), *(len(str(row[i])) for row in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(COLUMNS, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8, help="images per step over all processes")
    p.add_argument("--processes", type=int, default=2, help="N, compared with 1 process")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process on CUDA")
    p.add_argument(
        "--comparisons", nargs="+", choices=("one-thread", "equal-threads"), default=["one-thread", "equal-threads"]
    )
    p.add_argument("--json", type=Path, default=None, help="also write every step time here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    per_rank_batch_size(args.global_batch, args.processes)  # refuse an uneven split before starting anything
    if args.steps < 1:
        raise ValueError("--steps must be at least 1.")
    if args.device == "cuda" and torch.cuda.device_count() < args.processes:
        raise ValueError(f"--processes {args.processes} needs as many GPUs; {torch.cuda.device_count()} visible.")
    print(
        f"machine  : {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}, device {args.device}"
    )
    print(f"software : torch {torch.__version__}")
    print(
        f"setting  : preset {args.preset}, {args.image_size} px, global batch {args.global_batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up; median step time (slowest rank)\n"
    )
    results = []
    for setting in settings_for(args):
        print(f"measuring {setting.processes} process(es) x {setting.threads} thread(s) ...", file=sys.stderr)
        results.append(measure(setting, args))
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = [{**asdict(r.setting), "batch_per_process": r.batch_per_process, "step_ms": r.step_ms} for r in results]
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": data}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
