"""UNet denoiser over backbone feature maps: maps (x_t, t) to the DDPM noise prediction eps, nothing else.

Layout follows ADM (Dhariwal & Nichol 2021, improved-diffusion): an input conv, levels of residual blocks
with optional self-attention, stride-2 conv down / nearest + conv up between levels, encoder outputs
concatenated into the decoder, a middle block (res, attention, res) at the coarsest resolution and a
zero-initialised output conv, so the untrained model predicts eps = 0.

Any feature grid works: one that the levels cannot halve evenly (14 x 14 from 224-pixel images) is
padded at its bottom and right up to the next multiple, run, and the prediction cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps `t` [B] (DDPM/ADM frequencies) -> [B, dim], cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, 1] * [1, half] -> [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    return F.pad(embedding, (0, dim % 2))  # odd dim gets one zero column -> [B, dim]


def group_norm(channels: int, norm_groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(norm_groups, channels) groups, so any channel count is valid."""
    return nn.GroupNorm(math.gcd(norm_groups, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so the residual branch (or the output) starts as 0."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep by scale-shift after the second GroupNorm
    (ADM's `use_scale_shift_norm`: h = norm(h) * (1 + scale) + shift), 1x1 skip conv when channels change."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, norm_groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels, norm_groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels, norm_groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        # [B, 2 * C] -> 2 x [B, C, 1, 1]
        scale, shift = rearrange(self.emb_layers(emb), "b (two c) -> two b c 1 1", two=2)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)), at least in float32: [B, heads, N, d] x 2 -> row-stochastic [B, heads, N, N]."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, heads, N, N]
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the h * w positions, residual, zero-initialised output projection.

    With `return_attention=True` the probabilities are computed explicitly and returned too (for RADAR);
    otherwise the fused `F.scaled_dot_product_attention` computes the same numbers.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide the {channels} channels of an attention layer; "
                f"choose num_heads dividing model_channels * channel_mult at every attention level"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        height = x.shape[-2]
        # [B, 3 * C, h, w] -> 3 x [B, heads, h * w, C / heads]
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d", three=3, heads=self.num_heads
        )
        if return_attention:
            probs = attention_probs(q, k)
            out = probs.to(v.dtype) @ v  # [B, heads, N, N] @ [B, heads, N, d] -> [B, heads, N, d]
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        out = rearrange(out, "b heads (h w) d -> b (heads d) h w", h=height)  # -> [B, C, h, w]
        x = x + self.proj(out)
        return (x, probs) if return_attention else x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # [B, C, h, w] -> [B, C, 2h, 2w]


class EmbedSequential(nn.Sequential):
    """Runs layers in order: residual blocks get the timestep embedding, attention blocks append
    their probabilities to `attention` when it is a list."""

    def forward(self, x: Tensor, emb: Tensor, attention: list[Tensor] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock) and attention is not None:
                x, probs = layer(x, return_attention=True)
                attention.append(probs)
            else:
                x = layer(x)
        return x


def pad_to_multiple(x: Tensor, factor: int) -> Tensor:
    """x [B, C, h, w] padded at the bottom and right to [B, C, ceil(h / f) * f, ceil(w / f) * f], f = factor.

    Replicate padding: every padded position copies its nearest feature, so the pad carries no values
    of its own and the prediction is a function of the unpadded features alone. The real positions
    still see the copies (near the border through the convolutions, everywhere through attention and
    GroupNorm statistics), in training as in scoring. Replicate works for any h, w (reflection needs
    h, w larger than the pad); zeros would put a flat band, unlike any noisy x_t the network sees
    elsewhere, next to the real border positions.
    """
    return F.pad(x, (0, -x.shape[-1] % factor, 0, -x.shape[-2] % factor), mode="replicate")


