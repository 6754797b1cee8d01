"""Label-free re-alignment: fit a decoder's read-in to a new recording from its unlabelled counts.

``realign_input(model, counts, options=...)`` keeps everything the model learned — core, Poisson
read-out, behaviour head — and trains only the read-in (and the mask-token map, when the model has
one) by the masked Poisson objective of pretraining on the new recording's spike counts: the
read-in is moved until the frozen core, fed the new day's counts, again predicts that day's hidden
counts.  An ``input_norm`` model first takes the new recording's input statistics.  No behaviour is
read, so it spends no label; the same channels must mean the same units only as far as the frozen
Poisson read-out assumes (the same array on another day).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.rpnt import RPNT
from .finetune import set_input_statistics
from .objectives import apply_mask, masked_poisson_nll, sample_mask


@dataclass(frozen=True, kw_only=True)
class RealignOptions:
    steps: int = 200
    batch_size: int = 16
    window_len: int = 100
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "window_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


def _read_in_params(model: RPNT) -> list[torch.nn.Parameter]:
    return list(model.read_in.parameters())


def realign_input(
    model: RPNT,
    counts: np.ndarray,
    *,
    options: RealignOptions,
    metadata: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Re-fit ``model``'s read-in (in place) to unlabelled ``counts`` (T, N_in) of a new recording.

    Returns ``{"nll_before", "nll_after"}``: the masked Poisson loss of the first and the last
    ten steps' batches.  The model is left in eval mode with every parameter trainable again."""
    c = np.asarray(counts, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != model.config.n_input_channels:
        raise ValueError(f"counts: expected (T, {model.config.n_input_channels}), got {c.shape}")
    window = min(options.window_len, c.shape[0])
    set_input_statistics(model, c)
    train = {id(p) for p in _read_in_params(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    model.eval()  # no dropout: the frozen core behaves as it will at inference
    opt = torch.optim.AdamW(_read_in_params(model), lr=options.lr, weight_decay=0.0)
    rng = np.random.default_rng(options.seed)
    gen = torch.Generator().manual_seed(options.seed + 7)
    x_all = torch.from_numpy(c)
    meta = {k: v.expand(options.batch_size) for k, v in (metadata or {}).items()}
    losses = []
    for _ in range(options.steps):
        starts = rng.integers(0, c.shape[0] - window + 1, size=options.batch_size)
        x = x_all[torch.as_tensor(starts)[:, None] + torch.arange(window)[None, :]]  # (B, L, N_in)
        mask = sample_mask(tuple(x.shape), generator=gen)
        out = model(apply_mask(x, mask), meta)
        loss = masked_poisson_nll(out["log_rates"], model.units(x), model.units(mask))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in model.parameters():
        p.requires_grad_(True)
    k = min(10, len(losses))
    return {"nll_before": float(np.mean(losses[:k])), "nll_after": float(np.mean(losses[-k:]))}
