"""Self-supervised pretraining: causal masked Poisson reconstruction (+ site contrast).

``pretrain(sessions, options=..., out=...)`` trains an RPNT on unlabelled recordings, keeps the
checkpoint with the best validation loss at ``out``, writes one JSON line per epoch to
``out.with_suffix(".log.jsonl")`` and a resumable training state to
``out.with_suffix(".resume.safetensors")`` after every epoch (``resume=True`` continues from it).

Runs unchanged under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPUs): every rank
draws its own batches, gradients are averaged, rank 0 writes files.

Objective (``objective``): "masked" (the options' default) is self-supervised only; ``rpnt
pretrain`` chooses "supervised" when every session has the target (``pretraining_objective``).  "supervised" trains the
core and the behaviour head on the pool's own labels (every labelled recording's chosen target,
z-scored by the pool's pooled mean and spread, which the head keeps: the checkpoint is then a
decoder of the pool, metadata ``"supervised": true``, and finetuning starts from its head).
Validation and the kept checkpoint follow the same objective.  (Both losses together were
measured on the cross-day benchmark and did no better than the supervised one alone at twice
the cost; removed.)

Input normalisation (``RPNTConfig.input_norm``, on by default): every recording is standardised
by its own sqrt-count statistics over its training bins.

Validation: the last ``val_fraction`` of every recording, fixed windows and fixed masks (seeded),
so validation losses are comparable between epochs and runs.

Per-session read-ins (``channels="readin"``) learn at ``adapter_lr_scale`` × ``lr`` (default 10×).
Each one only sees its own stream's batches (a share proportional to its length), and at the
core's rate a pool of many short sessions never left the mean-rate solution: on the synthetic
benchmark pool (9 sessions of 35–60 s, three of them 3-site, plus a 10-minute target's first 2 min)
the model's forecast of hidden bins on the target (:func:`rpnt_core.evaluate.forecast.forecast_gain`)
was no better than its channels' mean rates (gain −0.02 % after 600 steps; the pool's validation
loss was still at the mean-rate floor after 1 300), while the same model pretrained on the target
session alone beat a causal Poisson GLM.  At 10× the pooled model's gain on that target is 1.96 %
(GLM 2.07 %, true rates 2.78 %).  Measured 2026-12-02; see the README's decoding section.

``target_share`` (default 0: by length): the last session's share of the batches.  A new
session's few minutes of unlabelled bins are a few percent of a pool's batches by length (≈ 6 %
on the Stevenson benchmark pool: its read-in's forecast gain stayed at −0.09 %); at 0.25 it
learned (2.77 %).  The benchmark recipe uses 0.25.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..config import RPNTConfig
from ..data.session import Session, fingerprint_sessions
from ..model.rpnt import RPNT
from . import distributed as D
from .choices import OBJECTIVES
from .objectives import apply_mask, masked_poisson_nll, sample_mask, site_contrastive_loss, velocity_mse
from .resume import load_training_state, save_training_state
from .streams import Stream, metadata_batch, prepare_streams


@dataclass(frozen=True, kw_only=True)
class PretrainOptions:
    preset: str = "small"
    epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 16
    window_len: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    channels: str = "resample"  # "resample" (fixed width n_max) or "readin" (per-session read-in)
    n_max: int = 0  # resample width; 0 = the largest channel count in the data
    val_fraction: float = 0.1
    spatial: bool = False  # train the multi-site spatial encoder (multi-site recordings only)
    contrastive_weight: float = 0.1
    adapter_lr_scale: float = (
        10.0  # learning-rate multiplier for the per-session read-ins/read-outs ("readin")
    )
    target_share: float = (
        0.0  # share of the batches drawn from the LAST session (0 = by length, like the rest)
    )
    objective: str = "masked"  # "masked" (self-supervised) or "supervised" (labels of the pool)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    config_overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size", "window_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if self.channels not in ("resample", "readin"):
            raise ValueError(f"channels: expected 'resample' or 'readin', got {self.channels!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if not self.adapter_lr_scale > 0:
            raise ValueError(f"adapter_lr_scale: must be > 0, got {self.adapter_lr_scale}")
        if not 0 <= self.target_share < 1:
            raise ValueError(f"target_share: must be in [0, 1), got {self.target_share}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def supervised(self) -> bool:
        return self.objective == "supervised"


class SessionAdapter(nn.Module):
    """Per-session read-in / Poisson read-out for pretraining with native channel counts."""

    def __init__(self, n_channels: int, d_model: int) -> None:
        super().__init__()
        self.read_in = nn.Linear(n_channels, d_model)
        self.rate_out = nn.Linear(d_model, n_channels)


class PretrainNet(nn.Module):
    """The RPNT core plus, in "readin" mode, one adapter per stream (a DDP-wrappable unit)."""

    def __init__(self, core: RPNT, adapters: dict[str, SessionAdapter] | None) -> None:
        super().__init__()
        self.core = core
        self.adapters = nn.ModuleDict({_safe(k): v for k, v in (adapters or {}).items()})

    def forward(self, counts, metadata, key: str, site_xy=None, norm=None):
        adapter = self.adapters[_safe(key)] if len(self.adapters) else None
        return self.core(counts, metadata, site_xy=site_xy, adapter=adapter, norm=norm)


def _safe(key: str) -> str:
    return key.replace(".", "_").replace(":", "__")


def build_config(sessions: list[Session], options: PretrainOptions) -> RPNTConfig:
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

    Returns checkpoint metadata ``{"session_channels": {name: {"n_channels", "mode", "seed"?}}}``
    and, for per-session read-ins, their weights as checkpoint extras
    (``readin.<name>.read_in.weight`` ...).  Sessions without a name, sites of multi-site
    recordings and names that occur more than once are left out (ambiguous)."""
    names = [st.session for st in streams]
    info: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for st in streams:
        if not st.session or names.count(st.session) > 1:
            continue
        n = st.source_channels
        if st.channel_seed is not None:
            info[st.session] = {"mode": "resample", "n_channels": n, "seed": int(st.channel_seed)}
        elif _safe(st.key) in adapters:
            info[st.session] = {"mode": "readin", "n_channels": n}
            for k, v in adapters[_safe(st.key)].state_dict().items():
                extra[f"readin.{st.session}.{k}"] = v
    return {"session_channels": info}, extra


