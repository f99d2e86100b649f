#!/usr/bin/env python
"""Throughput and memory of one MDM pretraining step, and the cost of batched patch masking.

One training step = draw t per sample, mask the batch on the device (``PatchMasking``, p = 8, T = 1000),
forward through ``MDMUNet``, SSIM loss against the clean images, backward, AdamW step. The clean images are
random tensors already on the device, so data loading is not measured.

Examples::

    python benchmarks/pretrain_throughput.py --preset tiny --image-size 64 --batch 8 --steps 5 --warmup 2
    python benchmarks/pretrain_throughput.py --preset tiny --image-size 32 --batch 16 --compare-reference
    python benchmarks/pretrain_throughput.py --sweep
    python benchmarks/pretrain_throughput.py --device cuda --preset paper --image-size 256 --batch 64 \\
        --precision bf16 --channels-last --compile --compare-reference

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script

from common import HostPeak, current_rss_mib, describe_machine, resolve_device, time_calls  # noqa: E402

from monai_mdm.losses.reconstruction import reconstruction_loss  # noqa: E402
from monai_mdm.networks.mdm_unet import MDMUNet  # noqa: E402
from monai_mdm.networks.presets import PRESETS  # noqa: E402
from monai_mdm.transforms.corruption import PatchMasking  # noqa: E402

PATCH_SIZE = 8
NUM_TIMESTEPS = 1000
LEARNING_RATE = 1e-4
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

TRAIN_COLUMNS = (
    "preset", "size", "batch", "micro", "precision", "ch_last", "compile", "ckpt",
    "ms/step", "min_ms", "max_ms", "images/s", "peak_MiB", "loss",
)  # fmt: skip
COMPARE_COLUMNS = ("preset", "size", "batch", "precision", "ref_ms/step", "batched_ms/step", "speed-up")
MASK_COLUMNS = ("method", "batch", "size", "ms/batch", "min_ms", "slowdown")


# ----------------------------------------------------------------------------- helpers


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of one benchmark row.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors held by PyTorch's allocator; reset per row).
    CPU: the peak resident set size of the whole process (:class:`common.HostPeak`, reset per row where
    Linux allows it), which includes the interpreter, torch's libraries and memory the allocator kept from
    earlier rows.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = HostPeak() if device.type != "cuda" else None
        if self.host is None:
            self.kind = "CUDA torch.cuda.max_memory_allocated, reset per row"
        else:
            self.kind = f"CPU peak RSS of the process ({self.host.how}{', per row' if self.host.resettable else ''})"

    def reset(self) -> None:
        if self.host is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.host.reset()

    def read_mib(self) -> float:
        if self.host is None:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.host.peak_mib()


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain whitespace-aligned table; text left-aligned, numbers right-aligned."""

    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if v != v:  # NaN
                return "nan"
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numeric = [all(is_number(row[i]) for row in rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(r) for r in text]
    return "\n".join(out)


# ----------------------------------------------------------------------------- training step


@dataclass
class StepConfig:
    preset: str
    image_size: int
    batch: int
    micro_batches: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    compile_backend: str = "inductor"


@dataclass
class StepResult:
    config: StepConfig
    times_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    loss: float | None = None
    error: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_s) * 1e3 if self.times_s else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.config.batch / (self.median_ms / 1e3) if self.times_s else float("nan")

    def row(self) -> list[Any]:
        c = self.config
        head = [c.preset, c.image_size, c.batch, c.micro_batches, c.precision, c.channels_last, c.compile,
                c.gradient_checkpointing]  # fmt: skip
        if self.error:
            return head + [self.error] + [""] * (len(TRAIN_COLUMNS) - len(head) - 1)
        return head + [
            self.median_ms,
            min(self.times_s) * 1e3,
            max(self.times_s) * 1e3,
            self.images_per_s,
            float(self.peak_mib) if self.peak_mib is not None else float("nan"),
            float(self.loss) if self.loss is not None else float("nan"),
        ]


def check_config(cfg: StepConfig) -> None:
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}.")
    if PRESETS[cfg.preset]["spatial_dims"] != 2 and cfg.channels_last:
        raise ValueError(f"--channels-last is for 2D presets; {cfg.preset!r} is 3D.")
    if cfg.precision not in AMP_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AMP_DTYPES)}, got {cfg.precision!r}.")
    divisor = 2 ** (len(PRESETS[cfg.preset]["channel_mult"]) - 1)
    if cfg.image_size % PATCH_SIZE or cfg.image_size % divisor:
        raise ValueError(
            f"--image-size {cfg.image_size} must be a multiple of the patch size {PATCH_SIZE} and of {divisor} "
            f"(the downsampling of preset {cfg.preset!r})."
        )
    if cfg.batch < 1 or cfg.micro_batches < 1 or cfg.batch % cfg.micro_batches:
        raise ValueError(f"--batch {cfg.batch} must be a positive multiple of --micro-batches {cfg.micro_batches}.")


