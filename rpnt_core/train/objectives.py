"""Training objectives: causal masked Poisson reconstruction, site contrast, velocity MSE.

Masking (spec, "Pretraining"): per batch draw a neuron ratio r_n and a time ratio r_t from
U(0, 1); in every sample mask round(r_n·C) source channels (all their bins) and round(r_t·T) bins
(all channels), at least one entry in all.  Masked inputs are set to zero and the Poisson loss is
taken on masked entries only.  Because the encoder is causal, a masked bin must be forecast from
the past: reconstruction becomes forecasting.

``groups`` maps input columns to source channels: when a session was resampled to a fixed width
by duplicating channels, duplicates share a group and are masked together — otherwise the model
could read a masked channel from its visible copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_mask(
    shape: tuple[int, ...], *, generator: torch.Generator, groups: Tensor | None = None
) -> Tensor:
    """Boolean mask of ``shape`` (..., T, N) — True = hidden from the model, scored by the loss."""
    *lead, t, n = shape
    b = 1
    for x in lead:
        b *= x
    groups = torch.arange(n) if groups is None else groups.long().cpu()
    n_src = int(groups.max()) + 1
    r_n, r_t = torch.rand(2, generator=generator).tolist()
    k_n, k_t = round(r_n * n_src), round(r_t * t)
    if k_n == 0 and k_t == 0:
        k_t = 1
    chan = torch.rand(b, n_src, generator=generator).argsort(dim=1) < k_n  # (B, n_src)
    time = torch.rand(b, t, generator=generator).argsort(dim=1) < k_t  # (B, T)
    mask = chan[:, groups][:, None, :] | time[:, :, None]  # (B, T, N)
    return mask.reshape(*lead, t, n)


def apply_mask(counts: Tensor, mask: Tensor) -> Tensor:
    """Hidden entries set to zero (the spec's masking)."""
    return counts.masked_fill(mask, 0.0)


def masked_poisson_nll(log_rates: Tensor, counts: Tensor, mask: Tensor) -> Tensor:
    """Mean Poisson NLL, exp(λ) − y·λ (+ log y! constant dropped), over masked entries only."""
    if mask.sum() == 0:
        raise ValueError("mask: no masked entries to score")
    nll = F.poisson_nll_loss(log_rates, counts, log_input=True, full=False, reduction="none")
    return nll[mask].mean()


def site_contrastive_loss(site_latent: Tensor, *, temperature: float = 0.1) -> Tensor:
    """InfoNCE across sites (paper, Appendix 4).  site_latent (B, S, T, d) is averaged over time;
    for each (sample b, site s) the positives are site s in the other samples of the batch, the
    negatives every other site.  Needs B ≥ 2 and S ≥ 2."""
    b, s = site_latent.shape[:2]
    if b < 2 or s < 2:
        raise ValueError(f"site_latent: contrast needs ≥ 2 samples and ≥ 2 sites, got B={b}, S={s}")
    z = F.normalize(site_latent.mean(dim=2).reshape(b * s, -1), dim=-1)  # (B·S, d)
    sim = z @ z.T / temperature  # (B·S, B·S)
    site = torch.arange(s, device=z.device).repeat(b)
    eye = torch.eye(b * s, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    pos = (site[:, None] == site[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)).mean()


def velocity_mse(pred: Tensor, target: Tensor, *, mean: Tensor, scale: Tensor) -> Tensor:
    """MSE in z-scored target units (each output dimension weighted equally)."""
    return F.mse_loss((pred - mean) / scale, (target - mean) / scale)
