"""Reading and writing ``MDMUNet`` weight files: guided-diffusion configs, the weights inside a checkpoint, why
they do not fit, and the pretrained UNet the bundles load. Kept apart so that the network file is the network.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_mdm.networks.mdm_unet import MDMUNet
from monai_mdm.networks.presets import PRESETS
from monai_mdm.utils import load_torch_file

__all__ = [
    "AUTO_EMA_MAX_INIT_WEIGHT",
    "MODEL_FILE_VERSION",
    "UNET_FORMAT",
    "WEIGHT_CHOICES",
    "ArchitectureMatch",
    "FoundWeights",
    "find_weights",
    "guided_diffusion_config",
    "guided_diffusion_config_to_kwargs",
    "check_model_file",
    "load_pretrained",
    "load_pretrained_unet",
    "match_architecture",
    "mismatch_hints",
    "model_file",
    "preset_candidates",
    "unet_from_guided_diffusion",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- the model-file layout

MODEL_FILE_VERSION = 1
UNET_FORMAT = "monai_mdm.unet"  # a UNet alone: pretraining's model.pt / model_ema.pt, the converter's output


def model_file(file_format: str, network_config: Mapping[str, Any], model: Mapping[str, Any], **metadata: Any) -> dict:
    """The one layout of every model file the project writes (UNet, segmenter, supervised baseline).

    ``format`` and ``version`` say what the file is; ``network_config`` how to build the network (a
    guided-diffusion config for the UNet, a MONAI ``_target_`` config for other networks); ``model`` its
    weights, under the key MONAI bundles and MONAI Label read from ``models/model.pt``; ``metadata`` what
    produced it (e.g. the pretraining record, the converter's source), as top-level entries.
    """
    reserved = {"format", "version"} & set(metadata)  # network_config and model are parameters
    if reserved:
        raise ValueError(f"model-file metadata cannot be named {sorted(reserved)}.")
    return {"format": file_format, "version": MODEL_FILE_VERSION, "network_config": dict(network_config),
            "model": model, **metadata}  # fmt: skip


def check_model_file(state: Any, source: str, formats: Sequence[str]) -> bool:
    """Whether ``state`` is a model file of one of ``formats``; refuse one written by a newer monai_mdm."""
    if not isinstance(state, Mapping) or state.get("format") not in formats:
        return False
    if int(state.get("version", 0)) > MODEL_FILE_VERSION:
        raise ValueError(
            f"{source} was written by a newer monai_mdm (model-file version {state['version']}, this one reads up "
            f"to {MODEL_FILE_VERSION}): upgrade monai_mdm to read it."
        )
    return True


def _unet_weights(state: Any) -> Mapping[str, Any] | None:
    """The UNet weights of a self-describing UNet file (``model``; ``state_dict`` in files of earlier versions)."""
    if not isinstance(state, Mapping):
        return None
    weights = state.get("model") if state.get("format") == UNET_FORMAT else state.get("state_dict")
    return weights if isinstance(weights, Mapping) else None

# ---------------------------------------------------------------------------------------- guided-diffusion configs

# guided-diffusion's default channel multipliers per image size, used when a config leaves them empty.
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _parse_channel_mult(value: Any, image_size: int | None) -> tuple:
    if value is None or (isinstance(value, str) and not value.strip()):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"channel_mult is empty and image_size={image_size!r} has no guided-diffusion default "
                f"(known sizes: {sorted(_DEFAULT_CHANNEL_MULT)}); give channel_mult explicitly."
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    items = value.split(",") if isinstance(value, str) else value
    mult = []
    for item in items:
        f = float(item)
        mult.append(int(f) if f.is_integer() else f)
    return tuple(mult)


def _parse_attention(value: Any, image_size: int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        # the command-line form lists pixel resolutions; the network needs downsample factors
        res = [int(r) for r in value.split(",") if r.strip()]
        if res and not image_size:
            raise ValueError("attention_resolutions given as a string of pixel resolutions needs image_size.")
        return tuple(int(image_size) // r for r in res)  # type: ignore[arg-type]
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def guided_diffusion_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a guided-diffusion model config (its own key names) into ``MDMUNet`` keyword arguments.

    ``attention_resolutions`` given as a list/tuple is read as downsample factors (what guided-diffusion's
    ``UNetModel`` takes); given as a string such as ``"32,16,8"`` it is read as pixel resolutions (the
    command-line form) and converted with ``image_size // res``. An empty ``channel_mult`` takes
    guided-diffusion's default for ``image_size``. ``learn_sigma`` doubles ``out_channels``. Missing keys
    take guided-diffusion's script defaults. ``use_checkpoint`` (gradient checkpointing) is kept: it changes memory,
    not the weights or the function. Diffusion-only keys (noise schedule etc.) are ignored.
    """
    cfg = dict(config)
    if cfg.get("class_cond", False) or cfg.get("num_classes") is not None:
        raise NotImplementedError("class-conditional guided-diffusion models (class_cond) are not supported.")
    if cfg.get("use_new_attention_order", False):
        raise NotImplementedError("use_new_attention_order=True is not supported (only the legacy head order).")
    num_heads = int(cfg.get("num_heads", 4))
    num_head_channels = int(cfg.get("num_head_channels", -1))
    heads_up = int(cfg.get("num_heads_upsample", -1))
    if num_head_channels == -1 and heads_up not in (-1, num_heads):
        raise NotImplementedError("num_heads_upsample different from num_heads is not supported.")
    if "model_channels" not in cfg and "num_channels" not in cfg:
        raise ValueError("the guided-diffusion config needs model_channels (or num_channels, its script name).")
    image_size = cfg.get("image_size")
    image_size = int(image_size) if image_size is not None else None
    out_channels = int(cfg.get("out_channels", 3))
    if cfg.get("learn_sigma", False):
        out_channels *= 2
    return dict(
        spatial_dims=int(cfg.get("dims", 2)),
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=out_channels,
        model_channels=int(cfg["model_channels"]) if "model_channels" in cfg else int(cfg["num_channels"]),
        channel_mult=_parse_channel_mult(cfg.get("channel_mult", ""), image_size),
        num_res_blocks=int(cfg.get("num_res_blocks", 2)),
        attention_downsample=_parse_attention(cfg.get("attention_resolutions", "16,8"), image_size),
        num_head_channels=num_head_channels,
        num_heads=num_heads,
        dropout=float(cfg.get("dropout", 0.0)),
        use_scale_shift_norm=bool(cfg.get("use_scale_shift_norm", True)),
        resblock_updown=bool(cfg.get("resblock_updown", False)),
        conv_resample=bool(cfg.get("conv_resample", True)),
        num_timesteps=int(cfg.get("diffusion_steps", 1000)),
        use_checkpoint=bool(cfg.get("use_checkpoint", False)),
    )


def guided_diffusion_config(network: MDMUNet, image_size: int | None = None) -> dict[str, Any]:
    """``network``'s settings under guided-diffusion's key names (inverse of the kwargs translation).

    ``attention_resolutions`` is written as a list of downsample factors, so no ``image_size`` is needed
    to read it back; ``image_size`` is only recorded when given.
    """
    cfg: dict[str, Any] = {}
    if image_size is not None:
        cfg["image_size"] = int(image_size)
    cfg.update(
        dims=network.spatial_dims,
        in_channels=network.in_channels,
        model_channels=network.model_channels,
        out_channels=network.out_channels,
        num_res_blocks=network.num_res_blocks,
        attention_resolutions=list(network.attention_downsample),
        channel_mult=list(network.channel_mult),
        num_head_channels=network.num_head_channels,
        num_heads=network.num_heads,
        num_heads_upsample=-1,
        use_scale_shift_norm=network.use_scale_shift_norm,
        resblock_updown=network.resblock_updown,
        conv_resample=network.conv_resample,
        dropout=network.dropout,
        learn_sigma=False,
        class_cond=False,
        diffusion_steps=network.num_timesteps,
        use_checkpoint=network.use_checkpoint,
    )
    return cfg


# ---------------------------------------------------------------------------------------- weights in a checkpoint

_UNET_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


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
    config: Mapping[str, Any] | None = None  # a "config" entry beside the wrapped weights

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
    found: list[tuple[tuple[str, ...], Mapping, Mapping | None]] = []  # (path, weights, the dict holding them)

    def walk(d: Mapping, path: tuple[str, ...], parent: Mapping | None) -> None:
        if _looks_unet(d):
            found.append((path, d, parent))
            return
        if len(path) < 2:
            for k, v in d.items():
                if isinstance(v, Mapping):
                    walk(v, (*path, str(k)), d)

    walk(obj, (), None)
    if not found:
        first = [str(k) for k in list(obj)[:6]]
        raise ValueError(
            "this is not a guided-diffusion UNet checkpoint: it does not look like a guided-diffusion UNet state "
            f"dict, as no key (at the top level or in its entries) starts with {', '.join(_UNET_PREFIXES)} (first "
            f"keys: {', '.join(first) or 'none'}). Only guided-diffusion / MDM / DDPM-seg UNet weights are read."
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

    labelled = [(*kind_of(path), path, d, parent) for path, d, parent in found]
    chosen = next((x for x in labelled if x[0] == prefer), labelled[0])
    kind, note, path, raw_sd, parent = chosen
    if kind != prefer:
        note = (note + "; " if note else "") + f"--prefer {prefer}, but no {prefer} weights were found"
    where = "the top level" if not path else "entry " + "/".join(f"'{p}'" for p in path)
    others = [
        f"{k} weights in {'the top level' if not p else 'entry ' + '/'.join(repr(x) for x in p)}"
        for k, _, p, _, _ in labelled
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
    config = parent.get("config") if parent is not None else None
    config = config if isinstance(config, Mapping) else None
    return FoundWeights(sd, kind, where, note, others, stripped, dropped, config)


# ---------------------------------------------------------------------------------------- architecture and mismatches


@dataclass
class ArchitectureMatch:
    """How a state dict differs from one candidate architecture (``MDMUNet`` kwargs)."""

    name: str
    kwargs: dict[str, Any]
    missing: list[str]
    unexpected: list[str]
    shapes: list[str]
    expected: dict[str, tuple[int, ...]]

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)


def _compare(
    name: str,
    kwargs: dict[str, Any],
    sd: Mapping[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]] | None = None,
) -> ArchitectureMatch:
    """``sd`` against the network ``kwargs`` build (its shapes taken on the meta device unless ``expected``)."""
    if expected is None:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in MDMUNet(**kwargs).state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs {name} {expected[k]}"
        for k in sd
        if k in expected and tuple(sd[k].shape) != expected[k]
    ]
    return ArchitectureMatch(name, dict(kwargs), missing, unexpected, shapes, expected)


