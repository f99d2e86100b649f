"""Convert a released guided-diffusion checkpoint (MDM, DDPM-seg) into the file a monai_mdm bundle loads.

Usage::

    python -m monai_mdm.convert ffhq.pt --out bundle/models/pretrained.pt                # try every preset
    python -m monai_mdm.convert ffhq.pt --out bundle/models/pretrained.pt --preset ddpm_seg_ffhq
    python -m monai_mdm.convert ckpt.pt --out pretrained.pt --config model_channels=128 image_size=64 \\
        attention_resolutions=16,8 learn_sigma=true

Released checkpoints are bare state dicts: they do not say which architecture, precision or weights (raw or
EMA) they hold, and a wrong guess shows up only as poor features much later. The converter finds out what it
can from the file, prints it, checks the weights key by key and shape by shape against the presets (or the
given config) on the meta device (no memory for weights), and writes one self-describing file::

    {"network_config": guided-diffusion config, "state_dict": float32 weights, "source": path,
     "weights": "ema" | "raw", "preset": name or None}

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_mdm.networks.mdm_unet import MDMUNet, _mismatch_hints, guided_diffusion_config_to_kwargs
from monai_mdm.networks.presets import PRESETS
from monai_mdm.utils import atomic_torch_save

__all__ = ["FoundWeights", "convert_checkpoint", "find_weights", "main", "match_architecture", "parse_config"]

_UNET_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# guided-diffusion's model and diffusion flags: anything else in --config is most likely a typo
_KNOWN_CONFIG_KEYS = {
    "image_size", "num_channels", "model_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
    "num_head_channels", "attention_resolutions", "channel_mult", "dropout", "class_cond", "num_classes",
    "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_fp16", "use_new_attention_order",
    "learn_sigma", "in_channels", "out_channels", "dims", "conv_resample", "diffusion_steps", "noise_schedule",
    "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
}  # fmt: skip
_SHOWN = 20


@dataclass
class FoundWeights:
    """The UNet state dict found in a checkpoint and what is known about it."""

    state_dict: dict[str, torch.Tensor]
    kind: str  # "ema" or "raw"
    where: str  # where in the file, e.g. "the top level" or "entry 'ema'"
    kind_note: str = ""
    others: list[str] = field(default_factory=list)  # the other weight sets that were not chosen
    stripped: int = 0  # keys that lost a module. / _orig_mod. prefix
    dropped: list[str] = field(default_factory=list)  # non-tensor or bookkeeping entries

    @property
    def num_parameters(self) -> int:
        return sum(int(v.numel()) for v in self.state_dict.values())

    @property
    def dtypes(self) -> str:
        floats = {v.dtype for v in self.state_dict.values() if v.is_floating_point()}
        names = sorted(_DTYPE_NAMES.get(d, str(d)) for d in floats)
        return "+".join(names) if names else "none"


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _looks_unet(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(k, str) and _strip(k).startswith(_UNET_PREFIXES) for k in obj)


def _ema_in_name(text: str) -> bool:
    return re.search(r"(?:^|[^a-z])ema(?:[^a-z]|$)", text.lower()) is not None


def find_weights(obj: Any, prefer: str = "ema", filename: str = "") -> FoundWeights:
    """Locate the UNet weights in a loaded checkpoint: a bare state dict, or nested under entries such as
    ``ema`` / ``model`` / ``state_dict`` / ``network`` (two levels deep at most).

    Entries whose name contains "ema" count as EMA weights; a bare state dict is EMA when ``filename`` says so
    (guided-diffusion writes ``ema_<rate>_<step>.pt`` beside ``model<step>.pt``), raw otherwise.
    """
    if prefer not in ("ema", "raw"):
        raise ValueError(f"prefer must be 'ema' or 'raw', got {prefer!r}.")
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict: this is not a guided-diffusion UNet "
            "checkpoint (save the model's state_dict())."
        )
    found: list[tuple[tuple[str, ...], Mapping]] = []

    def walk(d: Mapping, path: tuple[str, ...]) -> None:
        if _looks_unet(d):
            found.append((path, d))
            return
        if len(path) < 2:
            for k, v in d.items():
                if isinstance(v, Mapping):
                    walk(v, (*path, str(k)))

    walk(obj, ())
    if not found:
        first = [str(k) for k in list(obj)[:6]]
        raise ValueError(
            "this is not a guided-diffusion UNet checkpoint: no key (at the top level or in its entries) starts "
            f"with {', '.join(_UNET_PREFIXES)} (first keys: {', '.join(first) or 'none'}). The converter reads "
            "guided-diffusion / MDM / DDPM-seg UNet weights only."
        )

    def kind_of(path: tuple[str, ...]) -> tuple[str, str]:
        if path:
            return ("ema" if any(_ema_in_name(p) for p in path) else "raw"), ""
        if _ema_in_name(Path(filename).stem):
            return "ema", "a bare state dict; its file name says EMA"
        return "raw", (
            "a bare state dict does not say whether it holds EMA weights; recorded as raw (guided-diffusion "
            "names its EMA files ema_<rate>_<step>.pt)"
        )

    labelled = [(*kind_of(path), path, d) for path, d in found]
    chosen = next((x for x in labelled if x[0] == prefer), labelled[0])
    kind, note, path, raw_sd = chosen
    if kind != prefer:
        note = (note + "; " if note else "") + f"--prefer {prefer}, but no {prefer} weights were found"
    where = "the top level" if not path else "entry " + "/".join(f"'{p}'" for p in path)
    others = [
        f"{k} weights in {'the top level' if not p else 'entry ' + '/'.join(repr(x) for x in p)}"
        for k, _, p, _ in labelled
        if p != path
    ]
    sd: dict[str, torch.Tensor] = {}
    stripped = 0
    dropped: list[str] = []
    for k, v in raw_sd.items():
        name = _strip(str(k))
        stripped += name != str(k)
        if not torch.is_tensor(v) or name == "n_averaged":  # AveragedModel's counter is no weight
            dropped.append(name)
            continue
        if name in sd:
            raise ValueError(f"key '{name}' occurs twice once the module./_orig_mod. prefixes are removed.")
        sd[name] = v
    if any(k.startswith("label_emb.") for k in sd):
        raise NotImplementedError("class-conditional guided-diffusion checkpoints (label_emb.*) are not supported.")
    return FoundWeights(sd, kind, where, note, others, stripped, dropped)


def _meta_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MDMUNet(**kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class _Match:
    name: str
    kwargs: dict[str, Any]
    missing: list[str]
    unexpected: list[str]
    shapes: list[str]
    expected: dict[str, tuple[int, ...]]

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)


def _compare(name: str, kwargs: dict[str, Any], sd: Mapping[str, torch.Tensor]) -> _Match:
    expected = _meta_shapes(kwargs)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs {name} {expected[k]}"
        for k in sd
        if k in expected and tuple(sd[k].shape) != expected[k]
    ]
    return _Match(name, dict(kwargs), missing, unexpected, shapes, expected)


def _count_output_blocks(shapes: Mapping[str, Any]) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith("output_blocks.")})


def _preset_candidates(names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each preset, plus its learn_sigma variant (twice the output channels) where it has none already."""
    out = []
    for name in names:
        kw = dict(PRESETS[name])
        out.append((name, kw))
        if kw["out_channels"] == kw["in_channels"]:
            out.append((f"{name}+learn_sigma", {**kw, "out_channels": 2 * kw["out_channels"]}))
    return out