def build_train_step(cfg: StepConfig, device: torch.device, seed: int = 0) -> tuple[Callable[[], torch.Tensor], int]:
    """A closure running one optimiser step over ``cfg.batch`` images, and the network's parameter count.

    The global batch is split into ``cfg.micro_batches`` equal micro-batches whose gradients are accumulated
    (each micro-batch loss divided by their number) before one AdamW step: ``micro_batches == batch`` is the
    public MDM code's way of training with batch 128, ``micro_batches == 1`` is one batched step.
    """
    check_config(cfg)
    torch.manual_seed(seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = MDMUNet.from_preset(cfg.preset, use_checkpoint=cfg.gradient_checkpointing)
    model = model.to(device=device, memory_format=fmt).train()
    n_params = sum(p.numel() for p in model.parameters())
    net = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    nd = PRESETS[cfg.preset]["spatial_dims"]
    loss_fn = reconstruction_loss("ssim", spatial_dims=nd)
    masking = PatchMasking(patch_size=PATCH_SIZE, num_timesteps=NUM_TIMESTEPS)
    amp_dtype = AMP_DTYPES[cfg.precision]
    # fp16 needs loss scaling against gradient underflow; used on CUDA (the CPU path runs fp16 unscaled)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")

    clean = torch.rand(cfg.batch, model.in_channels, *[cfg.image_size] * nd, device=device) * 2 - 1
    clean = clean.contiguous(memory_format=fmt)
    chunks = clean.split(cfg.batch // cfg.micro_batches)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for x0 in chunks:
            t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],), device=device)
            xt = masking(x0, t).contiguous(memory_format=fmt)
            with autocast():
                pred = net(xt, t)
            loss = loss_fn(pred.float(), x0) / len(chunks)  # SSIM in fp32, outside autocast
            scaler.scale(loss).backward()
            total += loss.detach()
        scaler.step(optimizer)
        scaler.update()
        return total

    return step, n_params


def run_step_benchmark(
    cfg: StepConfig, device: torch.device, steps: int, warmup: int, memory: PeakMemory, seed: int = 0
) -> StepResult:
    """Time ``steps`` training steps after ``warmup`` ones; errors (e.g. out of memory) end up in the result."""
    result = StepResult(cfg)
    _free_memory(device)
    memory.reset()
    last: list[torch.Tensor] = []
    try:
        step, _ = build_train_step(cfg, device, seed)

        def timed() -> None:
            last[:] = [step()]

        result.times_s = time_calls(timed, steps, warmup)
        result.peak_mib = memory.read_mib()
        result.loss = float(last[0]) if last else None
        del step
    except torch.OutOfMemoryError:
        result.error = "out of memory"
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the rest of the grid still runs
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
    finally:
        last.clear()
        if cfg.compile:
            torch._dynamo.reset()
        _free_memory(device)
    return result


# ----------------------------------------------------------------------------- masking cost


def mask_one_naive(
    image: torch.Tensor, t: int, patch: int = PATCH_SIZE, num_timesteps: int = NUM_TIMESTEPS
) -> torch.Tensor:
    """Mask a single (C, H, W) image the per-sample way: a Python-level ``randperm`` over its patches.

    Written here only as the baseline for the batched ``PatchMasking``; same rule (keep exactly
    floor(L * (1 - t/T)) patches chosen uniformly at random, masked pixels set to 0).
    """
    _, h, w = image.shape
    gh, gw = h // patch, w // patch
    num_patches = gh * gw
    n_keep = (num_patches * (num_timesteps - t)) // num_timesteps
    keep = torch.zeros(num_patches, dtype=image.dtype, device=image.device)
    keep[torch.randperm(num_patches, device=image.device)[:n_keep]] = 1
    keep = keep.view(gh, 1, gw, 1).expand(gh, patch, gw, patch).reshape(1, h, w)
    return image * keep


@dataclass
class MaskResult:
    method: str
    batch: int
    size: int
    times_s: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_s) * 1e3


