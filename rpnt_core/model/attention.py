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

The model uses S + Ŝ (kernel generator initialised near zero).  ``kernel_mode`` "replace" (Ŝ
only) and "none" (S only: plain causal band attention) are ablations that tests build directly;
no config selects them.

``step`` keeps its caches as ring buffers: bin t's key, value and pooling input are written to
slot p = t mod W (the ``write_index`` state, p advancing by one per bin) and nothing is shifted;
keys are rotated once, when written, into a ring frame (slot σ by σθ), and the query is rotated
into the two frames that make every score relative again (see :meth:`ContextKernelAttention.ring`).
The scores are permuted into band layout for the context convolution and back to slots for the
values (one index gather each way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rotary import MultiAxisRotary

NEG_INF = -1e9  # finite "minus infinity": exp underflows to exactly 0, and stays ONNX/TensorRT safe
KERNEL_MODES = ("add", "replace", "none")


def conv_band(rows: Tensor, kernel: Tensor) -> Tensor:
    """Context convolution in band layout.

    Args:
        rows: (..., k_q, W) — rows[..., i, a] = S[t−i, a] (zero for rows before the stream start).
        kernel: (..., k_q, k_k) — K_t for the same leading dims.
    Returns:
        (..., W) with out[a] = Σ_i Σ_j kernel[i, j] · rows[i, a − i − j], j ∈ [−r, r], reading
        zero outside [0, W).  One constant-index gather and one matrix product: static shapes, no
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
    gathered = flat.index_select(-1, idx).reshape(*rows.shape[:-2], kq * kk, w)  # (..., kq·kk, W)
    taps = kernel.reshape(*kernel.shape[:-2], 1, kq * kk)  # (..., 1, kq·kk)
    return (taps @ gathered).squeeze(-2)


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
    """Multi-head causal band attention over the last ``window`` bins with context kernels.

    Args:
        d_model: token width d (a multiple of ``n_heads``).
        n_heads: attention heads H; the head width d / H is even (rotary pairs).
        window: W, bins each query attends to, the current one included.
        kernel_q: k_q, past score rows each context kernel reads (≤ W).
        kernel_k: k_k, odd number of key taps of a context kernel.
        kernel_hidden: hidden width of the kernel generator MLP.
        rope_base: base of the rotary frequencies on the time axis.
        dropout: dropout on the attention probabilities (training only).
        kernel_mode: "add" (the model: S + Ŝ); "replace" (Ŝ) and "none" (S) are ablations for tests.

    Raises:
        ValueError: an unknown ``kernel_mode``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        window: int,
        kernel_q: int,
        kernel_k: int,
        kernel_hidden: int,
        rope_base: float,
        dropout: float,
        kernel_mode: str = "add",
    ) -> None:
        super().__init__()
        if kernel_mode not in KERNEL_MODES:
            raise ValueError(f"kernel_mode: must be one of {KERNEL_MODES}, got {kernel_mode!r}")
        self.d_model, self.n_heads, self.window = d_model, n_heads, window
        self.head_dim = d_model // n_heads
        self.kernel_q, self.kernel_k, self.kernel_mode = kernel_q, kernel_k, kernel_mode
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.rotary = MultiAxisRotary(dims=[self.head_dim], bases=[rope_base])
        # Ring-frame rotations for step(): slot σ's key is cached turned by σθ; the query turns by
        # pθ (keys written since the ring last wrapped) and (p + W)θ (keys written before).  Per
        # position i, x ↦ x·[cos, cos] + swap(x)·[−sin, sin] (swap exchanges the halves), built as
        # a (dh, dh) matrix in ring() from these rows and two constant matrices.
        cos, sin = self.rotary.angles(torch.arange(2 * window, dtype=torch.float64).unsqueeze(-1))
        half = self.head_dim // 2
        self.register_buffer("ring_cos", torch.cat([cos, cos], dim=-1), persistent=False)  # (2W, dh)
        self.register_buffer("ring_sin", torch.cat([-sin, sin], dim=-1), persistent=False)
        self.register_buffer("ring_eye", torch.eye(self.head_dim), persistent=False)
        self.register_buffer("ring_swap", torch.eye(self.head_dim).roll(half, dims=0), persistent=False)
        # Index tables by write slot p (rows): perm[p, x] = (p − x) mod W, and band[p, a] = the
        # column of the (·, 2W) pair of score rows that band column a reads (see ring()).
        slots = torch.arange(window)
        perm = torch.remainder(slots[:, None] - slots[None, :], window)  # (W, W)
        self.register_buffer("ring_perm", perm, persistent=False)
        self.register_buffer("ring_band", perm + window * (perm > slots[:, None]).long(), persistent=False)
        if kernel_mode != "none":
            self.pool_score = nn.Linear(d_model, 1)
            self.kernel_mlp = nn.Sequential(
                nn.Linear(d_model, kernel_hidden),
                nn.GELU(),
                nn.Linear(kernel_hidden, n_heads * kernel_q * kernel_k),
            )
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
            rows = torch.stack(
                [
                    padded[:, :, self.kernel_q - 1 - i : self.kernel_q - 1 - i + t]
                    for i in range(self.kernel_q)
                ],
                dim=3,
            )  # (B, H, T, kq, W)
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
        """Caches for one layer.  ``k``/``v``/``pool_x``/``pool_logit`` are ring buffers indexed by
        slot (the bin written at ``write_index`` p sits in slot p; keys are cached already rotated
        into the ring frame); ``rows`` holds past score rows in band layout, newest first."""
        h, w, dh = self.n_heads, self.window, self.head_dim
        shapes = {"k": (batch_size, h, w, dh), "v": (batch_size, h, w, dh)}
        if self.kernel_mode != "none":
            shapes["rows"] = (batch_size, h, self.kernel_q - 1, w) if self.kernel_q > 1 else None
            shapes["pool_x"] = (batch_size, w, self.d_model)
            shapes["pool_logit"] = (batch_size, w)
        return {k: s for k, s in shapes.items() if s is not None}

    def ring(self, write_index: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """Per-bin ring bookkeeping shared by every layer (all layers have the same window, head
        size and rotary base).  ``write_index`` (B, 1) float: the slot p this bin is written to
        (the same for every row); ``valid`` (B, W) bool in band layout.

        Returns ``kv_slot`` / ``x_slot`` / ``logit_slot``: p as scatter indices for the k/v,
        pool_x and pool_logit rings (one element-wise scatter along the slot axis); ``key_rot`` (dh, dh), the ring frame of slot p;
        ``query_rot`` (dh, 2·dh), the query's two frames pθ and (p + W)θ side by side, with the
        1/√dh score scale folded in; ``band`` (W,) int64, the column of the (·, 2W) pair of score
        rows that band column a reads: slot σ = (p − a) mod W, in the second frame when σ > p
        (written before the ring last wrapped); ``perm`` (W,) int64 with perm[σ] = (p − σ) mod W,
        the band column of slot σ; ``band_valid`` (B, 1, W) float; ``pool_bias`` (B, W): 0 for
        slots holding a bin, ``NEG_INF`` for slots never written."""
        w, dh = self.window, self.head_dim
        p = write_index[:1, 0].long()  # (1,)
        perm = self.ring_perm.index_select(0, p).reshape(w)  # slot of band column a = band column of slot σ
        band = self.ring_band.index_select(0, p).reshape(w)
        rows = torch.cat([p, p + w])
        frames = (
            self.ring_eye * self.ring_cos.index_select(0, rows)[:, None, :]
            + self.ring_swap * self.ring_sin.index_select(0, rows)[:, None, :]
        )  # (2, dh, dh)
        query_rot = frames.permute(1, 0, 2).reshape(dh, 2 * dh) / math.sqrt(dh)
        valid_slot = valid.index_select(-1, perm)
        b = write_index.shape[0]
        return {
            "kv_slot": p.expand(b, self.n_heads, 1, dh),
            "x_slot": p.expand(b, 1, self.d_model),
            "logit_slot": p.expand(b, 1),
            "key_rot": frames[0],
            "query_rot": query_rot,
            "band": band,
            "perm": perm,
            "band_valid": valid[:, None, :].to(self.ring_cos.dtype),
            "pool_bias": torch.where(valid_slot, 0.0, NEG_INF),
        }

    def step(
        self, x: Tensor, cache: dict[str, Tensor], valid: Tensor, ring: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One bin.  x (B, d); ``valid`` (B, W) bool marks band columns that hold real bins
        (already including the current one); ``ring`` from :meth:`ring`.  Returns (B, d) and the
        updated cache (this bin's entries written to slot p; nothing shifted but ``rows``)."""
        b = x.shape[0]
        h, dh, w = self.n_heads, self.head_dim, self.window
        q, k, v = self._split(x)  # (B, H, dh)
        k_cache = cache["k"].scatter(2, ring["kv_slot"], (k @ ring["key_rot"]).unsqueeze(2))  # (B, H, W, dh)
        v_cache = cache["v"].scatter(2, ring["kv_slot"], v.unsqueeze(2))
        q2 = (q @ ring["query_rot"]).reshape(b, h, 2, dh)  # scaled, in both frames
        s2 = (q2 @ k_cache.transpose(-1, -2)).reshape(b, h, 2 * w)  # (B, H, 2W) by frame and slot
        scores = s2.index_select(-1, ring["band"]) * ring["band_valid"]  # (B, H, W) band layout
        new = {"k": k_cache, "v": v_cache}
        rows = kernel = None
        if self.kernel_mode != "none":
            if self.kernel_q > 1:
                rows = torch.cat([scores.unsqueeze(2), cache["rows"]], dim=2)  # (B, H, kq, W)
                new["rows"] = rows[:, :, :-1]
            else:
                rows = scores.unsqueeze(2)
            px = cache["pool_x"].scatter(1, ring["x_slot"], x.unsqueeze(1))  # (B, W, d) by slot
            pl = cache["pool_logit"].scatter(1, ring["logit_slot"], self.pool_score(x))  # (B, W) by slot
            pw = torch.softmax(pl + ring["pool_bias"], dim=-1)  # never-written slots get exactly 0
            context = (pw.unsqueeze(1) @ px).squeeze(1)  # (B, d)
            kernel = self._kernels(context)  # (B, H, kq, kk)
            new["pool_x"], new["pool_logit"] = px, pl
        probs = self._mix(scores, rows, kernel, valid[:, None, :].expand_as(scores))  # (B, H, W) band
        probs = probs.index_select(-1, ring["perm"])  # by slot
        o = (probs.unsqueeze(2) @ v_cache).squeeze(2).reshape(b, self.d_model)  # (B, d)
        return self.out(o), new
