"""Pretraining: causal masked Poisson reconstruction (+ site contrast), or the pool's own labels.

``pretrain(sessions, options=..., out=...)`` trains an RPNT on earlier recordings, keeps the
checkpoint with the best validation loss at ``out``, writes one JSON line per epoch to
``out.with_suffix(".log.jsonl")`` and a resumable training state to
``out.with_suffix(".resume.safetensors")`` after every epoch (``resume=True`` continues from it).

Runs unchanged under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPUs): every rank
draws its own batches, gradients are averaged, rank 0 writes files.

Objective (``options.objective``): "masked" (the options' default) is self-supervised only;
``rpnt pretrain`` chooses "supervised" when every session has the target
(:func:`~rpnt_core.train.choices.pretraining_objective`).  "supervised" trains the core and the
behaviour head on the pool's own labels (every labelled recording's chosen target, z-scored by the
pool's pooled mean and spread, which the head keeps: the checkpoint is then a decoder of the pool,
metadata ``"supervised": true``, and finetuning starts from its head).  Validation and the kept
checkpoint follow the same objective.

Input normalisation (``RPNTConfig.input_norm``): every recording is standardised by its own
sqrt-count statistics over its training bins.

Validation: the last ``val_fraction`` of every recording, fixed windows and fixed masks (seeded),
so validation losses are comparable between epochs and runs.

Per-session read-ins (``channels="readin"``) learn at ``adapter_lr_scale`` × ``lr``: each one only
sees its own stream's batches (a share proportional to its length).  ``target_share`` gives the
last session a fixed share of the batches (a new session's few minutes of unlabelled bins are
otherwise a few percent of a pool's batches).

The network and its starting points are in :mod:`~rpnt_core.train.pretrain_net`, the losses in
:mod:`~rpnt_core.train.pretrain_loss`; this module runs the loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
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
from .options import PretrainOptions
from .pretrain_loss import batch_loss, mean_rate_val_loss, validation_loss
from .pretrain_net import (
    PretrainNet,
    SessionAdapter,
    build_config,
    init_rate_biases,
    init_target_normalisation,
    session_alignment,
)
from .resume import load_training_state, save_training_state
from .streams import Stream, prepare_streams


def batch_shares(
    streams: list[Stream], *, n_sessions: int, weights: list[float] | None = None, target_share: float = 0.0
) -> np.ndarray:
    """Probability that a training batch is drawn from each stream.

    Args:
        streams: the training streams (a stream's key starts with its session's index).
        n_sessions: how many sessions the streams come from.
        weights: each session's relative share (default: its training bins), split over its
            streams by length.
        target_share: when > 0, the last session's share of the batches; the others share the rest
            by length (a new session's few minutes of unlabelled bins would otherwise be a few
            percent of a large pool's batches, too few for its own read-in to learn).

    Returns:
        (n_streams,) probabilities that sum to 1.

    Raises:
        ValueError: both ``weights`` and ``target_share`` (one would silently override the other).
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
    """Pretrain on ``sessions``, keeping the best-validation checkpoint at ``out``.

    Args:
        sessions: the recordings (labelled ones carry their chosen target).
        options: how to train.
        out: checkpoint path; the log and the resumable state are written next to it.
        config: the model's config (default: the preset sized to the sessions, see
            :func:`build_config`).
        weights: relative sampling weight of each session's batches (default: proportional to its
            training bins), e.g. to give a new session's unlabelled calibration bins a fixed share;
            ``options.target_share`` does that for the last session (see :func:`batch_shares`).

    Returns:
        A summary: ``checkpoint``, ``best_val_loss``, ``val_loss_mean_rate`` (the mean-rate floor of
        a masked single-site run, else None), ``best_epoch``, ``epochs``, ``log``, ``streams``,
        ``data_fingerprint``.

    Raises:
        ValueError: weights that do not match the sessions, or data the options cannot train on.
    """
    if weights is not None and len(weights) != len(sessions):
        raise ValueError(f"weights: {len(weights)} weights for {len(sessions)} sessions")
    out = Path(out)
    dist = D.setup(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed + 1000 * dist.rank)
    config = config or build_config(sessions, options)
    window_len = min(options.window_len, max(8, min(s.n_bins for s in sessions) // 4))
    streams = _training_streams(sessions, options, config, window_len)
    core, net = _build_net(config, streams, options)
    net = net.to(dist.device)
    train_net = _distributed(net, dist)
    opt, sched = _optimizer(net, options)
    info = {"epoch": 0, "step": 0, "best_val": float("inf"), "best_epoch": -1}
    if options.resume and out.with_suffix(".resume.safetensors").exists():
        info, rng = _resume(out, net=net, opt=opt, sched=sched, rng=rng, options=options, dist=dist)
    run = _Run(
        options=options,
        dist=dist,
        streams=streams,
        window_len=window_len,
        core=core,
        net=net,
        train_net=train_net,
        opt=opt,
        sched=sched,
        rng=rng,
        gen=torch.Generator().manual_seed(options.seed * 7919 + dist.rank + info["step"]),
        share=_stream_shares(streams, len(sessions), weights, options),
        info=info,
        out=out,
        fingerprint=fingerprint_sessions(sessions),
        sources=[s.source or s.session for s in sessions],
    )
    _train(run)
    D.teardown(dist)
    return _summary(run, spatial=bool(config.spatial_layers))


@dataclass(kw_only=True)
class _Run:
    """One pretraining run: what its loop reads, and ``info`` and the generators it advances."""

    options: PretrainOptions
    dist: D.DistInfo
    streams: list[Stream]
    window_len: int
    core: RPNT
    net: PretrainNet
    train_net: nn.Module  # ``net``, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator  # stream choice and window starts
    gen: torch.Generator  # masks
    share: np.ndarray  # (n_streams,) probability of each stream's batches
    info: dict  # epoch, step, best_val, best_epoch (what the resumable state stores)
    out: Path
    fingerprint: str
    sources: list[str]

    @property
    def log_path(self) -> Path:
        return self.out.with_suffix(".log.jsonl")

    @property
    def resume_path(self) -> Path:
        return self.out.with_suffix(".resume.safetensors")


def _summary(run: _Run, *, spatial: bool) -> dict:
    """What :func:`pretrain` returns, once the run has ended."""
    o = run.options
    floor = (
        mean_rate_val_loss(run.streams, window_len=run.window_len, seed=o.seed)
        if o.objective == "masked" and not spatial
        else None
    )
    return {
        "checkpoint": str(run.out),
        "best_val_loss": run.info["best_val"],
        "val_loss_mean_rate": floor,
        "best_epoch": run.info["best_epoch"],
        "epochs": run.info["epoch"],
        "log": str(run.log_path),
        "streams": len(run.streams),
        "data_fingerprint": run.fingerprint,
    }


def _training_streams(
    sessions: list[Session], options: PretrainOptions, config: RPNTConfig, window_len: int
) -> list[Stream]:
    """The sessions as training streams for ``config`` (multi-site ones only for a spatial model)."""
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
    return streams


def _build_net(
    config: RPNTConfig, streams: list[Stream], options: PretrainOptions
) -> tuple[RPNT, PretrainNet]:
    """The model, and the unit that trains it (with one read-in per stream in "readin" mode),
    its rate biases (and for a supervised run its target scale) set from the training bins."""
    core = RPNT(config)
    adapters = (
        {s.key: SessionAdapter(s.n_channels, config.d_model) for s in streams}
        if options.channels == "readin"
        else None
    )
    init_rate_biases(core, streams, adapters)  # (a resumed run loads its own weights over this)
    if options.supervised:
        init_target_normalisation(core, streams)
    return core, PretrainNet(core, adapters)


def _distributed(net: nn.Module, dist: D.DistInfo) -> nn.Module:
    """``net`` wrapped for DistributedDataParallel under torchrun, else ``net`` itself."""
    if not dist.enabled:
        return net
    return nn.parallel.DistributedDataParallel(
        net,
        device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up over ``warmup_steps``, then a cosine
    decay to 0.1 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _optimizer(
    net: PretrainNet, options: PretrainOptions
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the core (and the read-ins at ``adapter_lr_scale`` × ``lr``), with its schedule."""
    groups = [{"params": list(net.core.parameters())}]
    if len(net.adapters):
        groups.append(
            {"params": list(net.adapters.parameters()), "lr": options.lr * options.adapter_lr_scale}
        )
    opt = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    factor = partial(
        lr_factor, warmup_steps=options.warmup_steps, total_steps=options.epochs * options.steps_per_epoch
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _resume(
    out: Path,
    *,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    rng: np.random.Generator,
    options: PretrainOptions,
    dist: D.DistInfo,
) -> tuple[dict, np.random.Generator]:
    """Load the resumable state next to ``out`` into ``net``, ``opt``, ``sched`` and ``rng``;
    returns the run's ``info`` and this rank's generator."""
    info = load_training_state(out.with_suffix(".resume.safetensors"), module=net, optimizer=opt, rng=rng)
    sched.last_epoch = info["step"]
    for group in opt.param_groups:  # the schedule's value at the resumed step
        group["lr"] = group["initial_lr"] * sched.lr_lambdas[0](info["step"])
    if dist.rank:  # rank 0 saved its own generator; the others derive theirs from the step
        rng = np.random.default_rng(options.seed + 1000 * dist.rank + info["step"])
    return info, rng


def _stream_shares(
    streams: list[Stream], n_sessions: int, weights: list[float] | None, options: PretrainOptions
) -> np.ndarray:
    """:func:`batch_shares`, restricted to labelled streams for a supervised run."""
    share = batch_shares(streams, n_sessions=n_sessions, weights=weights, target_share=options.target_share)
    if options.objective == "supervised":  # batches only from recordings with labels
        share = share * np.array([st.labels is not None for st in streams])
        share = share / share.sum()
    return share


def _train(run: _Run) -> None:
    """Every remaining epoch of ``run``: its steps, then validation, files and the epoch's line."""
    o = run.options
    t_start = time.time()
    first_epoch = run.info["epoch"]
    # one bar over the whole run: its ETA is the run's (validation passes between epochs included)
    bar = tqdm(
        total=o.epochs * o.steps_per_epoch,
        initial=run.info["step"],
        desc="pretrain",
        unit="step",
        disable=not (o.progress and run.dist.is_main),
        dynamic_ncols=True,
    )
    try:
        for epoch in range(run.info["epoch"], o.epochs):
            running = _train_epoch(run, epoch, bar)
            val = validation_loss(
                run.net,
                run.core,
                run.streams,
                window_len=run.window_len,
                seed=o.seed,
                device=run.dist.device,
                contrastive_weight=o.contrastive_weight,
                objective=o.objective,
            )
            train_loss = D.mean_across(float(np.mean(running)), run.dist)
            improved = val < run.info["best_val"]
            if improved:
                run.info["best_val"], run.info["best_epoch"] = val, epoch
            run.info["epoch"] = epoch + 1
            if run.dist.is_main:
                _record_epoch(run, epoch, train_loss=train_loss, val=val, improved=improved, t_start=t_start)
                if o.progress:
                    elapsed = time.time() - t_start
                    eta = elapsed / (epoch + 1 - first_epoch) * (o.epochs - epoch - 1)
                    bar.write(
                        f"epoch {epoch + 1}/{o.epochs}  train {train_loss:.4f}  val {val:.4f}"
                        + ("  *best" if improved else "")
                        + f"  ({elapsed:.0f} s, ETA {eta:.0f} s)",
                        file=sys.stdout,
                    )
                    sys.stdout.flush()  # a pipe reader sees each epoch's line as it ends
            D.barrier(run.dist)
    finally:  # the bar ends before anything the caller prints (an interrupt's message)
        bar.close()


def _train_epoch(run: _Run, epoch: int, bar: tqdm) -> list[float]:
    """One epoch's optimizer steps; returns their losses."""
    o = run.options
    run.train_net.train()
    running = []
    for _ in range(o.steps_per_epoch):
        st = run.streams[int(run.rng.choice(len(run.streams), p=run.share))]
        counts, labels = st.sample(run.rng, batch_size=o.batch_size, length=run.window_len)
        loss = batch_loss(
            run.train_net,
            run.core,
            st,
            counts,
            gen=run.gen,
            device=run.dist.device,
            labels=labels,
            contrastive_weight=o.contrastive_weight,
            objective=o.objective,
        )
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(run.net.parameters(), o.grad_clip)
        run.opt.step()
        run.sched.step()
        run.info["step"] += 1
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(epoch=f"{epoch + 1}/{o.epochs}", loss=f"{running[-1]:.4f}")
    return running


def _record_epoch(
    run: _Run, epoch: int, *, train_loss: float, val: float, improved: bool, t_start: float
) -> None:
    """Rank 0's files after an epoch: the checkpoint when ``improved``, the log line, the resumable state."""
    o = run.options
    if improved:
        alignment, extra = session_alignment(run.streams, run.net.adapters)
        save_checkpoint(
            run.core,
            run.out,
            extra=extra,
            meta={
                **alignment,
                "kind": "pretrained",
                "data_fingerprint": run.fingerprint,
                "channels": o.channels,
                "supervised": o.supervised,
                "metrics": {"val_poisson_nll": val, "epoch": epoch},
                "pretrain_options": asdict(o) | {"config_overrides": dict(o.config_overrides)},
                "sessions": run.sources,
            },
        )
    line = {
        "epoch": epoch,
        "step": run.info["step"],
        "train_loss": train_loss,
        "val_loss": val,
        "lr": run.sched.get_last_lr()[0],
        "best": improved,
        "elapsed_s": round(time.time() - t_start, 2),
    }
    with run.log_path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    save_training_state(run.resume_path, module=run.net, optimizer=run.opt, info=run.info, rng=run.rng)
