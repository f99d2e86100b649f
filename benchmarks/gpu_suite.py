#!/usr/bin/env python
"""The Python half of ``benchmarks/gpu_suite.sh``: its checks before anything runs, its training images, its table.

    python benchmarks/gpu_suite.py check --device cuda          # exit 2 with one line per missing piece
    python benchmarks/gpu_suite.py images DIR --count 16 --size 320
    python benchmarks/gpu_suite.py table WORK_DIR --out FILE    # the markdown table from the steps' JSON files
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# module -> what provides it on a machine without it (the GPU machine has torch, numpy, scipy, scikit-image, PIL)
NEEDED = {
    "torch": "PyTorch (the GPU machine's python3 has it)",
    "monai": "the carried wheels (bash benchmarks/device_wheels.sh, then carry .whl)",
    "ignite": "the carried wheels (pytorch-ignite; bash benchmarks/device_wheels.sh, then carry .whl)",
    "fire": "the carried wheels (python-fire, which `python -m monai.bundle` needs; bash benchmarks/device_wheels.sh)",
    "numpy": "numpy", "scipy": "scipy", "skimage": "scikit-image", "PIL": "pillow",
}  # fmt: skip

# the table's rows: (step, what, JSON file in the work folder)
PRETRAIN_ROWS = (
    ("fp32", "pretraining, fp32", "pretrain_fp32.json"),
    ("bf16", "pretraining, bf16 autocast", "pretrain_bf16.json"),
    ("bf16_cl_compile", "pretraining, bf16 + channels-last + torch.compile", "pretrain_bf16_cl_compile.json"),
    ("bf16_ckpt", "pretraining, bf16 + gradient checkpointing", "pretrain_bf16_ckpt.json"),
    ("reference", "pretraining, the reference's way (micro-batches of 1)", "pretrain_reference.json"),
)
ROW_NAMES = [r[1] for r in PRETRAIN_ROWS] + [
    "speed-up over the reference's way",
    "few-shot feature cache build",
    "few-shot head step (cached features)",
    "inference (sliding window)",
    "pretraining bundle, DDP via torchrun (1 process)",
]
GOAL_IMAGES_PER_S = 80.0
GOAL_SPEED_UP = 5.0


def check(device: str, torchrun: str) -> int:
    """Everything the suite needs, all reported at once; exit status 2 when something is missing."""
    problems = []
    for module, source in NEEDED.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure means the piece is not usable
            problems.append(f"python module '{module}' cannot be imported ({type(exc).__name__}: {exc}); it comes from {source}.")
    try:
        importlib.import_module("monai_mdm.networks")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"monai_mdm cannot be imported from {REPO} ({type(exc).__name__}: {exc}); run from the checkout.")
    try:
        import torch
        import torch.distributed as dist

        if device == "cuda":
            if not torch.cuda.is_available():
                problems.append("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); run on the GPU "
                                "machine, or pass --dry-run for the CPU check.")  # fmt: skip
            if not dist.is_available() or not dist.is_nccl_available():
                problems.append("torch.distributed has no NCCL backend, which the DDP row needs.")
        elif not dist.is_available() or not dist.is_gloo_available():
            problems.append("torch.distributed has no gloo backend, which the DDP row needs on the CPU.")
    except ImportError:
        pass  # reported above
    if shutil.which(torchrun) is None:
        problems.append(f"torchrun ({torchrun}) is not there: it comes with PyTorch, in the bin folder of the python "
                        "that has torch; put that folder on PATH.")  # fmt: skip
    for problem in problems:
        print(f"gpu_suite: missing: {problem}", file=sys.stderr)
    return 2 if problems else 0


def write_images(folder: Path, count: int, size: int) -> int:
    """Random RGB PNGs (throughput does not depend on the content) for the bundle's training run."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"image_{i:03d}.png")
    return 0


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"


