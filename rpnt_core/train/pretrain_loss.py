"""The pretraining losses: one batch's (:func:`batch_loss`), the validation loss on fixed windows
and masks (:func:`validation_loss`), and the mean-rate floor it is compared with
(:func:`mean_rate_val_loss`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model.rpnt import RPNT
from .objectives import apply_mask, masked_poisson_nll, sample_mask, site_contrastive_loss, velocity_mse
from .pretrain_net import train_mean_counts
from .streams import Stream, metadata_batch


def batch_loss(
    net: nn.Module,
    core: RPNT,
    stream: Stream,
    counts: torch.Tensor,
    *,
    gen: torch.Generator,
    device: torch.device,
    contrastive_weight: float,
    labels: torch.Tensor | None = None,
    objective: str = "masked",
) -> torch.Tensor:
    """The pretraining loss of one batch.

    Args:
        net: the unit that runs the batch (``PretrainNet``, DDP-wrapped or not, or a baseline).
        core: the model (its metadata vocabularies and target scale); None for a baseline.
        stream: the batch's stream (key, source-channel groups, sites, input statistics).
        counts: (B, [S,] L, N) the batch's counts.
        gen: the generator of the masks.
        device: where the loss is computed.
        contrastive_weight: weight of the site contrast (multi-site batches of B ≥ 2).
        labels: (B, L, D) the target of a labelled stream, or None.
        objective: "masked": Poisson NLL of masked entries (+ site contrast); "supervised": the
            target's MSE in the pool's z-scored units (0 for an unlabelled batch).

    Returns:
        The scalar loss.
    """
    meta = (
        {}
        if core is None
        else {k: v.to(device) for k, v in metadata_batch(core, stream.metadata, counts.shape[0]).items()}
    )
    counts = counts.to(device)
    loss = torch.zeros((), device=device)
    if objective == "masked":
        mask = sample_mask(tuple(counts.shape), generator=gen, groups=stream.groups).to(device)
        out = net(apply_mask(counts, mask), meta, stream.key, site_xy=stream.site_xy, norm=stream.norm)
        loss = loss + masked_poisson_nll(out["log_rates"], counts, mask)
        if "site_latent" in out and contrastive_weight > 0 and counts.shape[0] > 1:
            loss = loss + contrastive_weight * site_contrastive_loss(out["site_latent"])
    if objective == "supervised" and labels is not None:
        pred = net(counts, meta, stream.key, site_xy=stream.site_xy, norm=stream.norm)["velocity"]
        loss = loss + velocity_mse(
            pred, labels.to(device), mean=core.velocity_mean, scale=core.velocity_scale
        )
    return loss


@torch.no_grad()
def validation_loss(
    net: nn.Module,
    core: RPNT,
    streams: list[Stream],
    *,
    window_len: int,
    seed: int,
    device: torch.device,
    contrastive_weight: float,
    objective: str = "masked",
) -> float:
    """The pretraining loss (``objective``, see :func:`batch_loss`) on fixed validation windows and masks."""
    was = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    losses = []
    for st in streams:
        if objective == "supervised" and st.labels is None:
            continue
        starts = st.fixed_windows(length=window_len, split="val", max_windows=16)
        for i in range(0, len(starts), 8):
            counts, labels = st.window(starts[i : i + 8], window_len)
            losses.append(
                float(
                    batch_loss(
                        net,
                        core,
                        st,
                        counts,
                        gen=gen,
                        device=device,
                        labels=labels,
                        contrastive_weight=contrastive_weight,
                        objective=objective,
                    )
                )
            )
    net.train(was)
    return float(np.mean(losses))


class _MeanRateNet(nn.Module):
    """Predicts every masked entry by its channel's mean count over the stream's training bins."""

    def __init__(self, streams: list[Stream]) -> None:
        super().__init__()
        self.log_mean = {st.key: torch.log(train_mean_counts(st) + 1e-6) for st in streams}

    def forward(self, counts, metadata, key: str, site_xy=None, norm=None):
        return {"log_rates": self.log_mean[key].expand_as(counts).to(counts.device)}


def mean_rate_val_loss(streams: list[Stream], *, window_len: int, seed: int) -> float:
    """:func:`validation_loss` (same windows, same masks) of a predictor that knows only each
    channel's mean rate: the level a pretrained model must get below to have learned anything
    about the population's dynamics rather than its firing rates."""
    return validation_loss(
        _MeanRateNet(streams),
        None,
        streams,
        window_len=window_len,
        seed=seed,
        device=torch.device("cpu"),
        contrastive_weight=0.0,
    )
