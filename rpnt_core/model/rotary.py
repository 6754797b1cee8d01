"""Multidimensional rotary positional embedding (MRoPE).

A general module: any number of axes, each with its own share of the rotated features and its
own base frequency.  Feature pairs are laid out in "split halves" form: for a rotated span of R
features, pair k is (x[k], x[k + R/2]) and turns by angle ``position[axis(k)] * freq[k]``.
Axis i owns ``dims[i] / 2`` consecutive pairs with frequencies ``base_i ** (-2m / dims[i])``.
Features beyond ``sum(dims)`` pass through unrotated.

Only axes whose value *differs between tokens* carry information (rotating q and k by the same
angle cancels in q·k): time inside the temporal encoder, site coordinates inside the spatial
encoder.  Metadata that is constant within a window reaches the model through embeddings instead
(see ``rpnt_core.model.rpnt``).

Precision: angles are formed in float64 and reduced modulo 2π before cos/sin, so a position of
10^7 bins (≈ 2.3 days at 20 ms) rotates as accurately as position 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

TWO_PI = 2.0 * math.pi


class MultiAxisRotary(nn.Module):
    """Rotary embedding over ``len(dims)`` position axes.

    Args:
        dims: features rotated per axis (each even, > 0); their sum ≤ the vector width.
        bases: base frequency per axis.
    """

    def __init__(self, *, dims: Sequence[int], bases: Sequence[float]) -> None:
        super().__init__()
        if len(dims) == 0 or len(dims) != len(bases):
            raise ValueError(f"dims/bases: need one base per axis, got dims={list(dims)} bases={list(bases)}")
        if any(d <= 0 or d % 2 for d in dims):
            raise ValueError(f"dims: each axis needs a positive even share, got {list(dims)}")
        self.dims = tuple(int(d) for d in dims)
        self.n_axes = len(self.dims)
        self.rotated = sum(self.dims)
        half = self.rotated // 2
        # (n_axes, R/2): frequency of pair k on its own axis, zero elsewhere; float64 on purpose.
        sel = torch.zeros(self.n_axes, half, dtype=torch.float64)
        k = 0
        for axis, (d, base) in enumerate(zip(self.dims, bases, strict=True)):
            m = torch.arange(d // 2, dtype=torch.float64)
            sel[axis, k : k + d // 2] = float(base) ** (-2.0 * m / d)
            k += d // 2
        self.register_buffer("freq_matrix", sel, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of the rotation angles for ``positions`` (..., n_axes) → two (..., R/2) float32."""
        if positions.shape[-1] != self.n_axes:
            raise ValueError(f"positions: last dim must be {self.n_axes}, got {tuple(positions.shape)}")
        ang = positions.to(torch.float64) @ self.freq_matrix  # (..., R/2) float64
        ang = torch.remainder(ang, TWO_PI)
        return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` (..., F) by angles whose cos/sin broadcast against (..., R/2)."""
        return rotate_half_pairs(x, cos, sin, self.rotated)


def rotate_half_pairs(x: Tensor, cos: Tensor, sin: Tensor, rotated: int) -> Tensor:
    """Pair k = (x[k], x[k+R/2]) turned by the angle whose cos/sin are given; rest unchanged."""
    half = rotated // 2
    x1 = x[..., :half]
    x2 = x[..., half:rotated]
    out = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]
    if rotated < x.shape[-1]:
        out.append(x[..., rotated:])
    return torch.cat(out, dim=-1)
