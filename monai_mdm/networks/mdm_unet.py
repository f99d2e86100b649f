"""The guided-diffusion ("ADM") UNet used by MDM, for 2D and 3D, loadable from released checkpoints.

Parameter names follow guided-diffusion exactly (``time_embed``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``) so that MDM / DDPM-seg checkpoints load with ``strict=True`` and decoder
blocks keep the indices that feature-extraction recipes refer to (e.g. blocks 8..12).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MDMUNet", "timestep_embedding"]


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
        q, k, v = qkv.reshape(b, self.num_heads, 3 * head_ch, length).split(head_ch, dim=2)
        # (B, heads, ch, L) -> contiguous (B, heads, L, ch); SDPA's default scale is 1/sqrt(head_ch). PyTorch's
        # fused kernels (CPU flash attention, CUDA flash / efficient) need 4-D inputs with a unit last stride; else
        # its math path builds the L x L matrix: 268 MB per head for a 256 px window of the tiny preset, 10x slower
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


def _block_forward(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    return block(h if skip is None else torch.cat([h, skip], dim=1), emb)


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
        use_checkpoint: gradient checkpointing (guided-diffusion's flag): while gradients are recorded, keep only
            each block's inputs and recompute its activations in the backward pass, trading about one more
            forward pass for most of the activation memory (the paper preset at 256 x 256 on a 16 GB GPU).
            The function computed and its gradients are the same; without gradients (inference) it does nothing.
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
        use_checkpoint: bool = False,
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
        self.use_checkpoint = bool(use_checkpoint)

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

    def check_size(self, size: int | Sequence[int], setting: str = "image_size") -> None:
        """Refuse a crop size the network cannot take before training starts, naming the setting and the divisor."""
        div = self.size_divisor
        sizes = [size] if isinstance(size, int) else list(size)
        bad = [s for s in sizes if int(s) % div]
        if bad:
            s = int(bad[0])
            lower, upper = max(div, s // div * div), (s // div + 1) * div
            raise ValueError(
                f"--{setting} {size} is not a multiple of {div}, which this network needs (2 ** (len(channel_mult) - 1) "
                f"with channel_mult={self.channel_mult}): use e.g. {lower} or {upper}."
            )

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
            h = self._run(block, h, emb)
            skips.append(h)
        return self._run(self.middle_block, h, emb), emb, skips

    def _run(
        self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One block on ``h`` (a decoder block on ``cat([h, skip])``), checkpointed when ``use_checkpoint`` is on and
        gradients are recorded. The concatenation happens inside, so its output is recomputed rather than kept."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(_block_forward, block, h, emb, skip, use_reentrant=False)
        return _block_forward(block, h, emb, skip)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int | float) -> torch.Tensor:
        """Predict from ``x`` (B, C, *spatial) at ``timesteps`` (B,) (an int/0-d tensor is broadcast)."""
        h, emb, skips = self._encode(x, timesteps)
        for block in self.output_blocks:
            h = self._run(block, h, emb, skips.pop())
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
            h = self._run(self.output_blocks[index], h, emb, skips.pop())
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
        """See :func:`monai_mdm.networks.interchange.guided_diffusion_config`."""
        from monai_mdm.networks.interchange import guided_diffusion_config

        return guided_diffusion_config(self, image_size)

    @classmethod
    def from_guided_diffusion(
        cls, state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None, strict: bool = True
    ) -> MDMUNet:
        """See :func:`monai_mdm.networks.interchange.unet_from_guided_diffusion`."""
        from monai_mdm.networks.interchange import unet_from_guided_diffusion

        return unet_from_guided_diffusion(state_dict, config, strict)
