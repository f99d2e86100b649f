"""The guided-diffusion ("ADM") UNet used by MDM, for 2D and 3D, loadable from released checkpoints.

Parameter names follow guided-diffusion exactly (``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``) so that MDM / DDPM-seg checkpoints load with ``strict=True`` and decoder
blocks keep the indices that feature-extraction recipes refer to (e.g. blocks 8..12).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

__all__ = ["MDMUNet", "timestep_embedding", "guided_diffusion_config_to_kwargs", "load_pretrained"]

logger = logging.getLogger(__name__)

# guided-diffusion's default channel multipliers per image size, used when a config leaves them empty.
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``cat([cos, sin])`` (cos first, as the released weights expect).

    Args:
        timesteps: (B,) tensor of (possibly fractional) timesteps.
        dim: embedding width; an odd width gets a zero last column.
        max_period: controls the lowest frequency.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under fp16/bf16) and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise so that each residual branch starts as the identity (as in ADM)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _upsample(x: torch.Tensor) -> torch.Tensor:
    # isotropic x2 in every spatial dim, also in 3D (guided-diffusion keeps depth in 3D; we do not)
    return F.interpolate(x, scale_factor=2, mode="nearest")


class TimestepBlock(nn.Module):
    """Marker for blocks whose ``forward`` takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the embedding to the blocks that need it; keeps indices ``N.M``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve every spatial dim with a stride-2 conv (``op``) or, without ``use_conv``, average pooling."""

    def __init__(self, spatial_dims: int, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = Conv[Conv.CONV, spatial_dims](channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count.")
            self.op = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 ``conv``."""

    def __init__(self, spatial_dims: int, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv[Conv.CONV, spatial_dims](channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("upsampling without a conv cannot change the channel count.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _upsample(x)
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """ADM residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``).

    Args:
        spatial_dims: 2 or 3.
        channels: input channels.
        emb_channels: width of the timestep embedding.
        dropout: dropout before the last (zero-initialised) conv.
        out_channels: output channels (default: ``channels``); a 1x1 conv skip is used when they differ.
        use_scale_shift_norm: FiLM-like ``norm(h) * (1 + scale) + shift`` instead of adding the embedding.
        up: parameter-free nearest x2 upsampling of both paths.
        down: parameter-free x2 average pooling of both paths.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        conv = Conv[Conv.CONV, spatial_dims]
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), conv(channels, out_channels, 3, padding=1))
        self.resample: Any = None
        if up:
            self.resample = _upsample
        elif down:
            self.resample = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(conv(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else conv(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.resample is not None:
            # resample after norm+SiLU and before the conv, as the released weights were trained
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.resample(h))
            x = self.resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with guided-diffusion's "legacy" head order.

    The legacy order reshapes ``qkv`` to ``(B * heads, 3 * head_ch, L)`` before splitting into q, k, v;
    released checkpoints depend on it, so it must not be replaced by the q/k/v-first order.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels == -1:
            if num_heads < 1:
                raise ValueError("set num_head_channels or a positive num_heads.")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}.")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by {self.num_heads} heads.")
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        head_ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * head_ch, length).split(head_ch, dim=1)
        # (B*heads, ch, L) -> (B*heads, L, ch); SDPA's default scale is 1/sqrt(head_ch)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


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
    take guided-diffusion's script defaults. Diffusion-only keys (noise schedule etc.) are ignored.
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
    )


def _unwrap_state_dict(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
    """Return (state_dict, embedded config or None), looking one level into common checkpoint wrappers."""

    def looks_raw(d: Mapping[str, Any]) -> bool:
        return any(str(k).startswith(("time_embed.", "module.time_embed.")) for k in d)

    if looks_raw(obj):
        return obj, None
    for key in ("ema", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and looks_raw(inner):
            cfg = obj.get("config")
            return inner, cfg if isinstance(cfg, Mapping) else None
    return obj, None


def _short(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _block_count(keys: Sequence[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _mismatch_hints(
    ckpt: Mapping[str, torch.Tensor],
    model_sd: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
) -> list[str]:
    """Name the config settings that most probably explain a state-dict mismatch.

    Root causes are checked first (conv dimensionality, base width, block counts) because they shift every
    later key and shape; the narrower hints are only given when no root cause was found.
    """

    def shape(d: Mapping[str, torch.Tensor], k: str) -> tuple[int, ...]:
        return tuple(d[k].shape)

    mism = [k for k in ckpt if k in model_sd and shape(ckpt, k) != shape(model_sd, k)]
    hints: list[str] = []
    k0 = "input_blocks.0.0.weight"
    if k0 in mism and len(shape(ckpt, k0)) != len(shape(model_sd, k0)):
        return [f"convs are {len(shape(ckpt, k0)) - 2}D in the checkpoint, {len(shape(model_sd, k0)) - 2}D here: "
                "check dims / spatial_dims"]
    if "time_embed.0.weight" in mism:
        c, m = shape(ckpt, "time_embed.0.weight")[1], shape(model_sd, "time_embed.0.weight")[1]
        return [f"model_channels is {c} in the checkpoint, {m} here: check model_channels"]
    ci, co = _block_count(list(ckpt), "input_blocks"), _block_count(list(ckpt), "output_blocks")
    mi, mo = _block_count(list(model_sd), "input_blocks"), _block_count(list(model_sd), "output_blocks")
    if (ci, co) != (mi, mo):
        return [f"checkpoint has {ci} input_blocks / {co} output_blocks, this config builds {mi} / {mo}: "
                "check num_res_blocks / channel_mult"]

    diff = missing + unexpected
    if any(re.search(r"\.(qkv|proj_out)\.", k) for k in diff):
        hints.append(
            "attention blocks sit at other places: check attention_resolutions (a list is read as downsample "
            "factors, a string as pixel resolutions with image_size)"
        )
    if any(re.search(r"\.(op|conv)\.weight$", k) for k in diff):
        hints.append("resampling blocks differ: check resblock_updown / conv_resample")
    for k in mism:
        c, m = shape(ckpt, k), shape(model_sd, k)
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


class MDMUNet(nn.Module):
    """The guided-diffusion ("ADM") UNet that MDM pretrains; predicts x0 from a masked image and t.

    Parameter names match guided-diffusion state dicts, so released MDM / DDPM-seg checkpoints load strictly
    (see :meth:`from_guided_diffusion`), and ``output_blocks[i]`` are the decoder blocks that
    feature-extraction recipes index (blocks 8..12 of the ``paper`` preset: 1728 channels).

    In 3D every spatial dim is up/downsampled (isotropic); guided-diffusion's 3D variant keeps the first
    (depth) dim, so 3D guided-diffusion checkpoints load but do not compute the same function.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: prediction channels.
        model_channels: base width; the timestep embedding is ``4 * model_channels`` wide.
        channel_mult: width multiplier per level; ``len - 1`` x2 downsamplings.
        num_res_blocks: residual blocks per encoder level (decoder levels get one more).
        attention_downsample: downsample factors (1, 2, 4, ...) at which self-attention is used.
        num_head_channels: channels per attention head; ``-1`` to use ``num_heads`` instead.
        num_heads: fixed head count, used only when ``num_head_channels == -1``.
        dropout: dropout inside the residual blocks.
        use_scale_shift_norm: condition by ``norm(h) * (1 + scale) + shift``.
        resblock_updown: resample with residual blocks instead of ``Downsample``/``Upsample``.
        conv_resample: use convs in ``Downsample``/``Upsample`` (only without ``resblock_updown``).
        num_timesteps: timestep range ``0..num_timesteps-1`` the model is trained for (metadata only).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 192,
        channel_mult: Sequence[float] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_downsample: Sequence[int] = (8, 16, 32),
        num_head_channels: int = 64,
        num_heads: int = -1,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        conv_resample: bool = True,
        num_timesteps: int = 1000,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_head_channels == -1 and num_heads < 1:
            raise ValueError("set num_head_channels, or num_head_channels=-1 with a positive num_heads.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_downsample = tuple(sorted(int(a) for a in attention_downsample))
        self.num_head_channels = num_head_channels
        self.num_heads = num_heads
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.conv_resample = conv_resample
        self.num_timesteps = num_timesteps

        conv = Conv[Conv.CONV, spatial_dims]
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(spatial_dims, ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, up=up, down=down)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels)

        ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_downsample:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(spatial_dims, ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        self.decoder_channels: list[int] = []
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_downsample:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    up = res(ch, ch, up=True) if resblock_updown else Upsample(spatial_dims, ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.decoder_channels.append(ch)

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(conv(ch, out_channels, 3, padding=1)))

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def _encode(
        self, x: torch.Tensor, timesteps: torch.Tensor | int | float
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Check the input, embed the timesteps, run the encoder and the middle block: (h, emb, skips)."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (B, C, *spatial), got shape {tuple(x.shape)}.")
        div = self.size_divisor
        if any(s % div for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {div} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.channel_mult})."
            )
        # a tensor is used as it is (not through as_tensor, which a trace would freeze to the traced values)
        t = timesteps.to(x.device) if torch.is_tensor(timesteps) else torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(t.shape)}.")
        lin = self.time_embed[0]
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(lin.weight.dtype))

        h = x.to(lin.weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), emb, skips

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int | float) -> torch.Tensor:
        """Predict from ``x`` (B, C, *spatial) at ``timesteps`` (B,) (an int/0-d tensor is broadcast)."""
        h, emb, skips = self._encode(x, timesteps)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    def decoder_features(
        self, x: torch.Tensor, timesteps: torch.Tensor | int | float, blocks: Sequence[int]
    ) -> list[torch.Tensor]:
        """Outputs of ``output_blocks[i]`` for each i in ``blocks`` (in that order), as :meth:`forward` computes them.

        The decoder stops after the deepest requested block, so later blocks and ``out`` are never run. Plain
        code (no hooks), so ``torch.jit.trace`` records exactly the blocks that are needed.
        """
        num = len(self.output_blocks)
        bad = [b for b in blocks if not 0 <= int(b) < num]
        if not blocks or bad:
            raise ValueError(f"blocks {list(blocks)} must be non-empty indices in 0..{num - 1} (output blocks).")
        wanted = {int(b) for b in blocks}
        outputs: dict[int, torch.Tensor] = {}
        h, emb, skips = self._encode(x, timesteps)
        for index in range(max(wanted) + 1):
            h = self.output_blocks[index](torch.cat([h, skips.pop()], dim=1), emb)
            if index in wanted:
                outputs[index] = h
        return [outputs[int(b)] for b in blocks]

    # ---------------------------------------------------------------- constructors / interchange

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MDMUNet:
        """Build a named preset from :data:`monai_mdm.networks.presets.PRESETS`, with keyword overrides."""
        from monai_mdm.networks.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown MDMUNet preset {name!r}; valid names: {', '.join(sorted(PRESETS))}.")
        return cls(**{**PRESETS[name], **overrides})

    def to_guided_diffusion_config(self, image_size: int | None = None) -> dict[str, Any]:
        """This network's settings under guided-diffusion's key names (inverse of the kwargs translation).

        ``attention_resolutions`` is written as a list of downsample factors, so no ``image_size`` is needed
        to read it back; ``image_size`` is only recorded when given.
        """
        cfg: dict[str, Any] = {}
        if image_size is not None:
            cfg["image_size"] = int(image_size)
        cfg.update(
            dims=self.spatial_dims,
            in_channels=self.in_channels,
            model_channels=self.model_channels,
            out_channels=self.out_channels,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=list(self.attention_downsample),
            channel_mult=list(self.channel_mult),
            num_head_channels=self.num_head_channels,
            num_heads=self.num_heads,
            num_heads_upsample=-1,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            conv_resample=self.conv_resample,
            dropout=self.dropout,
            learn_sigma=False,
            class_cond=False,
            diffusion_steps=self.num_timesteps,
        )
        return cfg

    @classmethod
    def from_guided_diffusion(
        cls, state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None, strict: bool = True
    ) -> MDMUNet:
        """Build from a guided-diffusion config and load its weights, explaining any mismatch.

        Accepts ``module.``-prefixed keys (DataParallel), half-precision tensors (cast to float32) and a dict
        wrapping the weights under ``"ema"``, ``"state_dict"`` or ``"model"`` (tried in that order; a wrapped
        ``"config"`` is used when ``config`` is None).

        Raises:
            ValueError: the weights do not fit the config; the message lists missing/unexpected keys and shape
                mismatches and names the setting that is probably wrong. Shape mismatches raise even when
                ``strict=False``.
            NotImplementedError: class-conditional checkpoints.
        """
        sd, wrapped_cfg = _unwrap_state_dict(state_dict)
        if config is None:
            if wrapped_cfg is None:
                raise ValueError("no config given and none found next to the state dict.")
            config = wrapped_cfg
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        if not any(k.startswith(("time_embed.", "input_blocks.", "output_blocks.")) for k in sd):
            raise ValueError(
                "this does not look like a guided-diffusion UNet state dict: none of its keys start with "
                f"time_embed./input_blocks./output_blocks. (first keys: {_short([str(k) for k in sd], 5)})."
            )
        if any(k.startswith("label_emb.") for k in sd):
            raise NotImplementedError("class-conditional guided-diffusion checkpoints (label_emb.*) are not supported.")

        model = cls(**guided_diffusion_config_to_kwargs(config))
        model_sd = model.state_dict()
        missing = [k for k in model_sd if k not in sd]
        unexpected = [k for k in sd if k not in model_sd]
        shapes = [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
            for k in sd
            if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)
        ]
        if shapes or (strict and (missing or unexpected)):
            hints = _mismatch_hints(sd, model_sd, missing, unexpected)
            lines = ["state dict does not fit the guided-diffusion config. Probably wrong: " + "; ".join(hints) + "."]
            if missing:
                lines.append(f"missing keys ({len(missing)}): {_short(missing)}")
            if unexpected:
                lines.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
            if shapes:
                lines.append(f"shape mismatches ({len(shapes)}): {_short(shapes, 5)}")
            raise ValueError("\n".join(lines))
        dtype = next(model.parameters()).dtype
        sd = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}
        model.load_state_dict(sd, strict=strict)
        return model


