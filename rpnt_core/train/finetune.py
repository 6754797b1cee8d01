"""Supervised finetuning of the decoder: few-shot (FS-SFT) or full SFT.

``finetune(session, init=CKPT | None, options=..., out=...)``:

- Decodes the session's chosen target (``session.target``: velocity, position, force, EMG, ...;
  see :meth:`Session.with_target`).  The model's config records it (``config.target``, with its
  dimension as ``n_outputs``), so evaluation, export and the daemon know what the head holds; the
  head and its output keep the name ``velocity`` in code.
- Splits the session in time with :func:`contiguous_splits`: test = last ``test_fraction``,
  validation just before it, train = the first ``train_fraction`` (a few-shot split is a short
  prefix; the test bins do not depend on ``train_fraction``).
- Builds the model with :func:`~rpnt_core.train.finetune_model.build_model`: from scratch
  (``init=None``) or from a checkpoint, meeting the session's channels and keeping a decoder's
  head where it fits (the rules are in that module).
- Trains ``mode`` = "head" (velocity head; encoder frozen in eval mode), "last" (head + final
  norm + last ``last_layers`` blocks) or "full", MSE on z-scored targets, random windows of the
  train split, AdamW with cosine decay.
- A kept head (the checkpoint already decodes the target) keeps the target normalisation it was
  trained with, the decoder as it is is the first candidate for the best-validation weights, and
  the core learns at :data:`KEPT_HEAD_CORE_LR_SCALE` × ``lr`` (the head and a fresh read-in at
  ``lr``).  Otherwise the head is fresh, the target is z-scored by the train split and everything
  learns at ``lr``.
- An ``input_norm`` model takes its input statistics from the session's bins before the test
  split (counts only; :func:`set_input_statistics`).
- :func:`fit_decoder` is the training alone (model + summary, no test score, no file), for
  callers that keep their own test bins out of reach (``bench/bench_transfer.py``).
- Early-stops on validation R² (streamed, exact) and reports the **test R² of the
  best-validation weights**, not the last epoch's.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..data.normalise import sqrt_count_stats
from ..data.session import Session, conditioning_metadata
from ..data.splits import Splits, contiguous_splits
from ..evaluate.harness import evaluate_model, predict_range, score, session_metadata, target_labels
from ..model.rpnt import RPNT
from .distributed import resolve_device
from .finetune_model import build_model
from .objectives import velocity_mse
from .options import FinetuneOptions

# A kept head (the checkpoint already decodes the target) moves its core at this fraction of the
# learning rate; a fresh head trains the core at the full rate (CHANGELOG: encoder_lr_scale).
KEPT_HEAD_CORE_LR_SCALE = 0.1


def _set_train_modes(model: RPNT, mode: str, last_layers: int, fresh_read_in: bool) -> list[nn.Parameter]:
    """Make the parameters of finetuning ``mode`` the only trainable ones and put the modules that
    own them in training mode (frozen parts stay in eval mode: no dropout); returns them."""
    params = model.trainable_for(mode, last_layers=last_layers, read_in=fresh_read_in)
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    model.eval()
    if mode == "full":
        model.train()
    else:  # frozen parts stay in eval mode (no dropout); trained sub-modules train
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if own and all(id(p) in ids for p in own):
                m.train()
    return params


def validation_r2(model: RPNT, session: Session, splits: Splits) -> float:
    """R² of ``model`` (in eval mode) on the validation split, as the stream gives it."""
    lo, hi = splits.val
    labels = target_labels(model, session)
    return score(np.asarray(labels[lo:hi], dtype=np.float32), predict_range(model, session, lo, hi))["r2"]


def model_columns(model: RPNT, counts: np.ndarray) -> np.ndarray:
    """(T, N_in) counts as the model's read-in sees them: (T, n_channels), through its channel map."""
    idx = model.config.channel_map
    return np.asarray(counts)[:, list(idx)] if idx else np.asarray(counts)


