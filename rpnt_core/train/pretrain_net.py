"""The network pretraining trains: the RPNT core, per-session adapters, and their starting points.

:class:`PretrainNet` wraps the core and, with ``channels="readin"``, one :class:`SessionAdapter`
per stream.  :func:`build_config` sizes the preset to the sessions; :func:`init_rate_biases` and
:func:`init_target_normalisation` set the read-outs from the training bins;
:func:`session_alignment` records how each session met the model, for finetuning to reuse.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import RPNTConfig
from ..data.session import Session
from ..model.rpnt import RPNT
from .options import PretrainOptions
from .streams import Stream


class SessionAdapter(nn.Module):
    """Per-session read-in / Poisson read-out for pretraining with native channel counts.

    Args:
        n_channels: the session's channel count N_s.
        d_model: the model's width d.
    """

    def __init__(self, n_channels: int, d_model: int) -> None:
        super().__init__()
        self.read_in = nn.Linear(n_channels, d_model)
        self.rate_out = nn.Linear(d_model, n_channels)


class PretrainNet(nn.Module):
    """The RPNT core plus, in "readin" mode, one adapter per stream (a DDP-wrappable unit)."""

    def __init__(self, core: RPNT, adapters: dict[str, SessionAdapter] | None) -> None:
        super().__init__()
        self.core = core
        self.adapters = nn.ModuleDict({adapter_name(k): v for k, v in (adapters or {}).items()})

    def forward(self, counts, metadata, key: str, site_xy=None, norm=None):
        adapter = self.adapters[adapter_name(key)] if len(self.adapters) else None
        return self.core(counts, metadata, site_xy=site_xy, adapter=adapter, norm=norm)


def adapter_name(key: str) -> str:
    """A stream key as a ``ModuleDict`` name (no dots or colons)."""
    return key.replace(".", "_").replace(":", "__")


def build_config(sessions: list[Session], options: PretrainOptions) -> RPNTConfig:
    """The ``options.preset`` config sized to ``sessions``: width ``n_max`` (default the widest
    session), their output width, bin width and metadata vocabularies; a spatial encoder with
    ``options.spatial``, the pool's one target for a supervised run; ``config_overrides`` win."""
    n_max = options.n_max or max(s.n_channels for s in sessions)
    outputs = [s.n_outputs for s in sessions if s.n_outputs]
    names = lambda attr: tuple(sorted({getattr(s, attr) for s in sessions if getattr(s, attr)}))  # noqa: E731
    overrides = dict(options.config_overrides)
    if options.spatial:
        overrides.setdefault("spatial_layers", 2)
    if options.supervised:
        overrides.setdefault("target", _pool_target(sessions))
    return RPNTConfig.preset(
        options.preset,
        n_channels=n_max,
        n_outputs=outputs[0] if outputs else 2,
        bin_s=float(sessions[0].bin_s),
        subjects=names("subject"),
        sessions=names("session"),
        tasks=names("task"),
        **overrides,
    )


def _pool_target(sessions: list[Session]) -> str:
    """The one target every labelled session decodes (supervised pretraining needs one)."""
    labelled = [s for s in sessions if s.labels is not None]
    if not labelled:
        raise ValueError("objective: supervised pretraining needs sessions with labels of their target")
    names = {s.target for s in labelled}
    widths = {s.n_outputs for s in labelled}
    if len(names) > 1 or len(widths) > 1:
        raise ValueError(
            f"target: supervised pretraining needs one target of one width, got "
            f"{sorted(names)} with {sorted(widths)} dimensions"
        )
    return names.pop()


@torch.no_grad()
def init_target_normalisation(core: RPNT, streams: list[Stream]) -> None:
    """Set the head's normalisation to the pooled mean and standard deviation of the target over the
    labelled streams' training bins (one scale for the pool: the units are the same every day)."""
    ys = [st.labels[st.train[0] : st.train[1]] for st in streams if st.labels is not None]
    y = torch.cat(ys).double()
    core.set_velocity_normalisation(y.mean(0).float(), (y.std(0) + 1e-6).float())


def session_alignment(streams: list[Stream], adapters: nn.ModuleDict) -> tuple[dict, dict[str, torch.Tensor]]:
    """How each named session met the model in pretraining, for finetuning to reuse.

    Sessions without a name, sites of multi-site recordings and names that occur more than once
    are left out (ambiguous).

    Returns:
        Checkpoint metadata ``{"session_channels": {name: {"n_channels", "mode", "seed"?}}}`` and,
        for per-session read-ins, their weights as checkpoint extras
        (``readin.<name>.read_in.weight`` ...).
    """
    names = [st.session for st in streams]
    info: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for st in streams:
        if not st.session or names.count(st.session) > 1:
            continue
        n = st.source_channels
        if st.channel_seed is not None:
            info[st.session] = {"mode": "resample", "n_channels": n, "seed": int(st.channel_seed)}
        elif adapter_name(st.key) in adapters:
            info[st.session] = {"mode": "readin", "n_channels": n}
            for k, v in adapters[adapter_name(st.key)].state_dict().items():
                extra[f"readin.{st.session}.{k}"] = v
    return {"session_channels": info}, extra


def train_mean_counts(st: Stream) -> torch.Tensor:
    """([S,] 1, N) each column's mean count per bin over the stream's training bins."""
    lo, hi = st.train
    return st.counts[..., lo:hi, :].mean(dim=-2, keepdim=True)


@torch.no_grad()
def init_rate_biases(core: RPNT, streams: list[Stream], adapters: dict[str, SessionAdapter] | None) -> None:
    """Start every Poisson read-out at its channels' mean rates (log mean count per bin): per
    session for per-session read-outs, the average over sessions for the shared one.  The mean
    rates are most of what the masked loss can explain (see :func:`mean_rate_val_loss`); starting
    there leaves the training steps for the dynamics."""
    # (N,) per stream, sites pooled; + 1e-3 keeps a silent channel's bias finite
    logs = {st.key: torch.log(train_mean_counts(st).flatten(0, -2).mean(0) + 1e-3) for st in streams}
    if adapters:
        for key, ad in adapters.items():
            ad.rate_out.bias.copy_(logs[key])
    else:
        core.rate_out.bias.copy_(torch.stack(list(logs.values())).mean(0))