def load_pretrained_unet(path: str | os.PathLike, preset: str | None = "tiny", **overrides: Any) -> MDMUNet:
    """The pretrained UNet from ``path``: a pretraining checkpoint (EMA weights preferred), ``model_ema.pt``,
    ``model.pt``, a guided-diffusion state dict, or a file written by ``python -m monai_mdm.convert``.

    With a ``preset`` the network is built with its settings (plus ``overrides``). With ``preset=None`` the
    settings stored in the file are used: the converter's ``network_config`` (``overrides`` are applied on
    top), else a ``config`` stored next to wrapped weights. This is what few-shot bundles call; a missing file
    or weights of another architecture get an error that names the file and says what to run or set instead.
    """
    path = _existing_weights(path)
    return _unet_from_loaded(torch.load(path, map_location="cpu", weights_only=False), path, preset, overrides)


def _existing_weights(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights '{path}' not found: run bundles/mdm_pretrain first (it writes "
            "<output_dir>/models/model_ema.pt) or set --pretrained_weights to a guided-diffusion checkpoint."
        )
    return path


def _unet_from_loaded(state: Any, path: Path, preset: str | None, overrides: Mapping[str, Any]) -> MDMUNet:
    """``load_pretrained_unet`` after reading the file: build the network and load ``state`` into it."""
    stored = state.get("network_config") if isinstance(state, Mapping) else None
    if preset:
        config = MDMUNet.from_preset(preset, **overrides).to_guided_diffusion_config()
        what = f"preset '{preset}'"
    elif isinstance(stored, Mapping) and isinstance(state.get("state_dict"), Mapping):
        config = stored
        if overrides:
            kwargs = {**guided_diffusion_config_to_kwargs(stored), **overrides}
            with torch.device("meta"):  # only the settings are needed, not a second copy of the weights
                config = MDMUNet(**kwargs).to_guided_diffusion_config()
        state = state["state_dict"]
        what = "the network_config stored in the file"
    else:
        config = None
        what = "the config stored in the file"
    try:
        return MDMUNet.from_guided_diffusion(state, config)
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
    if isinstance(state.get("network"), Mapping) and isinstance(state.get("ema"), Mapping):
        return {"raw": (path, state["network"]), "ema": (path, state["ema"])}, record
    if record is None:
        converted = state.get("weights") in ("ema", "raw") and isinstance(state.get("state_dict"), Mapping)
        return {state["weights"] if converted else "given": (path, state)}, None
    kind = record.get("weights")
    if kind not in ("ema", "raw"):
        return {"given": (path, state)}, record
    sets = {kind: (path, state)}
    sibling = path.parent / _SIBLING.get(path.name, "")
    if path.name in _SIBLING and sibling.is_file():
        try:  # memory-mapped: only its record is read unless its weights are chosen
            other = torch.load(sibling, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not in torch's zip format
            other = torch.load(sibling, map_location="cpu", weights_only=False)
        other_record = other.get("pretraining") if isinstance(other, Mapping) else None
        if isinstance(other_record, Mapping) and other_record.get("weights") not in (None, kind):
            sets[other_record["weights"]] = (sibling, other)
    return sets, record


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
    file (one set, used as given), or ``"random"``: the ``preset`` network with random weights seeded by
    ``seed``, the control that shows what pretraining adds.

    ``weights``: ``"ema"`` or ``"raw"`` picks that set; ``"auto"`` takes the EMA only when its initialisation
    still weighs less than ``AUTO_EMA_MAX_INIT_WEIGHT`` (1 %) in the average, as recorded by pretraining;
    otherwise the raw weights (files without a record are used as before). The choice is logged once and kept
    as the returned network's ``pretraining`` dict, which ``MDMSegmenter`` saves with the model.

    Raises:
        ValueError: an unknown ``weights``; ``"random"`` with an explicit ``weights``; ``weights="ema"`` or
            ``"raw"`` for a file that lacks that set.
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
        sets, record = _weight_sets(path, torch.load(path, map_location="cpu", weights_only=False))
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
        if record is not None:
            info["iteration"] = record.get("iteration")
            ema = record.get("ema")
            if isinstance(ema, Mapping):
                info["ema_init_weight"] = ema.get("init_weight")
                info["ema_updates"] = ema.get("updates")
    logger.info(f"pretrained UNet: '{info['source']}', {info['weights']} weights (--weights {weights}): {reason}.")
    network.pretraining = info
    return network
