"""Sessions prepared for training: float tensors, split ranges, source-channel groups, metadata.

A :class:`Stream` is one recording (or one site of a multi-site recording, when the model has no
spatial encoder) made ready for random-window batches.  Batches are always drawn from a single
stream, so streams may differ in channel count (per-session read-in) as well as share one width
(channel resampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..data.channels import ChannelResampler
from ..data.normalise import sqrt_count_stats
from ..data.session import Session
from ..data.windows import WindowSampler
from .choices import CHANNEL_MODES


@dataclass(frozen=True, kw_only=True)
class Stream:
    key: str  # identifies the per-session read-in
    counts: Tensor  # (T, N) or (S, T, N) float32
    labels: Tensor | None  # (T, D) float32, the session's chosen target
    groups: Tensor  # (N,) long: source channel of each column (duplicates share a group)
    metadata: dict = field(default_factory=dict)  # subject/session/task names, date_days
    site_xy: Tensor | None = None  # (S, 2)
    train: tuple[int, int] = (0, 0)
    val: tuple[int, int] = (0, 0)
    session: str = ""  # the recording's session name ("" when unnamed or one site of several)
    channel_seed: int | None = None  # the ChannelResampler seed ("resample" streams)
    source_channels: int = 0  # the recording's own channel count (before resampling)
    norm: tuple[Tensor, Tensor] | None = None  # (N,) mean, scale of sqrt counts over the train bins

    @property
    def n_channels(self) -> int:
        return int(self.counts.shape[-1])

    def window(self, starts: np.ndarray, length: int) -> tuple[Tensor, Tensor | None]:
        """counts (B, [S,] L, N) and labels (B, L, D) | None for window ``starts``."""
        idx = torch.as_tensor(starts)[:, None] + torch.arange(length)[None, :]  # (B, L)
        multisite = self.counts.dim() == 3
        c = self.counts[:, idx].permute(1, 0, 2, 3) if multisite else self.counts[idx]  # (B, [S,] L, N)
        v = None if self.labels is None else self.labels[idx]
        return c, v

    def sample(
        self, rng: np.random.Generator, *, batch_size: int, length: int, split: str = "train"
    ) -> tuple[Tensor, Tensor | None]:
        lo, hi = getattr(self, split)
        starts = WindowSampler(start=lo, stop=hi, length=length).sample(rng, batch_size)
        return self.window(starts, length)

    def fixed_windows(self, *, length: int, split: str = "val", max_windows: int = 64) -> np.ndarray:
        """Non-overlapping window starts covering the split (deterministic)."""
        lo, hi = getattr(self, split)
        starts = np.arange(lo, hi - length + 1, length)
        return starts[:max_windows]


def prepare_streams(
    sessions: list[Session],
    *,
    val_fraction: float,
    channels: str,
    n_max: int,
    split_sites: bool,
    seed: int,
    min_bins: int,
    input_norm: bool = False,
) -> list[Stream]:
    """Streams for pretraining: the last ``val_fraction`` of each recording is validation.

    ``channels``: "resample" maps every stream to ``n_max`` columns with a per-session
    :class:`ChannelResampler` (duplicates grouped for masking); "readin" keeps native widths.
    ``split_sites``: multi-site recordings become one stream per site (temporal-only models).
    ``input_norm``: each stream carries ``norm``, its columns' sqrt-count statistics over its own
    training bins (sites pooled), for ``RPNTConfig.input_norm`` models.

    A recording whose validation part would be shorter than ``min_bins`` (one window) trains on
    all its bins and has no validation windows (e.g. a new session's few unlabelled calibration
    bins); one shorter than ``min_bins`` altogether cannot hold a training window: an error
    names it — nothing is dropped silently.  At least one stream must have validation windows.
    """
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels: expected 'resample' or 'readin', got {channels!r}")
    streams: list[Stream] = []
    for i, s in enumerate(sessions):
        counts = np.asarray(s.counts, dtype=np.float32)
        labels = None if s.labels is None else torch.from_numpy(np.asarray(s.labels, np.float32))
        name = s.session or f"s{i}"
        sites = range(counts.shape[0]) if (s.multisite and split_sites) else [None]
        for site in sites:
            c = counts if site is None else counts[site]
            n_val = _validation_bins(c.shape[-2], name=name, val_fraction=val_fraction, min_bins=min_bins)
            channel_seed = seed + i if channels == "resample" else None
            streams.append(
                _stream(
                    s,
                    c,
                    labels,
                    key=f"{i}:{name}" + ("" if site is None else f":site{site}"),
                    n_val=n_val,
                    site=site,
                    n_max=n_max,
                    channel_seed=channel_seed,
                    input_norm=input_norm,
                )
            )
    if not any(st.val[1] - st.val[0] >= min_bins for st in streams):
        raise ValueError(
            f"data: no recording has enough bins ({2 * min_bins}+) for training and validation windows"
        )
    return streams


def _validation_bins(t: int, *, name: str, val_fraction: float, min_bins: int) -> int:
    """Bins at the end of a recording of ``t`` bins held out for validation (0 when too short to
    hold a validation window as well as a training one)."""
    if t < min_bins:
        raise ValueError(
            f"data: recording {name!r} has {t} bins, fewer than one training window "
            f"({min_bins}); leave it out or shorten the window"
        )
    n_val = max(1, int(round(val_fraction * t)))
    if t - n_val < min_bins or n_val < min_bins:
        return 0  # too short for a validation window too: all of it trains
    return n_val


def _stream(
    s: Session,
    c: np.ndarray,
    labels: Tensor | None,
    *,
    key: str,
    n_val: int,
    site: int | None,
    n_max: int,
    channel_seed: int | None,
    input_norm: bool,
) -> Stream:
    """One stream of session ``s``: counts ``c`` ((T, N), or (S, T, N) when sites stay together),
    resampled to ``n_max`` columns when ``channel_seed`` is given, ``site`` of several or None."""
    t, source_channels = c.shape[-2], int(c.shape[-1])
    groups = np.arange(c.shape[-1])
    if channel_seed is not None:
        rs = ChannelResampler(n_channels=c.shape[-1], n_max=n_max, seed=channel_seed)
        c, groups = rs.apply(c), rs.index
    norm: tuple[Tensor, Tensor] | None = None
    if input_norm:
        flat = c[..., : t - n_val, :].reshape(-1, c.shape[-1])  # train bins, sites pooled
        mean, scale = sqrt_count_stats(flat)
        norm = (torch.from_numpy(mean), torch.from_numpy(scale))
    return Stream(
        key=key,
        counts=torch.from_numpy(np.ascontiguousarray(c)),
        labels=labels,
        groups=torch.as_tensor(np.array(groups), dtype=torch.long),
        metadata=dict(subject=s.subject, session=s.session, task=s.task, date_days=s.date_days),
        site_xy=None
        if (s.site_xy is None or site is not None)
        else torch.as_tensor(s.site_xy, dtype=torch.float32),
        train=(0, t - n_val),
        val=(t - n_val, t),
        session=(s.session or "") if site is None else "",
        channel_seed=channel_seed,
        source_channels=source_channels,
        norm=norm,
    )


def metadata_batch(model, meta: dict, batch_size: int) -> dict[str, Tensor]:
    """Vocabulary indices for a stream's metadata names, repeated over the batch."""
    return model.metadata_for(
        batch_size=batch_size,
        subject=meta.get("subject"),
        session=meta.get("session"),
        task=meta.get("task"),
        date_days=float(meta.get("date_days", 0.0)),
    )
