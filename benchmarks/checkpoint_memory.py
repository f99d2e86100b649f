#!/usr/bin/env python
"""Estimated training memory of MDMUNet with and without gradient checkpointing, measured small on the CPU.

What a training step keeps is counted, not timed: the forward pass runs on the CPU at ``--measure-sizes`` (batch
1, under autocast for bf16/fp16) while ``torch.autograd.graph.saved_tensors_hooks`` records every tensor kept for
the backward pass (unique storages, the parameters themselves left out). With checkpointing the hooks see the
blocks' inputs (which checkpointing keeps) and what runs outside the UNet blocks; on top comes the largest block's
own activations, which the backward pass recomputes one block at a time. Each figure is fitted as
``constant + per-pixel x pixels`` over the measured sizes (the constant: low-precision copies of the weights,
which do not grow with the image) and extrapolated to ``--image-size`` and each ``--batch``. Weights, gradients,
the two AdamW moments and the EMA copy are ``5 x parameters x 4 B``.

An estimate: the allocator's cache and fragmentation, the gradients of the activations while the backward pass
runs, cuDNN workspaces and the CUDA context are not in it; on a GPU ``pretrain_throughput.py`` measures the peak
(``--gradient-checkpointing``).

    python benchmarks/checkpoint_memory.py --preset paper --image-size 256 --batch 32 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

try:  # run from a checkout without installing the package
    import monai_mdm  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import monai_mdm.networks.mdm_unet as mdm_unet  # noqa: E402
from monai_mdm.networks.mdm_unet import MDMUNet  # noqa: E402

GIB = 2**30
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def saved_bytes(preset: str, size: int, precision: str, checkpointing: bool) -> dict[str, int]:
    """Bytes one forward pass of a (1, C, size, size) batch keeps for the backward pass, by kind."""
    torch.manual_seed(0)
    net = MDMUNet.from_preset(preset, use_checkpoint=checkpointing).train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes, outside checkpointed blocks (or everything without)
    held: dict[int, int] = {}  # the blocks' inputs, which checkpointing keeps (also among ``saved``)
    per_block: list[dict[int, int]] = []  # without checkpointing: what each block itself keeps

    def record(into: dict[int, int], tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            into[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record(saved, tensor)
        if per_block:
            record(per_block[-1], tensor)
        return tensor

    plain_block, plain_checkpoint = mdm_unet._block_forward, mdm_unet.checkpoint

    def block_forward(*args):
        per_block.append({})
        return plain_block(*args)

    def checkpoint(fn, *args, **kwargs):
        for a in args:
            if torch.is_tensor(a):
                record(held, a)
        return plain_checkpoint(fn, *args, **kwargs)

    x = torch.rand(1, net.in_channels, *[size] * net.spatial_dims) * 2 - 1
    autocast = torch.autocast("cpu", dtype=AMP[precision]) if AMP[precision] else contextlib.nullcontext()
    mdm_unet.checkpoint = checkpoint
    if not checkpointing:
        mdm_unet._block_forward = block_forward
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = net(x, torch.tensor([500]))
    finally:
        mdm_unet._block_forward, mdm_unet.checkpoint = plain_block, plain_checkpoint
    del out
    return {
        "saved": sum(saved.values()),
        "held": sum(held.values()),
        "blocks": [sum(b.values()) for b in per_block],  # in the order they ran, the same at every size
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def extrapolate(values: Sequence[float], pixels: Sequence[int], target_pixels: int, batch: int) -> float:
    """``constant + per-pixel x pixels`` through the measured points (least squares), at ``batch`` images."""
    n = len(values)
    mean_p, mean_v = sum(pixels) / n, sum(values) / n
    var = sum((p - mean_p) ** 2 for p in pixels)
    slope = sum((p - mean_p) * (v - mean_v) for p, v in zip(pixels, values)) / var
    constant = max(mean_v - slope * mean_p, 0.0)
    return constant + slope * target_pixels * batch


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--image-size", type=int, default=256, help="the training crop the estimate is for")
    p.add_argument("--batch", type=int, nargs="+", default=[32], help="images per forward/backward pass")
    p.add_argument("--precision", choices=sorted(AMP), default="bf16")
    p.add_argument("--measure-sizes", type=int, nargs="+", default=[32, 64], help="crops measured on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if len(set(args.measure_sizes)) < 2:
        p.error("--measure-sizes needs at least two different sizes to separate constant and per-pixel bytes.")
    if args.threads:
        torch.set_num_threads(args.threads)
    plain = [saved_bytes(args.preset, s, args.precision, False) for s in args.measure_sizes]
    ckpt = [saved_bytes(args.preset, s, args.precision, True) for s in args.measure_sizes]
    spatial = 3 if args.preset.endswith("3d") else 2
    pixels = [s**spatial for s in args.measure_sizes]
    params = plain[0]["parameters"]
    static = 5 * params * 4
    print(
        f"MDMUNet {args.preset!r} ({params / 1e6:.1f} M parameters) at {args.image_size} px, {args.precision}: "
        f"measured at {args.measure_sizes} px on the CPU and extrapolated (an estimate); GiB"
    )
    columns = ("batch", "static", "kept_plain", "kept_ckpt", "inputs", "block", "peak_plain", "peak_ckpt")
    print("  ".join(f"{c:>10}" for c in columns))
    for batch in args.batch:

        def fit(rows: list[dict[str, int]], key: str) -> float:
            return extrapolate([r[key] for r in rows], pixels, args.image_size**spatial, batch) / GIB

        kept_plain, kept_ckpt, inputs = fit(plain, "saved"), fit(ckpt, "saved"), fit(ckpt, "held")
        blocks = [[r["blocks"][i] for r in plain] for i in range(len(plain[0]["blocks"]))]
        block = max(extrapolate(b, pixels, args.image_size**spatial, batch) for b in blocks) / GIB
        values = (static / GIB, kept_plain, kept_ckpt, inputs, block, static / GIB + kept_plain,
                  static / GIB + kept_ckpt + block)  # fmt: skip
        print(f"{batch:>10}  " + "  ".join(f"{v:>10.2f}" for v in values))
    print(
        "static = weights + gradients + AdamW moments + EMA (5 x parameters x 4 B); kept = activations kept for the "
        "backward pass without (plain) and with checkpointing (ckpt; of which the blocks' inputs); block = the "
        "largest block recomputed in the backward pass; peak = static + kept (+ block)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