def table_rows(work: Path) -> tuple[list[list[str]], bool]:
    """The rows of the table and whether every step left its figures."""
    rows: list[list[str]] = []
    ok = True
    best, reference = None, None
    for key, what, name in PRETRAIN_ROWS:
        data = _read(work / name)
        train = (data or {}).get("train") or [{}]
        r = train[-1]
        if data is None or r.get("error") or r.get("images_per_s") is None:
            ok = False
            why = r.get("error") or f"no results ({name}; see the log)"
            rows.append([what, "-", f"FAILED: {why}", "-"])
            continue
        setting = (f"{r['preset']} {r['image_size']} px, {r['precision']}, batch {r['batch']}"
                   + (f" as {r['micro_batches']} micro-batches" if r["micro_batches"] > 1 else ""))  # fmt: skip
        rows.append([what, setting, f"{_fmt(r['images_per_s'])} images/s ({_fmt(r['median_ms'])} ms/step)",
                     _fmt(r["peak_mib"], 0)])  # fmt: skip
        if key == "reference":
            reference = r["images_per_s"]
        elif best is None or r["images_per_s"] > best[0]:
            best = (r["images_per_s"], what.split(", ", 1)[1])
    if best and reference:
        speed_up = best[0] / reference
        goals = (f"goals: >= {GOAL_IMAGES_PER_S:g} images/s {'met' if best[0] >= GOAL_IMAGES_PER_S else 'NOT met'}, "
                 f">= {GOAL_SPEED_UP:g}x {'met' if speed_up >= GOAL_SPEED_UP else 'NOT met'}")  # fmt: skip
        rows.append([ROW_NAMES[5], f"best ({best[1]}) / reference", f"{speed_up:.1f}x; {goals}", "-"])
    else:
        rows.append([ROW_NAMES[5], "-", "-", "-"])

    fewshot = _read(work / "fewshot.json")
    if fewshot is None:
        ok = False
        rows += [[name, "-", "FAILED: no results (fewshot.json; see the log)", "-"] for name in ROW_NAMES[6:9]]
    else:
        s, f = fewshot["settings"], fewshot["figures"]

        def fig(name: str) -> float | None:
            return f.get(name, {}).get("value")

        net = f"{s['preset']}, {s['crop_size']} px crops"
        per_crop = fig("cache_build_per_crop")
        rows.append([ROW_NAMES[6], f"{net}, {s['num_images']} crops",
                     f"{_fmt(1 / per_crop if per_crop else None)} crops/s ({_fmt(fig('cache_build_time'), 2)} s)",
                     _fmt(fig("gpu_peak_cache_build"), 0)])  # fmt: skip
        rows.append([ROW_NAMES[7], f"{net}, batch {s['batch']}",
                     f"{_fmt(fig('step_cached'), 2)} ms/step (recomputing features: {_fmt(fig('step_recompute'), 2)} ms)",
                     _fmt(fig("gpu_peak_cached_training"), 0)])  # fmt: skip
        h, w = s["image_size"]
        seconds = fig("sliding_window_time")
        mpx = h * w / 1e6 / seconds if seconds else None
        rows.append([ROW_NAMES[8], f"{h} x {w} image, {s['crop_size']} px windows, sw_batch {s['sw_batch']}",
                     f"{_fmt(mpx, 3)} Mpx/s ({_fmt(seconds, 2)} s)", _fmt(fig("gpu_peak_inference"), 0)])  # fmt: skip

    ddp = _read(work / "ddp_timing.json")
    if ddp is None:
        ok = False
        rows.append([ROW_NAMES[9], "-", "FAILED: no results (ddp_timing.json; see the log)", "-"])
    else:
        settings = _read(work / "ddp_settings.json") or {}
        rows.append([ROW_NAMES[9],
                     f"{settings.get('setting', '')}, {len(ddp['iteration_s'])} iterations, world size {ddp['world_size']}",
                     f"{_fmt(ddp['median_images_per_s'])} images/s ({_fmt(ddp['median_iteration_s'] * 1e3)} ms/iteration)",
                     _fmt(ddp.get("peak_memory_mib"), 0)])  # fmt: skip
    return rows, ok


def table(work: Path, out: Path | None, header: Sequence[str], results: Path | None = None) -> int:
    """Print the table (and write it to ``out``); ``results``: every step's JSON in one file. Exit 1 if a step failed."""
    rows, ok = table_rows(work)
    lines = [*header, ""] if header else []
    lines += ["| benchmark | setting | result | peak memory (MiB) |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out is not None:
        sys.path.insert(0, str(REPO))
        from monai_mdm.utils import atomic_write

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: f.write(text), "w")
    if results is not None:
        merged = {path.name: _read(path) for path in sorted(work.glob("*.json"))}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(merged, indent=1))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("--device", choices=("cpu", "cuda"), required=True)
    c.add_argument("--torchrun", default="torchrun", help="the torchrun program the suite will start")
    i = sub.add_parser("images")
    i.add_argument("folder", type=Path)
    i.add_argument("--count", type=int, default=16)
    i.add_argument("--size", type=int, default=320)
    t = sub.add_parser("table")
    t.add_argument("work", type=Path)
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--results", type=Path, default=None, help="write every step's JSON into this one file")
    t.add_argument("--header", action="append", default=[], help="a line above the table")
    args = p.parse_args(argv)
    if args.command == "check":
        return check(args.device, args.torchrun)
    if args.command == "images":
        return write_images(args.folder, args.count, args.size)
    return table(args.work, args.out, args.header, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