def run_mask_benchmark(
    batch: int, size: int, device: torch.device, reps: int, warmup: int, seed: int = 0
) -> list[MaskResult]:
    """Mask a (batch, 3, size, size) tensor in one ``PatchMasking`` call vs one image at a time in a loop."""
    if size % PATCH_SIZE:
        raise ValueError(f"--mask-size {size} must be a multiple of the patch size {PATCH_SIZE}.")
    torch.manual_seed(seed)
    masking = PatchMasking(patch_size=PATCH_SIZE, num_timesteps=NUM_TIMESTEPS)
    images = torch.rand(batch, 3, size, size, device=device) + 0.5  # no exact zeros, so kept pixels can be counted
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device)
    t_list = t.tolist()  # the per-sample loop draws/handles t as Python ints, as a per-sample data pipeline would

    # every method returns a new (B, 3, H, W) tensor, as the batched call does: reusing one preallocated output
    # in the loops only would hide the cost of fresh memory (page faults on CPU)
    def batched() -> torch.Tensor:
        return masking(images, t)

    def loop_patchmasking() -> torch.Tensor:
        out = torch.empty_like(images)
        for i in range(batch):
            out[i : i + 1] = masking(images[i : i + 1], t[i : i + 1])
        return out

    def loop_randperm() -> torch.Tensor:
        out = torch.empty_like(images)
        for i in range(batch):
            out[i] = mask_one_naive(images[i], t_list[i])
        return out

    methods = {
        "batched PatchMasking (one call)": batched,
        "loop: PatchMasking per sample": loop_patchmasking,
        "loop: naive randperm per sample": loop_randperm,
    }
    # sanity check outside the timing: every method keeps exactly floor(L * (1 - t/T)) patches per sample
    num_patches = (size // PATCH_SIZE) ** 2
    expected = ((num_patches * (NUM_TIMESTEPS - t)) // NUM_TIMESTEPS) * PATCH_SIZE**2
    for name, fn in methods.items():
        kept = (fn()[:, 0] != 0).flatten(1).sum(1)
        if not torch.equal(kept, expected):
            raise AssertionError(f"{name} kept the wrong number of pixels")
    # round-robin over the methods in every repetition, so load from other processes hits them alike
    results = [MaskResult(name, batch, size, []) for name in methods]
    for rep in range(warmup + reps):
        for res, fn in zip(results, methods.values()):
            seconds = time_calls(fn, 1, 0)[0]
            if rep >= warmup:
                res.times_s.append(seconds)
    return results


# ----------------------------------------------------------------------------- reporting


def sweep_grid(device: torch.device, args: argparse.Namespace) -> list[StepConfig]:
    """The default grid: tiny at 32/64 px x batch 8/32 on CPU; paper at 256 px, bf16, batch 32/64/128 on CUDA."""
    if device.type == "cuda":
        return [
            StepConfig("paper", 256, b, 1, "bf16", args.channels_last, args.compile) for b in (32, 64, 128)
        ]
    return [
        StepConfig("tiny", s, b, 1, args.precision, args.channels_last, args.compile) for s in (32, 64) for b in (8, 32)
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Throughput/memory of one MDM pretraining step (masking + forward + SSIM + backward + AdamW) "
        "and the cost of batched patch masking.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument(
        "--image-size", type=int, default=64, help="crop edge, square or cubic for 3D presets (multiple of 8 and of the preset's downsampling)"
    )
    p.add_argument("--batch", type=int, default=8, help="global batch per optimiser step")
    p.add_argument(
        "--precision", default="fp32", choices=sorted(AMP_DTYPES), help="torch.autocast dtype (fp32 = no autocast)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (repetitions); the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (include torch.compile's compilation)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend (eager: the same graph capture without code generation, for quick checks)",
    )  # fmt: skip
    p.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="MDMUNet(use_checkpoint=True): recompute each block's activations in the backward pass",
    )  # fmt: skip
    p.add_argument(
        "--micro-batches", type=int, default=1,
        help="split the global batch into N micro-batches with gradient accumulation "
        "(N = batch: the public MDM code's way)",
    )  # fmt: skip
    p.add_argument(
        "--compare-reference", action="store_true",
        help="run each setting twice, as batch-many micro-batches of 1 (the reference) and as one batch, "
        "and print the speed-up",
    )  # fmt: skip
    p.add_argument("--sweep", action="store_true", help="run the default grid (see sweep_grid) instead of one setting")
    p.add_argument("--mask-batch", type=int, default=128, help="batch of the masking-cost benchmark")
    p.add_argument("--mask-size", type=int, default=256, help="image size of the masking-cost benchmark")
    p.add_argument("--mask-reps", type=int, default=10, help="timed repetitions of the masking-cost benchmark")
    p.add_argument("--skip-masking", action="store_true", help="do not run the masking-cost benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables; returns 0, or 1 when a training row failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark

    if args.sweep:
        configs = sweep_grid(device, args)
    else:
        configs = [
            StepConfig(
                args.preset, args.image_size, args.batch, args.micro_batches, args.precision,
                args.channels_last, args.compile, args.gradient_checkpointing, args.compile_backend,
            )  # fmt: skip
        ]
    try:
        for cfg in configs:
            check_config(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    runs: list[tuple[str, StepConfig]] = []
    for cfg in configs:
        if args.compare_reference:
            runs.append(("reference", StepConfig(**{**asdict(cfg), "micro_batches": cfg.batch})))
            runs.append(("batched", StepConfig(**{**asdict(cfg), "micro_batches": 1})))
        else:
            runs.append(("single", cfg))

    memory = PeakMemory(device)
    print("MDM pretraining step benchmark")
    for line in describe_machine(device):
        print(line)
    print(f"settings : {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    print(
        f"step     : PatchMasking(p={PATCH_SIZE}, T={NUM_TIMESTEPS}) on the device + MDMUNet forward + SSIM loss "
        f"(win 5, sigma 1.5) + backward + AdamW(lr {LEARNING_RATE:g}); random images already on the device "
        f"(data loading not timed); fp16 GradScaler {'on' if device.type == 'cuda' else 'off (CPU)'}"
    )
    print(f"timing   : {args.warmup} warm-up + {args.steps} timed steps per row; ms/step = median, "
          f"images/s = batch / median{'; CUDA synchronised around every step' if device.type == 'cuda' else ''}")
    print(f"memory   : peak_MiB = {memory.kind}")
    rss = current_rss_mib()
    if device.type == "cpu" and rss is not None:
        print(f"           (process RSS before the first row: {rss:.0f} MiB)")
    if args.compile and args.warmup == 0:
        print("warning  : --compile with --warmup 0: the timed steps include compilation")
    print(flush=True)

    results: list[tuple[str, StepResult]] = []
    for kind, cfg in runs:
        print(
            f"... {cfg.preset} {cfg.image_size}px batch {cfg.batch} micro {cfg.micro_batches} {cfg.precision}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        results.append((kind, run_step_benchmark(cfg, device, args.steps, args.warmup, memory, args.seed)))

    print("Training step (micro = micro-batches per optimiser step; micro = batch is the reference's way)")
    print(format_table(TRAIN_COLUMNS, [r.row() for _, r in results]))
    print()

    compare_rows = []
    if args.compare_reference:
        for (_, ref), (_, bat) in zip(results[0::2], results[1::2]):
            c = bat.config
            ok = not ref.error and not bat.error
            compare_rows.append(
                [c.preset, c.image_size, c.batch, c.precision,
                 ref.median_ms if ok else float("nan"), bat.median_ms if ok else float("nan"),
                 ref.median_ms / bat.median_ms if ok else float("nan")]
            )  # fmt: skip
        print("Reference (batch-many micro-batches of 1) vs batched, same global batch; speed-up = ref / batched")
        print(format_table(COMPARE_COLUMNS, compare_rows))
        print()

    mask_results: list[MaskResult] = []
    if not args.skip_masking:
        print(f"... masking cost, batch {args.mask_batch} at {args.mask_size}px", file=sys.stderr, flush=True)
        mask_results = run_mask_benchmark(args.mask_batch, args.mask_size, device, args.mask_reps, 2, args.seed)
        base = mask_results[0].median_ms
        print(
            f"Patch masking of a ({args.mask_batch}, 3, {args.mask_size}, {args.mask_size}) batch on {device}: "
            f"median of {args.mask_reps}; slowdown = method / batched"
        )
        mask_rows = [
            [m.method, m.batch, m.size, m.median_ms, min(m.times_s) * 1e3, m.median_ms / base] for m in mask_results
        ]
        print(format_table(MASK_COLUMNS, mask_rows))
        print(
            "\nbatched speed-up over the per-sample loops: "
            + ", ".join(f"{m.median_ms / base:.1f}x ({m.method.split(': ')[-1]})" for m in mask_results[1:])
        )
        print()

    if args.json:
        payload = {
            "machine": describe_machine(device),
            "settings": vars(args) | {"json": str(args.json), "device": str(device)},
            "memory_kind": memory.kind,
            "train": [
                {"kind": k, **asdict(r.config), "median_ms": r.median_ms, "images_per_s": r.images_per_s,
                 "times_s": r.times_s, "peak_mib": r.peak_mib, "loss": r.loss, "error": r.error}
                for k, r in results
            ],  # fmt: skip
            "compare_reference": [dict(zip(COMPARE_COLUMNS, row)) for row in compare_rows],
            "masking": [asdict(m) | {"median_ms": m.median_ms} for m in mask_results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"results written to {args.json}")

    return 1 if any(r.error for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