def preset_candidates(names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
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
) -> list[ArchitectureMatch]:
    """Compare the weights with each candidate (name, MDMUNet kwargs); best (fewest differences) first."""
    return sorted((_compare(n, kw, state_dict) for n, kw in candidates), key=lambda m: m.differences)


def _short(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _block_count(keys: Sequence[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def mismatch_hints(state_dict: Mapping[str, torch.Tensor], match: ArchitectureMatch) -> list[str]:
    """Name the config settings that most probably explain why ``state_dict`` does not fit ``match``.

    Root causes are checked first (conv dimensionality, base width, block counts) because they shift every
    later key and shape; the narrower hints are only given when no root cause was found.
    """
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    want = match.expected
    mism = [k for k in have if k in want and have[k] != want[k]]
    hints: list[str] = []
    k0 = "input_blocks.0.0.weight"
    if k0 in mism and len(have[k0]) != len(want[k0]):
        return [f"convs are {len(have[k0]) - 2}D in the checkpoint, {len(want[k0]) - 2}D here: "
                "check dims / spatial_dims"]
    if "time_embed.0.weight" in mism:
        c, m = have["time_embed.0.weight"][1], want["time_embed.0.weight"][1]
        return [f"model_channels is {c} in the checkpoint, {m} here: check model_channels"]
    ci, co = _block_count(list(have), "input_blocks"), _block_count(list(have), "output_blocks")
    mi, mo = _block_count(list(want), "input_blocks"), _block_count(list(want), "output_blocks")
    if (ci, co) != (mi, mo):
        return [f"checkpoint has {ci} input_blocks / {co} output_blocks, this config builds {mi} / {mo}: "
                "check num_res_blocks / channel_mult"]

    diff = match.missing + match.unexpected
    if any(re.search(r"\.(qkv|proj_out)\.", k) for k in diff):
        hints.append(
            "attention blocks sit at other places: check attention_resolutions (a list is read as downsample "
            "factors, a string as pixel resolutions with image_size)"
        )
    if any(re.search(r"\.(op|conv)\.weight$", k) for k in diff):
        hints.append("resampling blocks differ: check resblock_updown / conv_resample")
    for k in mism:
        c, m = have[k], want[k]
        if k.startswith("out.2.") and c[0] != m[0]:
            hint = f"output conv has {c[0]} channels in the checkpoint, {m[0]} here: check out_channels / learn_sigma"
        elif k == k0 and c[1] != m[1]:
            hint = f"input conv takes {c[1]} channels in the checkpoint, {m[1]} here: check in_channels"
        elif re.search(r"emb_layers\.1\.(weight|bias)$", k) and c[0] in (2 * m[0], m[0] // 2):
            hint = "emb_layers width is off by a factor 2: check use_scale_shift_norm"
        elif re.search(r"\.(qkv|proj_out)\.", k):
            hint = (
                "attention widths differ: check model_channels / channel_mult "
                "(num_head_channels / num_heads do not change weight shapes)"
            )
        else:
            hint = "layer widths differ: check channel_mult / model_channels"
        if hint not in hints:
            hints.append(hint)
    if not hints:
        hints.append("check num_res_blocks, channel_mult and attention_resolutions")
    return hints


def unet_from_guided_diffusion(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None, strict: bool = True
) -> MDMUNet:
    """Build from a guided-diffusion config and load its weights, explaining any mismatch.

    The weights are found by :func:`find_weights` (EMA preferred): ``module.`` / ``_orig_mod.`` prefixes are
    removed, half-precision tensors cast to float32, and a ``"config"`` beside wrapped weights is used when
    ``config`` is None.

    Raises:
        ValueError: the weights do not fit the config; the message lists missing/unexpected keys and shape
            mismatches and names the setting that is probably wrong. Shape mismatches raise even when
            ``strict=False``.
        NotImplementedError: class-conditional checkpoints.
    """
    found = find_weights(state_dict)
    if config is None:
        if found.config is None:
            raise ValueError("no config given and none found next to the state dict.")
        config = found.config
    sd = found.state_dict
    kwargs = guided_diffusion_config_to_kwargs(config)
    model = MDMUNet(**kwargs)
    match = _compare("model", kwargs, sd, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if match.shapes or (strict and (match.missing or match.unexpected)):
        hints = mismatch_hints(sd, match)
        lines = ["state dict does not fit the guided-diffusion config. Probably wrong: " + "; ".join(hints) + "."]
        if match.missing:
            lines.append(f"missing keys ({len(match.missing)}): {_short(match.missing)}")
        if match.unexpected:
            lines.append(f"unexpected keys ({len(match.unexpected)}): {_short(match.unexpected)}")
        if match.shapes:
            lines.append(f"shape mismatches ({len(match.shapes)}): {_short(match.shapes, 5)}")
        raise ValueError("\n".join(lines))
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}, strict=strict)
    return model


# ---------------------------------------------------------------------------------------- the bundles' pretrained UNet


def load_pretrained_unet(path: str | os.PathLike, preset: str | None = "tiny", **overrides: Any) -> MDMUNet:
    """The pretrained UNet from ``path``: a pretraining checkpoint (EMA weights preferred), ``model_ema.pt``,
    ``model.pt``, a guided-diffusion state dict, or a file written by ``python -m monai_mdm.convert``.

    With a ``preset`` the network is built with its settings (plus ``overrides``). With ``preset=None`` the
    settings stored in the file are used: the converter's ``network_config`` (``overrides`` are applied on
    top), else a ``config`` stored next to wrapped weights. This is what few-shot bundles call; a missing file
    or weights of another architecture get an error that names the file and says what to run or set instead.
    """
    path = _existing_weights(path)
    return _unet_from_loaded(_read_weights(path), path, preset, overrides)


_PRETRAINED_FIX = (
    "Fix: set --pretrained_weights to a complete file (a pretraining run's models/model_ema.pt, a checkpoint_<N>.pt "
    "or a converted checkpoint), copying or downloading it again if it was damaged."
)


def _existing_weights(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights '{path}' not found: run bundles/mdm_pretrain first (it writes "
            "<output_dir>/models/model_ema.pt) or set --pretrained_weights to a guided-diffusion checkpoint."
        )
    return path


def _read_weights(path: Path) -> Any:
    return load_torch_file(path, "pretrained weights", _PRETRAINED_FIX, weights_only=False)


def _unet_from_loaded(state: Any, path: Path, preset: str | None, overrides: Mapping[str, Any]) -> MDMUNet:
    """``load_pretrained_unet`` after reading the file: build the network and load ``state`` into it."""
    check_model_file(state, f"pretrained weights '{path}'", [UNET_FORMAT])
    stored = state.get("network_config") if isinstance(state, Mapping) else None
    weights = _unet_weights(state)
    if preset:
        config = guided_diffusion_config(MDMUNet.from_preset(preset, **overrides))
        what = f"preset '{preset}'"
    elif isinstance(stored, Mapping) and weights is not None:
        config = stored
        if overrides:
            kwargs = {**guided_diffusion_config_to_kwargs(stored), **overrides}
            with torch.device("meta"):  # only the settings are needed, not a second copy of the weights
                config = guided_diffusion_config(MDMUNet(**kwargs))
        state = weights
        what = "the network_config stored in the file"
    else:
        config = None
        what = "the config stored in the file"
    try:
        return unet_from_guided_diffusion(state, config)
    except ValueError as e:
        if config is None and "no config given" in str(e):
            raise ValueError(
                f"pretrained weights '{path}' hold no network settings: pass a preset (e.g. preset='paper'), or "
                "convert the checkpoint with `python -m monai_mdm.convert` first."
            ) from e
        raise ValueError(
            f"pretrained weights '{path}' do not fit {what}: {e}\nFix: set --pretrained_weights to a checkpoint "
            "pretrained with this --preset, or --preset to the preset these weights were pretrained with."
        ) from e


WEIGHT_CHOICES = ("auto", "ema", "raw")
# ``weights="auto"`` takes the EMA weights once the initialisation's weight in the average is below this
AUTO_EMA_MAX_INIT_WEIGHT = 0.01
_SIBLING = {"model.pt": "model_ema.pt", "model_ema.pt": "model.pt"}
_SEGMENTER_FORMAT = "monai_mdm.segmenter"  # a trained model.pt (monai_mdm.inferers.MDMSegmenter), whose UNet is read


def _weight_sets(path: Path, state: Any) -> tuple[dict[str, tuple[Path, Any]], Mapping[str, Any] | None]:
    """The weight sets ``path`` offers ({"ema"/"raw"/"given": (file, loaded state)}) and its pretraining record.

    A pretraining checkpoint holds both sets; a self-describing ``model.pt`` / ``model_ema.pt`` holds one and
    names it, and the other is the file beside it (read only if present and recorded as the other set); a file
    from ``python -m monai_mdm.convert`` holds the one set it names; anything else (a guided-diffusion state
    dict, a model file written before records existed) is one set of unknown kind.
    """
    if not isinstance(state, Mapping):
        return {"given": (path, state)}, None
    record = state.get("pretraining") if isinstance(state.get("pretraining"), Mapping) else None
    if state.get("format") == _SEGMENTER_FORMAT:
        return {_segmenter_kind(record): (path, _segmenter_unet(state, path))}, record
    if isinstance(state.get("network"), Mapping) and isinstance(state.get("ema"), Mapping):
        return {"raw": (path, state["network"]), "ema": (path, state["ema"])}, record
    if record is None:
        converted = state.get("weights") in ("ema", "raw") and _unet_weights(state) is not None
        return {state["weights"] if converted else "given": (path, state)}, None
    kind = record.get("weights")
    if kind not in ("ema", "raw"):
        return {"given": (path, state)}, record
    sets = {kind: (path, state)}
    sibling = path.parent / _SIBLING.get(path.name, "")
    if path.name in _SIBLING and sibling.is_file():
        try:  # memory-mapped: only its record is read unless its weights are chosen
            other = torch.load(sibling, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not in torch's zip format, or damaged: read it plainly, with a clear error
            other = _read_weights(sibling)
        other_record = other.get("pretraining") if isinstance(other, Mapping) else None
        if isinstance(other_record, Mapping) and other_record.get("weights") not in (None, kind):
            sets[other_record["weights"]] = (sibling, other)
    return sets, record


def _segmenter_kind(record: Mapping[str, Any] | None) -> str:
    kind = record.get("weights") if record is not None else None
    return kind if kind in ("ema", "raw") else "given"


def _segmenter_unet(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The UNet of a trained segmenter's ``model.pt`` (MONAI Label retrains the head of the model it serves):
    its ``extractor.network.`` weights and the network config stored beside them."""
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"pretrained weights '{path}' are a segmentation model saved without its UNet (include_network=False): "
            "point --pretrained_weights at the pretraining run's model_ema.pt instead."
        )
    if (state.get("features") or {}).get("finetuned"):
        logger.warning(f"'{path}' holds a fine-tuned UNet: its features are the fine-tuned ones, not the pretrained.")
    prefix = "extractor.network."
    unet = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return {"state_dict": unet, "network_config": state.get("network_config")}


def _auto_choice(record: Mapping[str, Any] | None, sets: Mapping[str, Any]) -> tuple[str, str]:
    ema = record.get("ema") if record is not None else None
    if not isinstance(ema, Mapping) or "init_weight" not in ema:
        key = "ema" if "ema" in sets else next(iter(sets))
        return key, "the file records no EMA state, so its weights are used as before"
    init, updates = float(ema["init_weight"]), int(ema.get("updates", 0))
    limit = f"{AUTO_EMA_MAX_INIT_WEIGHT:.0%}"
    if init < AUTO_EMA_MAX_INIT_WEIGHT:
        want, why = "ema", f"the EMA has left the initialisation (weight {init:.2g} < {limit} after {updates} updates)"
    else:
        want, why = "raw", f"the EMA is still {init:.1%} the initialisation after {updates} updates (EMA below {limit})"
    if want not in sets:
        have = next(iter(sets))
        return have, f"{why}, but only the {have} weights are available"
    return want, why


def load_pretrained(
    pretrained_weights: str | os.PathLike,
    preset: str | None = "tiny",
    weights: str = "auto",
    seed: int = 0,
    **overrides: Any,
) -> MDMUNet:
    """The few-shot bundles' UNet: ``load_pretrained_unet`` plus the choice between EMA and raw weights.

    ``pretrained_weights`` is a pretraining run's ``model.pt`` or ``model_ema.pt`` (the other set is taken
    from the file beside it when needed), a ``checkpoint_<N>.pt`` (holds both), a converted or guided-diffusion
    file (one set, used as given), a trained few-shot ``model.pt`` (its UNet, as MONAI Label retrains the head of
    the model it serves), or ``"random"``: the ``preset`` network with random weights seeded by
    ``seed``, the control that shows what pretraining adds.

    ``weights``: ``"ema"`` or ``"raw"`` picks that set; ``"auto"`` takes the EMA only when its initialisation
    still weighs less than ``AUTO_EMA_MAX_INIT_WEIGHT`` (1 %) in the average, as recorded by pretraining;
    otherwise the raw weights (files without a record are used as before). The choice is logged once and kept
    as the returned network's ``pretraining`` dict, which ``MDMSegmenter`` saves with the model; it includes the
    pretraining objective's record (``"objective"``) when the file has one, from which ``MDMFeatureExtractor``
    reads features the way that objective defines (files without it were pretrained by MDM).

    Raises:
        ValueError: an unknown ``weights``; ``"random"`` with an explicit ``weights``; ``weights="ema"`` or
            ``"raw"`` for a file that lacks that set; a recorded objective whose features cannot be read.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}.")
    if str(pretrained_weights) == "random":
        if weights != "auto":
            raise ValueError(
                f"--pretrained_weights random builds an untrained network, so --weights {weights} has nothing to "
                "pick: leave --weights at auto (its default) or point --pretrained_weights at a pretraining run."
            )
        if not preset:
            raise ValueError(
                "--pretrained_weights random needs --preset, the network to build (e.g. tiny, or the preset of the "
                "pretrained weights it stands in for): --preset is null, which reads the settings from the file."
            )
        with torch.random.fork_rng(devices=[]):  # seeded, and the rest of the run draws the same numbers
            torch.manual_seed(int(seed))
            network = MDMUNet.from_preset(preset, **overrides)
        reason = f"random initialisation (seed {int(seed)}): the control without pretraining"
        info: dict[str, Any] = {"source": "random", "weights": "random", "requested": weights, "reason": reason}
    else:
        path = _existing_weights(pretrained_weights)
        sets, record = _weight_sets(path, _read_weights(path))
        if weights == "auto":
            chosen, reason = _auto_choice(record, sets)
        elif weights in sets or ("given" in sets and weights == "raw"):
            chosen = weights if weights in sets else "given"
            reason = "asked for by --weights" if chosen != "given" else "asked for raw; the file holds one set"
        else:
            other = "raw" if weights == "ema" else "ema"
            has = "one set that does not say whether it is an EMA" if "given" in sets else ", ".join(sorted(sets))
            raise ValueError(
                f"--weights {weights}: '{path}' holds no {weights} weights (it has: {has}; "
                "the sets are named by the pretraining bundle, which writes model.pt and model_ema.pt side by "
                f"side). Use --weights auto or {other}, or point --pretrained_weights at a file that has them "
                "(that run's model.pt / model_ema.pt, or a checkpoint_<N>.pt)."
            )
        source, state = sets[chosen]
        network = _unet_from_loaded(state, source, preset, overrides)
        chosen = "as given" if chosen == "given" else chosen
        info = {"source": str(source), "weights": chosen, "requested": weights, "reason": reason}
        if record is not None and "objective" in record:
            from monai_mdm.transforms.objectives import objective_from_record

            # refused here, before anything is written, if features cannot be read the way it defines
            objective_from_record(record["objective"], network.num_timesteps, f"--pretrained_weights '{path}'")
            info["objective"] = record["objective"]
        if record is not None:
            info["iteration"] = record.get("iteration")
            ema = record.get("ema")
            if isinstance(ema, Mapping):
                info["ema_init_weight"] = ema.get("init_weight")
                info["ema_updates"] = ema.get("updates")
    logger.info(f"pretrained UNet: '{info['source']}', {info['weights']} weights (--weights {weights}): {reason}.")
    network.pretraining = info
    return network