def set_input_statistics(model: RPNT, counts: np.ndarray) -> None:
    """Set an ``input_norm`` model's statistics from unlabelled ``counts`` (T, N_in) of the recording
    it will decode (no-op for other models)."""
    if model.config.input_norm:
        mean, scale = sqrt_count_stats(model_columns(model, counts))
        model.set_input_normalisation(torch.from_numpy(mean), torch.from_numpy(scale))


def fit_decoder(
    session: Session,
    *,
    init: str | Path | None,
    options: FinetuneOptions,
    splits: Splits,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[RPNT, dict]:
    """Train a decoder on ``splits.train`` and keep the weights of the best ``splits.val`` R².

    Labels are read from the train and validation ranges only.  Counts are read from the train
    windows, the validation range (with its history), and — for an ``input_norm`` model — every
    bin before ``splits.test`` for the input statistics (counts only, no labels).

    Args:
        session: the labelled session, with its chosen target (single-site).
        init: the checkpoint to start from (see :func:`build_model`), or None.
        options: how to train.
        splits: where to train, validate and (never read here) test.
        on_epoch: called after every epoch with ``{"epoch", "epochs", "train_mse", "val_r2", "best"}``.

    Returns:
        The model (eval mode, every parameter trainable again) and ``{"val_r2", "best_epoch",
        "epochs_run", "history", "train_seconds", **provenance}``.

    Raises:
        ValueError: a multi-site session, a session without its target, or a train split too short
            for a window.
    """
    session = session.with_target(None)  # "target: ... has no 'force'" when the session lacks its target
    if session.multisite:
        raise ValueError("counts: finetuning decodes single-site recordings (T, N)")
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    dev = resolve_device(options.device)
    model, fresh_read_in, provenance = build_model(session, init, options)
    _set_normalisations(model, session, splits, fresh_head=provenance["head"] == "fresh")
    model.to(dev)
    params = _set_train_modes(model, options.mode, options.last_layers, fresh_read_in)
    batches = _Batches(model, session, splits, options, rng=rng, device=dev)
    provenance["core_lr_scale"] = KEPT_HEAD_CORE_LR_SCALE if provenance["head"] == "pretrained" else 1.0
    opt, sched = _optimizer(
        model,
        params,
        options,
        core_lr_scale=provenance["core_lr_scale"],
        fresh_read_in=fresh_read_in or init is None,
    )
    retrain = partial(_set_train_modes, model, options.mode, options.last_layers, fresh_read_in)
    validate = partial(_val_r2, model, session, splits, retrain)
    best: dict[str, Any] = {"val_r2": -math.inf, "epoch": -1, "state": None}
    if provenance["head"] == "pretrained":  # the pretrained decoder as it is is the first candidate
        best = {"val_r2": validate(), "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    t0 = time.time()
    best, history = _early_stopping(
        model,
        options,
        train_epoch=partial(_train_epoch, model, opt, sched, params, batches, options),
        validate=validate,
        best=best,
        on_epoch=on_epoch,
    )
    model.load_state_dict(best["state"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {
        "val_r2": best["val_r2"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "history": history,
        "train_seconds": round(time.time() - t0, 2),
        **provenance,
    }


def _optimizer(
    model: RPNT,
    params: list[nn.Parameter],
    options: FinetuneOptions,
    *,
    core_lr_scale: float,
    fresh_read_in: bool,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` with cosine decay: the head (and a fresh read-in) at ``lr``, the rest of
    the trained parameters at ``core_lr_scale`` × ``lr``."""
    fresh_ids = {id(p) for p in model.velocity_head.parameters()}
    if fresh_read_in:
        fresh_ids |= {id(p) for p in model.read_in.parameters()}
    groups = [
        {"params": [p for p in params if id(p) in fresh_ids], "lr": options.lr},
        {"params": [p for p in params if id(p) not in fresh_ids], "lr": options.lr * core_lr_scale},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=options.epochs * options.steps_per_epoch, eta_min=0.0
    )
    return opt, sched


def _early_stopping(
    model: RPNT,
    options: FinetuneOptions,
    *,
    train_epoch: Callable[[int], float],
    validate: Callable[[], float],
    best: dict,
    on_epoch: Callable[[dict], None] | None,
) -> tuple[dict, list[dict]]:
    """Epochs until ``options.patience`` of them bring no validation gain over ``best``.

    Returns:
        The best candidate (``val_r2``, ``epoch``, ``state``: a copy of the weights) and one
        history row per epoch run.
    """
    history: list[dict] = []
    bad = 0
    for epoch in range(options.epochs):
        train_mse = train_epoch(epoch)
        val_r2 = validate()
        improved = val_r2 > best["val_r2"]
        history.append({"epoch": epoch, "train_mse": train_mse, "val_r2": val_r2})
        _report_epoch(history[-1], options, improved=improved, on_epoch=on_epoch)
        if improved:
            best, bad = {"val_r2": val_r2, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}, 0
        else:
            bad += 1
            if bad >= options.patience:
                break
    return best, history


def _set_normalisations(model: RPNT, session: Session, splits: Splits, *, fresh_head: bool) -> None:
    """Input statistics from every bin before the test split (``input_norm`` models); for a fresh
    head, the target's mean and spread over the train split (a kept head keeps its own)."""
    set_input_statistics(model, session.counts[: splits.test[0]])
    if fresh_head:
        lo, hi = splits.train
        vel = np.asarray(session.labels, dtype=np.float32)
        mean, scale = vel[lo:hi].mean(0), vel[lo:hi].std(0) + 1e-6
        model.set_velocity_normalisation(torch.from_numpy(mean), torch.from_numpy(scale))


class _Batches:
    """Random training windows of the train split, with the session's metadata and the target
    scale of ``model`` (on ``device``, fixed for the whole run)."""

    def __init__(
        self,
        model: RPNT,
        session: Session,
        splits: Splits,
        options: FinetuneOptions,
        *,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        self.lo, self.hi = splits.train
        self.window_len = min(options.window_len, self.hi - self.lo)
        if self.window_len < 4:
            raise ValueError(f"train_fraction: the train split has only {self.hi - self.lo} bins")
        self.batch_size, self.rng, self.device = options.batch_size, rng, device
        self.counts = torch.from_numpy(np.asarray(session.counts, dtype=np.float32))  # (T, N)
        self.labels = torch.from_numpy(np.asarray(session.labels, dtype=np.float32))  # (T, D)
        self.meta = {k: v.to(device) for k, v in session_metadata(model, session).items()}
        self.mean = model.velocity_mean.detach().clone()
        self.scale = model.velocity_scale.detach().clone()

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """counts (B, L, N), labels (B, L, D) and metadata (B,) of one random batch."""
        starts = self.rng.integers(self.lo, self.hi - self.window_len + 1, size=self.batch_size)
        idx = torch.as_tensor(starts)[:, None] + torch.arange(self.window_len)[None, :]  # (B, L)
        x, y = self.counts[idx].to(self.device), self.labels[idx].to(self.device)
        return x, y, {k: v.expand(self.batch_size) for k, v in self.meta.items()}


def _train_epoch(
    model: RPNT,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    batches: _Batches,
    options: FinetuneOptions,
    epoch: int,
) -> float:
    """One epoch's optimizer steps; returns their mean loss."""
    losses = []
    for _ in tqdm(
        range(options.steps_per_epoch),
        desc=f"finetune {epoch + 1}/{options.epochs}",
        leave=False,
        disable=not options.progress,
    ):
        x, y, meta = batches.sample()
        loss = velocity_mse(model(x, meta)["velocity"], y, mean=batches.mean, scale=batches.scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def _val_r2(model: RPNT, session: Session, splits: Splits, retrain: Callable[[], object]) -> float:
    """:func:`validation_r2` in eval mode, then back to the training modes (``retrain``)."""
    model.eval()
    r2 = validation_r2(model, session, splits)
    retrain()
    return r2


def _report_epoch(
    row: dict, options: FinetuneOptions, *, improved: bool, on_epoch: Callable[[dict], None] | None
) -> None:
    if on_epoch is not None:
        on_epoch({**row, "epochs": options.epochs, "best": improved})
    if options.progress:
        print(
            f"epoch {row['epoch'] + 1}/{options.epochs}  train mse {row['train_mse']:.4f}  val R² {row['val_r2']:.4f}"
            + ("  *best" if improved else ""),
            flush=True,
        )


def finetune(
    session: Session,
    *,
    init: str | Path | None,
    options: FinetuneOptions,
    out: str | Path | None,
    splits: Splits | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Finetune on one labelled session and score the best-validation weights on its test split.

    Args:
        session: the labelled session, with its chosen target.
        init: the checkpoint to start from, or None for a model from scratch.
        options: how to train (and, without ``splits``, the split fractions).
        out: checkpoint path to write (with ``<out>.history.json``), or None to write nothing.
        splits: the splits (default: :func:`contiguous_splits` with the options' fractions).
        on_epoch: called after every epoch with ``{"epoch", "epochs", "train_mse", "val_r2",
            "best"}`` (progress reporting, e.g. a calibration job's progress file).

    Returns:
        ``target``, the metrics (``val_r2``, ``best_epoch``, ``epochs_run``, ``test_r2``,
        ``test_r2_per_dim``, ``train_seconds``), ``splits``, ``history``, the provenance, ``mode``,
        ``channels`` and, with ``out``, ``checkpoint``.
    """
    session = session.with_target(None)
    splits = splits or contiguous_splits(
        session.n_bins,
        train_fraction=options.train_fraction,
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
    )
    model, fit = fit_decoder(session, init=init, options=options, splits=splits, on_epoch=on_epoch)
    history = fit.pop("history")
    provenance = {
        k: v for k, v in fit.items() if k not in ("val_r2", "best_epoch", "epochs_run", "train_seconds")
    }
    test = evaluate_model(model, session, splits)
    metrics = {
        "val_r2": fit["val_r2"],
        "best_epoch": fit["best_epoch"],
        "epochs_run": fit["epochs_run"],
        "test_r2": test["r2"],
        "test_r2_per_dim": test["r2_per_dim"],
        "train_seconds": fit["train_seconds"],
    }
    result = {
        "target": session.target,
        **metrics,
        "splits": splits.as_dict(),
        "history": history,
        **provenance,
        "mode": options.mode,
        "channels": options.channels if provenance["init"] else "native",
    }
    if out is not None:
        save_finetuned(
            model,
            out,
            session=session,
            options=options,
            splits=splits,
            metrics=metrics,
            provenance=provenance,
        )
        Path(str(out) + ".history.json").write_text(json.dumps(history))
        result["checkpoint"] = str(out)
    return result


def save_finetuned(
    model: RPNT,
    out: str | Path,
    *,
    session: Session,
    options: FinetuneOptions,
    splits: Splits,
    metrics: dict,
    provenance: dict,
) -> None:
    """Save a model :func:`fit_decoder` trained on ``session`` (moved to the CPU) with the metadata
    :func:`finetune` records: kind, data fingerprint, ``metrics``, splits, provenance, conditioning
    metadata, options."""
    save_checkpoint(
        model.cpu(),
        out,
        meta={
            "kind": "finetuned" if provenance["init"] else "scratch",
            "data_fingerprint": session.fingerprint(),
            "metrics": metrics,
            "splits": splits.as_dict(),
            "source": session.source,
            **provenance,
            "metadata": conditioning_metadata(session),
            "finetune_options": asdict(options) | {"config_overrides": dict(options.config_overrides)},
        },
    )