def _loss(
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
    """The pretraining loss of one batch: masked Poisson NLL (+ site contrast), or (``objective``
    "supervised") the target's MSE in the pool's z-scored units on a labelled stream's ``labels``
    (B, L, D)."""
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
    """The pretraining loss (``objective``, see :func:`_loss`) on fixed validation windows and masks."""
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
                    _loss(
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


def _train_mean_counts(st: Stream) -> torch.Tensor:
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
    logs = {st.key: torch.log(_train_mean_counts(st).flatten(0, -2).mean(0) + 1e-3) for st in streams}
    if adapters:
        for key, ad in adapters.items():
            ad.rate_out.bias.copy_(logs[key])
    else:
        core.rate_out.bias.copy_(torch.stack(list(logs.values())).mean(0))


class _MeanRateNet(nn.Module):
    """Predicts every masked entry by its channel's mean count over the stream's training bins."""

    def __init__(self, streams: list[Stream]) -> None:
        super().__init__()
        self.log_mean = {st.key: torch.log(_train_mean_counts(st) + 1e-6) for st in streams}

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


def batch_shares(
    streams: list[Stream], *, n_sessions: int, weights: list[float] | None = None, target_share: float = 0.0
) -> np.ndarray:
    """Probability that a training batch is drawn from each stream (sums to 1).

    By default proportional to each stream's training bins.  ``weights`` (one per session) fixes
    each session's relative share instead, split over its streams by length.  ``target_share`` > 0
    gives the last session that fraction of the batches and the others the rest, by length (a new
    session's few minutes of unlabelled bins would otherwise be a few percent of a large pool's
    batches, too few for its own read-in to learn — see the README's decoding section).  Giving
    both is an error (one would silently override the other).
    """
    if weights is not None and target_share > 0:
        raise ValueError("weights and target_share: give one or the other, not both")
    length = np.array([s.train[1] - s.train[0] for s in streams], dtype=np.float64)
    owner = np.array([int(s.key.split(":")[0]) for s in streams])
    if weights is None:
        weights = [float(length[owner == i].sum()) for i in range(n_sessions)]
        if target_share > 0 and n_sessions > 1 and (owner == n_sessions - 1).any():
            rest = sum(weights[:-1])
            weights = [(1 - target_share) * w / rest for w in weights[:-1]] + [target_share]
    share = np.zeros_like(length)
    for i, w in enumerate(weights):  # each session's weight is split over its streams by length
        sel = owner == i
        if sel.any():
            share[sel] = float(w) * length[sel] / length[sel].sum()
    return share / share.sum()


def pretrain(
    sessions: list[Session],
    *,
    options: PretrainOptions,
    out: str | Path,
    config: RPNTConfig | None = None,
    weights: list[float] | None = None,
) -> dict:
    """Pretrain on ``sessions``; returns a summary (best validation loss, epochs, paths).

    ``weights``: relative sampling weight of each session's batches (default: proportional to its
    training bins) — e.g. to give a new session's unlabelled calibration bins a fixed share;
    ``options.target_share`` does that for the last session (see :func:`batch_shares`).
    """
    if weights is not None and len(weights) != len(sessions):
        raise ValueError(f"weights: {len(weights)} weights for {len(sessions)} sessions")
    out = Path(out)
    dist = D.setup(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed + 1000 * dist.rank)
    config = config or build_config(sessions, options)
    window_len = min(options.window_len, max(8, min(s.n_bins for s in sessions) // 4))
    streams = prepare_streams(
        sessions,
        val_fraction=options.val_fraction,
        channels=options.channels,
        n_max=config.n_channels,
        split_sites=not config.spatial_layers,
        seed=options.seed,
        min_bins=window_len,
        input_norm=config.input_norm,
    )
    if config.spatial_layers:
        streams = [s for s in streams if s.counts.dim() == 3]
        if not streams:
            raise ValueError("data: --spatial needs multi-site recordings (counts (S, T, N) with site_xy)")
    core = RPNT(config)
    adapters = (
        {
            s.key: SessionAdapter(
                s.n_channels,
                config.d_model,
            )
            for s in streams
        }
        if options.channels == "readin"
        else None
    )
    init_rate_biases(core, streams, adapters)  # (a resumed run loads its own weights over this)
    if options.supervised:
        init_target_normalisation(core, streams)
    net = PretrainNet(core, adapters).to(dist.device)
    train_net: nn.Module = net
    if dist.enabled:
        train_net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    groups = [{"params": list(net.core.parameters())}]
    if len(net.adapters):
        groups.append(
            {"params": list(net.adapters.parameters()), "lr": options.lr * options.adapter_lr_scale}
        )
    opt = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    total = options.epochs * options.steps_per_epoch

    def lr_at(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        p = (step - options.warmup_steps) / max(1, total - options.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    resume_path = out.with_suffix(".resume.safetensors")
    log_path = out.with_suffix(".log.jsonl")
    info = {"epoch": 0, "step": 0, "best_val": float("inf"), "best_epoch": -1}
    if options.resume and resume_path.exists():
        info = load_training_state(resume_path, module=net, optimizer=opt, rng=rng)
        sched.last_epoch = info["step"]
        for group in opt.param_groups:  # the schedule's value at the resumed step
            group["lr"] = group["initial_lr"] * lr_at(info["step"])
        if dist.rank:  # rank 0 saved its own generator; the others derive theirs from the step
            rng = np.random.default_rng(options.seed + 1000 * dist.rank + info["step"])
    gen = torch.Generator().manual_seed(options.seed * 7919 + dist.rank + info["step"])
    share = batch_shares(
        streams, n_sessions=len(sessions), weights=weights, target_share=options.target_share
    )
    if options.objective == "supervised":  # batches only from recordings with labels
        share = share * np.array([st.labels is not None for st in streams])
        share = share / share.sum()
    fingerprint = fingerprint_sessions(sessions)
    t_start = time.time()
    first_epoch = info["epoch"]
    # one bar over the whole run: its ETA is the run's (validation passes between epochs included)
    bar = tqdm(
        total=options.epochs * options.steps_per_epoch,
        initial=info["step"],
        desc="pretrain",
        unit="step",
        disable=not (options.progress and dist.is_main),
        dynamic_ncols=True,
    )
    try:
        for epoch in range(info["epoch"], options.epochs):
            train_net.train()
            running = []
            for _ in range(options.steps_per_epoch):
                st = streams[int(rng.choice(len(streams), p=share))]
                counts, labels = st.sample(rng, batch_size=options.batch_size, length=window_len)
                loss = _loss(
                    train_net,
                    core,
                    st,
                    counts,
                    gen=gen,
                    device=dist.device,
                    labels=labels,
                    contrastive_weight=options.contrastive_weight,
                    objective=options.objective,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
                opt.step()
                sched.step()
                info["step"] += 1
                running.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{options.epochs}", loss=f"{running[-1]:.4f}")
            val = validation_loss(
                net,
                core,
                streams,
                window_len=window_len,
                seed=options.seed,
                device=dist.device,
                contrastive_weight=options.contrastive_weight,
                objective=options.objective,
            )
            train_loss = D.mean_across(float(np.mean(running)), dist)
            improved = val < info["best_val"]
            if improved:
                info["best_val"], info["best_epoch"] = val, epoch
            info["epoch"] = epoch + 1
            if dist.is_main:
                if improved:
                    alignment, extra = session_alignment(streams, net.adapters)
                    save_checkpoint(
                        core,
                        out,
                        extra=extra,
                        meta={
                            **alignment,
                            "kind": "pretrained",
                            "data_fingerprint": fingerprint,
                            "channels": options.channels,
                            "supervised": options.supervised,
                            "metrics": {"val_poisson_nll": val, "epoch": epoch},
                            "pretrain_options": asdict(options)
                            | {"config_overrides": dict(options.config_overrides)},
                            "sessions": [s.source or s.session for s in sessions],
                        },
                    )
                with log_path.open("a") as f:
                    f.write(
                        json.dumps(
                            {
                                "epoch": epoch,
                                "step": info["step"],
                                "train_loss": train_loss,
                                "val_loss": val,
                                "lr": sched.get_last_lr()[0],
                                "best": improved,
                                "elapsed_s": round(time.time() - t_start, 2),
                            }
                        )
                        + "\n"
                    )
                save_training_state(resume_path, module=net, optimizer=opt, info=info, rng=rng)
                if options.progress:
                    elapsed = time.time() - t_start
                    eta = elapsed / (epoch + 1 - first_epoch) * (options.epochs - epoch - 1)
                    bar.write(
                        f"epoch {epoch + 1}/{options.epochs}  train {train_loss:.4f}  val {val:.4f}"
                        + ("  *best" if improved else "")
                        + f"  ({elapsed:.0f} s, ETA {eta:.0f} s)",
                        file=sys.stdout,
                    )
                    sys.stdout.flush()  # a pipe reader sees each epoch's line as it ends
            D.barrier(dist)
    finally:  # the bar ends before anything the caller prints (an interrupt's message)
        bar.close()
    D.teardown(dist)
    floor = (
        mean_rate_val_loss(streams, window_len=window_len, seed=options.seed)
        if options.objective == "masked" and not config.spatial_layers
        else None
    )
    return {
        "checkpoint": str(out),
        "best_val_loss": info["best_val"],
        "val_loss_mean_rate": floor,
        "best_epoch": info["best_epoch"],
        "epochs": info["epoch"],
        "log": str(log_path),
        "streams": len(streams),
        "data_fingerprint": fingerprint,
    }