def match_architecture(
    state_dict: Mapping[str, torch.Tensor], candidates: Sequence[tuple[str, dict[str, Any]]]
) -> list[_Match]:
    """Compare the weights with each candidate (name, MDMUNet kwargs); best (fewest differences) first."""
    return sorted((_compare(n, kw, state_dict) for n, kw in candidates), key=lambda m: m.differences)


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


def _mismatch_error(source: str, weights: FoundWeights, matches: list[_Match], what: str) -> ValueError:
    best = matches[0]
    meta_model = {k: torch.empty(s, device="meta") for k, s in best.expected.items()}
    hints = _mismatch_hints(weights.state_dict, meta_model, best.missing, best.unexpected)
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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
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
        candidates = _preset_candidates([preset])
        what = f"preset '{preset}'"
    else:
        candidates = _preset_candidates(list(PRESETS))
        what = "any preset (" + ", ".join(n for n, _ in candidates) + ")"
    matches = match_architecture(sd, candidates)
    exact = [m for m in matches if m.differences == 0]
    if not exact:
        raise _mismatch_error(str(src), weights, matches, what)
    chosen = exact[0]
    also = f" (also matches: {', '.join(m.name for m in exact[1:])})" if len(exact) > 1 else ""
    log(f"architecture: matches {chosen.name}{also}")
    kw = chosen.kwargs
    log(
        f"  model_channels={kw['model_channels']}, channel_mult={list(kw['channel_mult'])}, "
        f"num_res_blocks={kw['num_res_blocks']}, attention at downsample {list(kw['attention_downsample'])}, "
        f"out_channels={kw['out_channels']}, {_count_output_blocks(chosen.expected)} decoder blocks"
    )
    if config is None:
        log("  note: head counts cannot be read from weights; the preset's num_head_channels is assumed")

    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        log(f"  warning: {len(bad)} tensors hold NaN/inf values, e.g. {', '.join(bad[:3])}")

    with torch.device("meta"):
        network_config = MDMUNet(**chosen.kwargs).to_guided_diffusion_config(
            int(image_size) if image_size is not None else None
        )
    fp32 = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    record = {
        "network_config": network_config,
        "source": os.path.abspath(src),
        "weights": weights.kind,
        "preset": chosen.name if config is None else None,
    }
    atomic_torch_save({**record, "state_dict": fp32}, dst)
    log(f"wrote: {dst}")
    return record


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