def valid_attention(probs: Tensor, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """One layer's attention over a padded grid, restricted to the query and key positions that cover
    the unpadded `size` and renormalised over those keys: [B, heads, N, N] -> [B, heads, n, n].

    The layer's downsampling factor f follows from N = (H / f) * (W / f) for the padded (H, W); the
    covering positions are the top-left ceil(h / f) x ceil(w / f) block of its grid."""
    factor = math.isqrt(padded[0] * padded[1] // probs.shape[-1])
    grid = torch.arange(probs.shape[-1], device=probs.device).view(padded[0] // factor, padded[1] // factor)
    keep = grid[: -(-size[0] // factor), : -(-size[1] // factor)].flatten()  # [n] covering positions
    probs = probs[:, :, keep][..., keep]  # [B, heads, N, N] -> [B, heads, n, n]
    return probs / probs.sum(-1, keepdim=True)


class UNet(nn.Module):
    """ADM-style UNet eps_theta(x_t, t) for feature maps x [B, C, h, w] and training timesteps t [B]
    (original indices 0..T-1, long or float). Level 0 is the input resolution; each further level halves it.
    If h or w is not divisible by 2 ** (len(channel_mult) - 1), x is padded up to the next multiple
    (`pad_to_multiple`) and the prediction cropped back to h x w; otherwise nothing is added."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        if not set(attention_levels) <= set(range(len(channel_mult))):
            raise ValueError(
                f"attention_levels={tuple(attention_levels)} must be level indices in 0..{len(channel_mult) - 1} "
                f"(one level per entry of channel_mult={tuple(channel_mult)})"
            )
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        res = partial(ResBlock, emb_dim=emb_dim, dropout=dropout, norm_groups=norm_groups)
        attn = partial(AttentionBlock, num_heads=num_heads, norm_groups=norm_groups)
        level_channels = [mult * model_channels for mult in channel_mult]

        self.input_blocks, skip_channels = self._encoder(level_channels, num_res_blocks, attention_levels, res, attn)
        ch = level_channels[-1]
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = self._decoder(level_channels, num_res_blocks, attention_levels, skip_channels, res, attn)
        self.out = nn.Sequential(
            group_norm(level_channels[0], norm_groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(level_channels[0], in_channels, 3, padding=1)),
        )

    def _encoder(
        self,
        level_channels: list[int],
        num_res_blocks: int,
        attention_levels: Sequence[int],
        res: Callable,
        attn: Callable,
    ) -> tuple[nn.ModuleList, list[int]]:
        """Input conv, then per level `num_res_blocks` (res [+ attention]) and a stride-2 conv between levels.
        Returns the blocks and the channel count of each block's output (the skips, in push order)."""
        ch = level_channels[0]
        blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(self.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, out_ch in enumerate(level_channels):
            for _ in range(num_res_blocks):
                layers = [res(ch, out_ch)] + ([attn(out_ch)] if level in attention_levels else [])
                blocks.append(EmbedSequential(*layers))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(level_channels) - 1:
                blocks.append(EmbedSequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                skip_channels.append(ch)
        return blocks, skip_channels

    def _decoder(
        self,
        level_channels: list[int],
        num_res_blocks: int,
        attention_levels: Sequence[int],
        skip_channels: list[int],
        res: Callable,
        attn: Callable,
    ) -> nn.ModuleList:
        """Per level, coarsest first, `num_res_blocks + 1` (res over [h, skip] [+ attention]), then upsampling."""
        skip_channels = list(skip_channels)
        ch = level_channels[-1]
        blocks = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(level_channels))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), out_ch)] + ([attn(out_ch)] if level in attention_levels else [])
                ch = out_ch
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(EmbedSequential(*layers))
        return blocks

    @property
    def attention_layers(self) -> list[str]:
        """Module names of the attention blocks, in forward order (for hooks and config)."""
        return [name for name, module in self.named_modules() if isinstance(module, AttentionBlock)]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects features [B, {self.in_channels}, h, w], got {tuple(x.shape)}; "
                f"build the denoiser with in_channels equal to the backbone's channel count"
            )

    def forward(self, x: Tensor, t: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """eps_theta(x, t) [B, C, h, w]; with `return_attention` also the attention probabilities of every
        attention layer in forward order, each [B, heads, N, N] with N the positions at its resolution
        (on a padded grid: the positions covering the h x w input, see `valid_attention`)."""
        self._check_input(x)
        size = tuple(x.shape[-2:])
        factor = 2 ** (self.num_levels - 1)
        needs_pad = bool(size[0] % factor or size[1] % factor)
        if needs_pad:
            x = pad_to_multiple(x, factor)  # [B, C, h, w] -> [B, C, H, W], multiples of factor
        eps, attention = self._forward(x, t, return_attention)
        if needs_pad:
            eps = eps[..., : size[0], : size[1]]  # [B, C, H, W] -> [B, C, h, w]
            if return_attention:
                attention = [valid_attention(a, tuple(x.shape[-2:]), size) for a in attention]
        return (eps, attention) if return_attention else eps

    def _forward(self, x: Tensor, t: Tensor, return_attention: bool) -> tuple[Tensor, list[Tensor] | None]:
        """The network on a grid every level can halve: eps [B, C, H, W] and the attention list (or None)."""
        t = torch.broadcast_to(t, x.shape[:1])  # a scalar t serves the whole batch -> [B]
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # [B, 4 * model_channels]
        attention = [] if return_attention else None
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, attention)
            skips.append(h)
        h = self.middle_block(h, emb, attention)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, attention)  # [B, C_h + C_skip, h, w]
        return self.out(h), attention
