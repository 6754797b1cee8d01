"""Pre-norm transformer blocks: the temporal encoder and the multi-site spatial encoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import RPNTConfig
from .attention import ContextKernelAttention
from .rotary import MultiAxisRotary


class FeedForward(nn.Module):
    def __init__(self, *, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, mult * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mult * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TemporalBlock(nn.Module):
    """h ← h + Attn(LN(h)); h ← h + FF(LN(h)).  Context is pooled from LN(h), the block input."""

    def __init__(self, config: RPNTConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = nn.LayerNorm(c.d_model)
        self.attn = ContextKernelAttention(
            d_model=c.d_model,
            n_heads=c.n_heads,
            window=c.window,
            kernel_q=c.kernel_q,
            kernel_k=c.kernel_k,
            kernel_hidden=c.kernel_hidden,
            rope_base=c.rope_base,
            dropout=c.dropout,
        )
        self.norm2 = nn.LayerNorm(c.d_model)
        self.ff = FeedForward(d_model=c.d_model, mult=c.ff_mult, dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, h: Tensor, *, start_position: int = 0) -> Tensor:  # (B, T, d)
        h = h + self.drop(self.attn(self.norm1(h), start_position=start_position))
        return h + self.drop(self.ff(self.norm2(h)))

    def step(
        self, h: Tensor, cache: dict[str, Tensor], valid: Tensor, ring: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        a, cache = self.attn.step(self.norm1(h), cache, valid, ring)  # (B, d)
        h = h + a
        return h + self.ff(self.norm2(h)), cache


class SpatialBlock(nn.Module):
    """Per-time-step attention across recording sites, 2-D rotary on site coordinates (x, y).

    Acts on (B, S, d) — one time step — so it is causal by construction and needs no state.
    """

    def __init__(
        self, *, d_model: int, n_heads: int, site_rope_base: float, dropout: float, ff_mult: int
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.rotary = MultiAxisRotary(
            dims=[self.head_dim // 2, self.head_dim // 2], bases=[site_rope_base, site_rope_base]
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model=d_model, mult=ff_mult, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """h (..., S, d); cos/sin (..., S, dh/2) from the site coordinates.
        Returns (h', attention weights (..., H, S, S))."""
        *lead, s, d = h.shape
        x = self.norm1(h)
        q, k, v = self.qkv(x).reshape(*lead, s, 3, self.n_heads, self.head_dim).unbind(-3)  # (..., S, H, dh)
        q = self.rotary.rotate(q, cos.unsqueeze(-2), sin.unsqueeze(-2)).transpose(-3, -2)  # (..., H, S, dh)
        k = self.rotary.rotate(k, cos.unsqueeze(-2), sin.unsqueeze(-2)).transpose(-3, -2)
        v = v.transpose(-3, -2)
        w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)  # (..., H, S, S)
        o = (self.attn_drop(w) @ v).transpose(-3, -2).reshape(*lead, s, d)
        h = h + self.drop(self.out(o))
        return h + self.drop(self.ff(self.norm2(h))), w


class SpatialEncoder(nn.Module):
    def __init__(self, config: RPNTConfig) -> None:
        super().__init__()
        c = config
        self.blocks = nn.ModuleList(
            SpatialBlock(
                d_model=c.d_model,
                n_heads=c.spatial_heads,
                site_rope_base=c.site_rope_base,
                dropout=c.dropout,
                ff_mult=c.ff_mult,
            )
            for _ in range(c.spatial_layers)
        )

    def forward(self, h: Tensor, site_xy: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, S, T, d) or (B, S, d); site_xy (B, S, 2).  Returns h' (same shape) and the
        attention maps averaged over layers and heads ((B, T, S, S) or (B, S, S)): the
        functional-connectivity read-out of the paper."""
        per_step = h.dim() == 3
        if per_step:
            h = h.unsqueeze(2)
        x = h.transpose(1, 2)  # (B, T, S, d)
        cos, sin = self.blocks[0].rotary.angles(site_xy)  # (B, S, dh/2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, dh/2)
        maps = []
        for blk in self.blocks:
            x, w = blk(x, cos, sin)
            maps.append(w.mean(dim=2))  # (B, T, S, S)
        fc = torch.stack(maps).mean(0)
        x = x.transpose(1, 2)
        if per_step:
            return x.squeeze(2), fc.squeeze(1)
        return x, fc
