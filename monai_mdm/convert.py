"""Convert a released guided-diffusion checkpoint (MDM, DDPM-seg) into the file a monai_mdm bundle loads.

Usage::

    python -m monai_mdm.convert ffhq.pt --out bundle/models/pretrained.pt                # try every preset
    python -m monai_mdm.convert ffhq.pt --out bundle/models/pretrained.pt --preset ddpm_seg_ffhq
    python -m monai_mdm.convert ckpt.pt --out pretrained.pt --config model_channels=128 image_size=64 \\
        attention_resolutions=16,8 learn_sigma=true

Released checkpoints are bare state dicts: they do not say which architecture, precision or weights (raw or
EMA) they hold, and a wrong guess shows up only as poor features much later. The converter finds out what it
can from the file, prints it, checks the weights key by key and shape by shape against the presets (or the
given config) on the meta device (no memory for weights), and writes the project's model file
(``networks.interchange.model_file``)::

    {"format": "monai_mdm.unet", "version": 1, "network_config": guided-diffusion config,
     "model": float32 weights, "source": path, "weights": "ema" | "raw", "preset": name or None}

which :func:`monai_mdm.networks.load_pretrained_unet` reads with ``preset=None``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_mdm.networks.interchange import (
    UNET_FORMAT,
    ArchitectureMatch,
    FoundWeights,
    find_weights,
    guided_diffusion_config,
    guided_diffusion_config_to_kwargs,
    match_architecture,
    mismatch_hints,
    model_file,
    preset_candidates,
)
from monai_mdm.networks.mdm_unet import MDMUNet
from monai_mdm.networks.presets import PRESETS
from monai_mdm.utils import atomic_torch_save, load_torch_file

__all__ = ["convert_checkpoint", "main", "parse_config"]

# guided-diffusion's model and diffusion flags: anything else in --config is most likely a typo
_KNOWN_CONFIG_KEYS = {
    "image_size", "num_channels", "model_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
    "num_head_channels", "attention_resolutions", "channel_mult", "dropout", "class_cond", "num_classes",
    "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_fp16", "use_new_attention_order",
    "learn_sigma", "in_channels", "out_channels", "dims", "conv_resample", "diffusion_steps", "noise_schedule",
    "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
}  # fmt: skip
_SHOWN = 20


def _list(title: str, items: list[str], group: bool = True) -> str:
    """Indented listing; keys are grouped by their block (``input_blocks.4.1: norm.weight, qkv.weight, ...``)."""
    lines: list[str] = []
    if group:
        groups: dict[str, list[str]] = {}
        for k in items:
            m = re.match(r"^((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+|[^.]+)\.(.+)$", k)
            head, tail = (m.group(1), m.group(2)) if m else (k, "")
            groups.setdefault(head, []).append(tail)
        lines = [f"{h}: {', '.join(t)}" if any(t) else h for h, t in groups.items()]
    else:
        lines = list(items)
    shown = "\n".join(f"    {x}" for x in lines[:_SHOWN])
    more = f"\n    ... (+{len(lines) - _SHOWN} more)" if len(lines) > _SHOWN else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _mismatch_error(source: str, weights: FoundWeights, matches: list[ArchitectureMatch], what: str) -> ValueError:
    best = matches[0]
    hints = mismatch_hints(weights.state_dict, best)
    lines = [
        f"the weights in '{source}' ({len(weights.state_dict)} tensors, {weights.num_parameters:,} parameters) "
        f"do not match {what}.",
        f"Closest: {best.name} with {best.differences} differences; probably wrong: {'; '.join(hints)}.",
    ]
    if best.missing:
        lines.append(_list(f"keys {best.name} has but the checkpoint lacks", best.missing))
    if best.unexpected:
        lines.append(_list(f"keys in the checkpoint that {best.name} lacks", best.unexpected))
    if best.shapes:
        lines.append(_list("shape mismatches", best.shapes, group=False))
    if len(matches) > 1:
        lines.append("Others: " + ", ".join(f"{m.name} ({m.differences} differences)" for m in matches[1:]) + ".")
    lines.append(
        "Give the architecture with --config key=value ... in guided-diffusion's names, e.g. --config "
        "image_size=256 num_channels=256 channel_mult=1,1,2,2,4,4 attention_resolutions=32,16,8 "
        "num_head_channels=64 resblock_updown=true use_scale_shift_norm=true learn_sigma=true"
    )
    return ValueError("\n".join(lines))


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # e.g. "32,16,8": guided-diffusion's command-line form, parsed by the config translation


def parse_config(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> config dict. Values are JSON (``256``, ``true``, ``[2,4]``) or plain strings
    (``32,16,8``: a string ``attention_resolutions`` lists pixel resolutions and needs ``image_size``; a list
    gives downsample factors, as guided-diffusion's ``UNetModel`` takes them)."""
    cfg: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--config expects key=value pairs, got {pair!r}.")
        if key not in _KNOWN_CONFIG_KEYS:
            close = difflib.get_close_matches(key, sorted(_KNOWN_CONFIG_KEYS), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown guided-diffusion config key {key!r}.{hint}")
        cfg[key] = _parse_value(value)
    return cfg


def _load(path: Path, trust_pickle: bool) -> Any:
    fix = "Fix: give a complete guided-diffusion checkpoint (download or copy it again if it was damaged)."
    try:
        return load_torch_file(path, "checkpoint", fix, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise
        raise ValueError(
            f"'{path}' holds pickled Python objects besides tensors, which are not loaded by default ({e}). If you "
            "trust the file, rerun with --trust-pickle."
        ) from e


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    preset: str | None = None,
    config: Mapping[str, Any] | None = None,
    prefer: str = "ema",
    trust_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert ``checkpoint`` to ``out`` (see the module docstring) and return what was written, without the
    weights. ``preset`` / ``config`` (guided-diffusion names) fix the architecture; with neither every preset
    (and its learn_sigma variant) is tried.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a guided-diffusion UNet, or the weights match nothing (the message lists, for the
            closest architecture, the differing keys and shapes).
    """
    src = Path(checkpoint)
    dst = Path(out)
    if preset is not None and config is not None:
        raise ValueError("give either a preset or a config, not both.")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid names: {', '.join(PRESETS)}.")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"--out '{dst}' is the checkpoint itself; write the converted file elsewhere.")
    obj = _load(src, trust_pickle)
    weights = find_weights(obj, prefer, src.name)
    sd = weights.state_dict

    log(f"checkpoint: {src}")
    log(f"weights: {weights.kind.upper() if weights.kind == 'ema' else 'raw'} (from {weights.where})")
    if weights.kind_note:
        log(f"  note: {weights.kind_note}")
    for other in weights.others:
        log(f"  also found: {other} (not used)")
    dtypes = weights.dtypes
    log(f"precision: {dtypes}" + ("" if dtypes == "fp32" else " (written as fp32)"))
    log(f"tensors: {len(sd)}, parameters: {weights.num_parameters:,} ({weights.num_parameters / 1e6:.1f} M)")
    if weights.stripped:
        log(f"  removed module./_orig_mod. prefixes from {weights.stripped} keys")
    if weights.dropped:
        log(f"  ignored non-weight entries: {', '.join(weights.dropped[:5])}")

    image_size = None
    if config is not None:
        cfg = dict(config)
        image_size = cfg.get("image_size")
        candidates = [("the given --config", guided_diffusion_config_to_kwargs(cfg))]
        what = "the given --config"
    elif preset is not None:
        candidates = preset_candidates([preset])
        what = f"preset '{preset}'"
    else:
        candidates = preset_candidates(list(PRESETS))
        what = "any preset (" + ", ".join(n for n, _ in candidates) + ")"
    matches = match_architecture(sd, candidates)
    exact = [m for m in matches if m.differences == 0]
    if not exact:
        raise _mismatch_error(str(src), weights, matches, what)
    chosen = exact[0]
    also = f" (also matches: {', '.join(m.name for m in exact[1:])})" if len(exact) > 1 else ""
    log(f"architecture: matches {chosen.name}{also}")
    kw = chosen.kwargs
    with torch.device("meta"):  # the settings, without memory for weights
        network = MDMUNet(**kw)
    log(
        f"  model_channels={kw['model_channels']}, channel_mult={list(kw['channel_mult'])}, "
        f"num_res_blocks={kw['num_res_blocks']}, attention at downsample {list(kw['attention_downsample'])}, "
        f"out_channels={kw['out_channels']}, {len(network.output_blocks)} decoder blocks"
    )
    if config is None:
        log("  note: head counts cannot be read from weights; the preset's num_head_channels is assumed")

    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        log(f"  warning: {len(bad)} tensors hold NaN/inf values, e.g. {', '.join(bad[:3])}")

    network_config = guided_diffusion_config(network, int(image_size) if image_size is not None else None)
    fp32 = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    record = {"source": os.path.abspath(src), "weights": weights.kind, "preset": chosen.name if config is None else None}
    atomic_torch_save(model_file(UNET_FORMAT, network_config, fp32, **record), dst)
    log(f"wrote: {dst}")
    return {"network_config": network_config, **record}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m monai_mdm.convert",
        description="Convert a guided-diffusion (MDM / DDPM-seg) checkpoint into a monai_mdm pretrained-weights file.",
    )
    p.add_argument("checkpoint", help="the .pt file: a state dict, possibly wrapped (ema/model/state_dict entries)")
    p.add_argument("--out", required=True, help="where to write, e.g. <bundle>/models/pretrained.pt")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="the architecture preset (default: try every preset)")
    arch.add_argument(
        "--config",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="guided-diffusion settings, e.g. num_channels=256 image_size=256 attention_resolutions=32,16,8",
    )
    p.add_argument("--prefer", choices=("ema", "raw"), default="ema", help="which weights when both are present")
    p.add_argument("--trust-pickle", action="store_true", help="load files that hold pickled Python objects")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 error, printed to stderr)."""
    args = _build_parser().parse_args(argv)
    try:
        config = parse_config(args.config) if args.config else None
        convert_checkpoint(args.checkpoint, args.out, args.preset, config, args.prefer, args.trust_pickle)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
