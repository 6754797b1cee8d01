"""Causal band attention with context kernels (the spec's temporal attention).

Everything is computed in **band layout**: for query bin t, column a ∈ [0, W) is the key bin
t − a (a = 0 is the current bin).  The full forward converts the T×T score matrix to band layout
with one gather; ``step`` builds one band row per bin from its ring-buffer caches.  The context
convolution (:func:`conv_band`) and the masked softmax then run as *the same code* in both modes,
which is what makes ``step`` equal to the full forward.

Per layer and head h (spec, "Temporal encoder"):
1. S[t, a] = q_t · R(−aθ) k_{t−a} / √d_h for 0 ≤ a < W and t − a ≥ 0, else 0 (rotary on time,
   relative, so nothing depends on the absolute stream position).
2. c_t = attention pooling of the block's input over bins (t−W, t] (causal).
3. K_t = MLP(c_t) → (H, k_q, k_k): one kernel per head and query time.
4. Ŝ[t, a] = Σ_{i<k_q} Σ_{|j|≤r} K_t[h, i, j] · S[t−i, a−i−j]  — i.e. the spec's
   Σ K[i,j] S[t−i, s+j] with s = t − a: rows look only backwards, entries outside a row's band
   are zero.
5. Mask bins outside the band / before the stream start with −inf, softmax, weight the values.

Kernel mode "add" uses S + Ŝ (kernel generator initialised near zero), "replace" uses Ŝ, "none"
uses S (plain causal band attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rotary import MultiAxisRotary, rotate_half_pairs

NEG_INF = -1e9  # finite "minus infinity": exp underflows to exactly 0, and stays ONNX/TensorRT safe


def conv_band(rows: Tensor, kernel: Tensor) -> Tensor:
    """Context convolution in band layout.

    Args:
        rows: (..., k_q, W) — rows[..., i, a] = S[t−i, a] (zero for rows before the stream start).
        kernel: (..., k_q, k_k) — K_t for the same leading dims.
    Returns:
        (..., W) with out[a] = Σ_i Σ_j kernel[i, j] · rows[i, a − i − j], j ∈ [−r, r], reading
        zero outside [0, W).  One constant-index gather, one multiply, one sum: static shapes, no
        data-dependent control flow.
    """
    kq, w = rows.shape[-2], rows.shape[-1]
    kk = kernel.shape[-1]
    r = (kk - 1) // 2
    pad_l, pad_r = kq - 1 + r, r
    wp = w + pad_l + pad_r
    padded = F.pad(rows, (pad_l, pad_r))  # (..., kq, Wp)
    flat = padded.reshape(*padded.shape[:-2], kq * wp)  # (..., kq*Wp)
    idx = _conv_index(kq, kk, w, rows.device)  # (kq*kk*W,)
    gathered = flat.index_select(-1, idx).reshape(*rows.shape[:-2], kq, kk, w)  # (..., kq, kk, W)
    return (gathered * kernel.unsqueeze(-1)).sum(dim=(-3, -2))


_INDEX_CACHE: dict[tuple[int, int, int, str], Tensor] = {}


def _conv_index(kq: int, kk: int, w: int, device: torch.device) -> Tensor:
    """Constant gather index of :func:`conv_band`; cached for eager calls only (a tensor made while
    tracing/exporting is a fake tensor and must not outlive the trace)."""
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    key = (kq, kk, w, str(device))
    idx = None if tracing else _INDEX_CACHE.get(key)
    if idx is None:
        r = (kk - 1) // 2
        pad_l = kq - 1 + r
        wp = w + pad_l + r
        i = torch.arange(kq, device=device).view(kq, 1, 1)
        j = torch.arange(kk, device=device).view(1, kk, 1) - r
        a = torch.arange(w, device=device).view(1, 1, w)
        # padded[p] = row[p − pad_l]; we need row[a − i − j]  →  p = a − i − j + pad_l
        idx = (i * wp + (a - i - j + pad_l)).reshape(-1)
        if not tracing:
            _INDEX_CACHE[key] = idx
    return idx


class ContextKernelAttention(nn.Module):
    """Multi-head causal band attention over the last ``window`` bins with context kernels."""

    def __init__(self, *, d_model: int, n_heads: int, window: int, kernel_q: int, kernel_k: int,
                 kernel_mode: str, kernel_hidden: int, rope_base: float, dropout: float) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.window = d_model, n_heads, window
        self.head_dim = d_model // n_heads
        self.kernel_q, self.kernel_k, self.kernel_mode = kernel_q, kernel_k, kernel_mode
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.rotary = MultiAxisRotary(dims=[self.head_dim], bases=[rope_base])
        # Relative rotation table for step(): key of age a turns by −aθ (the query by 0).
        cos, sin = self.rotary.angles(-torch.arange(window, dtype=torch.float64).unsqueeze(-1))
        self.register_buffer("rel_cos", cos, persistent=False)  # (W, dh/2)
        self.register_buffer("rel_sin", sin, persistent=False)
        if kernel_mode != "none":
            self.pool_score = nn.Linear(d_model, 1)
            self.kernel_mlp = nn.Sequential(
                nn.Linear(d_model, kernel_hidden), nn.GELU(),
                nn.Linear(kernel_hidden, n_heads * kernel_q * kernel_k))
            last = self.kernel_mlp[-1]
            if kernel_mode == "add":
                nn.init.normal_(last.weight, std=1e-3)
                nn.init.zeros_(last.bias)
            else:  # "replace": start as the identity kernel (tap i=0, j=0) so Ŝ ≈ S at init
                nn.init.normal_(last.weight, std=1e-3)
                bias = torch.zeros(n_heads, kernel_q, kernel_k)
                bias[:, 0, (kernel_k - 1) // 2] = 1.0
                with torch.no_grad():
                    last.bias.copy_(bias.reshape(-1))

    # ------------------------------------------------------------------ shared pieces
    def _kernels(self, context: Tensor) -> Tensor:
        """(..., d) context → (..., H, k_q, k_k) kernels."""
        k = self.kernel_mlp(context)
        return k.reshape(*context.shape[:-1], self.n_heads, self.kernel_q, self.kernel_k)

    def _mix(self, scores: Tensor, rows: Tensor | None, kernel: Tensor | None, valid: Tensor) -> Tensor:
        """Combine scores with the context convolution, mask, softmax.  scores/valid (..., W)."""
        if self.kernel_mode == "add":
            scores = scores + conv_band(rows, kernel)
        elif self.kernel_mode == "replace":
            scores = conv_band(rows, kernel)
        scores = torch.where(valid, scores, torch.full_like(scores, NEG_INF))
        return torch.softmax(scores, dim=-1)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    # ------------------------------------------------------------------ full forward
    def forward(self, x: Tensor, *, start_position: int = 0) -> Tensor:
        """x (B, T, d) → (B, T, d); bin 0 of ``x`` is the start of the stream.

        ``start_position`` offsets the absolute rotary positions (angles reduced in float64);
        the output does not depend on it beyond float rounding — a property the tests check.
        """
        b, t, _ = x.shape
        w = self.window
        q, k, v = self._split(x)  # (B, T, H, dh)
        pos = (start_position + torch.arange(t, dtype=torch.float64, device=x.device)).unsqueeze(-1)
        cos, sin = self.rotary.angles(pos)  # (T, dh/2)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = self.rotary.rotate(q, cos, sin).transpose(1, 2)  # (B, H, T, dh)
        k = self.rotary.rotate(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        full = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        tt = torch.arange(t, device=x.device)
        src = tt[:, None] - torch.arange(w, device=x.device)[None, :]  # (T, W): key bin t − a
        valid = src >= 0  # (T, W)
        idx = src.clamp(min=0)
        scores = full.gather(-1, idx.expand(b, self.n_heads, t, w)) * valid  # (B, H, T, W)
        rows = kernel = None
        if self.kernel_mode != "none":
            # rows[:, :, t, i, :] = scores[:, :, t − i, :], zero before the stream start
            padded = F.pad(scores, (0, 0, self.kernel_q - 1, 0))  # (B, H, T+kq−1, W)
            rows = torch.stack([padded[:, :, self.kernel_q - 1 - i: self.kernel_q - 1 - i + t]
                                for i in range(self.kernel_q)], dim=3)  # (B, H, T, kq, W)
            # context pooling over (t−W, t]: logits of key bins in band layout, masked softmax
            logits = self.pool_score(x).squeeze(-1)  # (B, T)
            band_logits = logits[:, idx]  # (B, T, W)
            band_logits = torch.where(valid, band_logits, torch.full_like(band_logits, NEG_INF))
            pw = torch.softmax(band_logits, dim=-1)  # (B, T, W)
            pool = torch.zeros(b, t, t, dtype=x.dtype, device=x.device)
            pool = pool.scatter_add(-1, idx.expand(b, t, w), pw * valid)  # (B, T, T)
            context = pool @ x  # (B, T, d)
            kernel = self._kernels(context).permute(0, 2, 1, 3, 4)  # (B, H, T, kq, kk)
        probs = self._mix(scores, rows, kernel, valid)  # (B, H, T, W)
        probs = self.attn_drop(probs)
        dense = torch.zeros(b, self.n_heads, t, t, dtype=x.dtype, device=x.device)
        dense = dense.scatter_add(-1, idx.expand(b, self.n_heads, t, w), probs * valid)  # (B, H, T, T)
        o = (dense @ v).transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, d)
        return self.out(o)

    # ------------------------------------------------------------------ streaming
    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Ring buffers for one layer, newest entry first (index 0 = current bin after a step)."""
        h, w, dh = self.n_heads, self.window, self.head_dim
        shapes = {"k": (batch_size, h, w, dh), "v": (batch_size, h, w, dh)}
        if self.kernel_mode != "none":
            shapes["rows"] = (batch_size, h, self.kernel_q - 1, w) if self.kernel_q > 1 else None
            shapes["pool_x"] = (batch_size, w, self.d_model)
            shapes["pool_logit"] = (batch_size, w)
        return {k: s for k, s in shapes.items() if s is not None}

    def step(self, x: Tensor, cache: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One bin.  x (B, d); ``valid`` (B, W) bool marks band columns that hold real bins
        (already including the current one).  Returns (B, d) and the updated cache."""
        b = x.shape[0]
        q, k, v = self._split(x)  # (B, H, dh)
        k_cache = torch.cat([k.unsqueeze(2), cache["k"][:, :, :-1]], dim=2)  # (B, H, W, dh)
        v_cache = torch.cat([v.unsqueeze(2), cache["v"][:, :, :-1]], dim=2)
        k_rel = rotate_half_pairs(k_cache, self.rel_cos, self.rel_sin, self.head_dim)  # (B, H, W, dh)
        vmask = valid[:, None, :]  # (B, 1, W)
        scores = (k_rel @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.head_dim) * vmask  # (B, H, W)
        new = {"k": k_cache, "v": v_cache}
        rows = kernel = None
        if self.kernel_mode != "none":
            if self.kernel_q > 1:
                rows = torch.cat([scores.unsqueeze(2), cache["rows"]], dim=2)  # (B, H, kq, W)
                new["rows"] = rows[:, :, :-1]
            else:
                rows = scores.unsqueeze(2)
            px = torch.cat([x.unsqueeze(1), cache["pool_x"][:, :-1]], dim=1)  # (B, W, d)
            pl = torch.cat([self.pool_score(x), cache["pool_logit"][:, :-1]], dim=1)  # (B, W)
            pl = torch.where(valid, pl, torch.full_like(pl, NEG_INF))
            pw = torch.softmax(pl, dim=-1) * valid  # (B, W)
            context = (pw.unsqueeze(1) @ px).squeeze(1)  # (B, d)
            kernel = self._kernels(context)  # (B, H, kq, kk)
            new["pool_x"], new["pool_logit"] = px, pl
        probs = self._mix(scores, rows, kernel, vmask.expand_as(scores))  # (B, H, W)
        o = (probs.unsqueeze(2) @ v_cache).squeeze(2).reshape(b, self.d_model)  # (B, d)
        return self.out(o), new
