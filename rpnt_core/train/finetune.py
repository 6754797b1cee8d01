"""Supervised finetuning of the decoder: few-shot (FS-SFT) or full SFT.

``finetune(session, init=CKPT | None, options=..., out=...)``:

- Decodes the session's chosen target (``session.target``: velocity, position, force, EMG, ...;
  see :meth:`Session.with_target`).  The model's config records it (``config.target``, with its
  dimension as ``n_outputs``), so evaluation, export and the daemon know what the head holds; the
  head and its output keep the name ``velocity`` in code.
- Splits the session in time with :func:`contiguous_splits`: test = last ``test_fraction``,
  validation just before it, train = the first ``train_fraction`` (a few-shot split is a short
  prefix; the test bins do not depend on ``train_fraction``).
- Builds the model: from scratch (``init=None``, preset sized to the session), or from a
  checkpoint.  A pretrained model of a different width meets the session either through channel
  resampling (``channels="resample"``: a fixed channel map stored in the config, all weights
  kept) or a per-session read-in (``channels="readin"``: read-in and Poisson read-out sized to
  the session's channel count).  A session the pretraining run already saw (its unlabelled bins,
  matched by session name and channel count, see :func:`seen_in_pretraining`) meets the model
  the way it did then: the same channel map, or its own pretrained read-in from the checkpoint.
  Otherwise the map is drawn with ``seed`` and a read-in is fresh (and always trained).  A
  checkpoint pretrained with per-session read-ins has no trained shared read-in, so it is always
  met through a read-in.  A checkpoint trained at another bin width is refused
  (:func:`~rpnt_core.data.session.check_bin_width`).
- Trains ``mode`` = "head" (velocity head; encoder frozen in eval mode), "last" (head + final
  norm + last ``last_layers`` blocks) or "full", MSE on z-scored targets, random windows of the
  train split, AdamW with cosine decay.
- A checkpoint that is already a decoder (:func:`~rpnt_core.checkpoint.is_decoder`: supervised
  pretraining, or a finetuned / from-scratch decoder such as the live model ``POST /calibrate``
  starts from) of the same target, output width and input width (the same array) keeps its head
  and the target normalisation it was trained with (a head is tied to the units it read: on another unit set — Nick 2 met through a
  channel map of a Spike-pool model — the kept head and the pool's target scale decoded far below
  every other decoder, the transfer benchmark's Nick rows); the decoder as it is is the first
  candidate for the best-validation weights, and the core learns at
  :data:`KEPT_HEAD_CORE_LR_SCALE` × ``lr`` (the head and a fresh read-in at ``lr``).  Otherwise
  the head is fresh, the target is z-scored by the train split and everything learns at ``lr``.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import is_decoder, load_checkpoint, read_extra_tensors, read_header, save_checkpoint
from ..config import RPNTConfig
from ..data.channels import ChannelResampler
from ..data.normalise import sqrt_count_stats
from ..data.session import Session, check_bin_width, conditioning_metadata
from ..data.splits import Splits, contiguous_splits
from ..evaluate.harness import evaluate_model, predict_range, score, session_metadata, target_labels
from ..model.rpnt import RPNT
from .choices import FINETUNE_MODES
from .distributed import resolve_device
from .objectives import velocity_mse

# Training sized to a short block of labels (a new day's calibration): the budget the cross-day
# transfer benchmark measured (bench/bench_transfer.py), see FinetuneOptions.for_labels.
# A kept head (the checkpoint already decodes the target) moves its core at this fraction of the
# learning rate; a fresh head trains the core at the full rate (bench/results/transfer-rank-seed0:
# a self-supervised core at 0.1× stayed far below 1×, a supervised pool decoder at 0.1× won).
KEPT_HEAD_CORE_LR_SCALE = 0.1
LABEL_BUDGET = {
    "epochs": 10,
    "max_steps": 10,
    "bins_per_step": 150,
    "batch_size": 8,
    "window_len": 64,
    "patience": 4,
}


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    mode: str = "full"
    last_layers: int = 1
    epochs: int = 40
    steps_per_epoch: int = 20
    batch_size: int = 16
    window_len: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 8
    train_fraction: float = 0.2
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    channels: str = "resample"
    preset: str = "small"  # used when training from scratch
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    config_overrides: tuple[tuple[str, object], ...] = ()
    core_lr_scale: float | None = None  # a kept head's core lr ÷ lr; None: KEPT_HEAD_CORE_LR_SCALE

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"mode: expected one of {', '.join(FINETUNE_MODES)}, got {self.mode!r}")
        if self.channels not in ("resample", "readin"):
            raise ValueError(f"channels: expected 'resample' or 'readin', got {self.channels!r}")
        for name in ("epochs", "batch_size", "window_len", "patience", "last_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.core_lr_scale is not None and not 0 < self.core_lr_scale <= 1:
            raise ValueError(f"core_lr_scale: must be in (0, 1], got {self.core_lr_scale}")

    @classmethod
    def for_labels(
        cls, n_train_bins: int, *, budget: dict | None = None, **overrides: object
    ) -> "FinetuneOptions":
        """Options sized to ``n_train_bins`` labelled train bins (``budget``, default
        :data:`LABEL_BUDGET`): one step per ``bins_per_step`` bins, between 1 and ``max_steps`` per
        epoch; ``overrides`` win."""
        b = budget or LABEL_BUDGET
        steps = int(min(max(n_train_bins // b["bins_per_step"], 1), b["max_steps"]))
        return cls(
            **{
                "epochs": b["epochs"],
                "steps_per_epoch": steps,
                "batch_size": b["batch_size"],
                "window_len": b["window_len"],
                "patience": b["patience"],
                **overrides,
            }
        )


def _session_vocab(session: Session, attr: str) -> tuple[str, ...]:
    v = getattr(session, attr)
    return (v,) if v else ()


def seen_in_pretraining(session: Session, meta: dict) -> dict | None:
    """How a pretraining run presented ``session`` (same name and channel count), if it did.

    ``{"mode": "resample", "seed": S, ...}``: its channel map (reused, so its columns mean what
    they meant in pretraining); ``{"mode": "readin", ...}``: its per-session read-in is stored in
    the checkpoint (reused instead of a fresh one).  See ``pretrain.session_alignment``."""
    info = (meta.get("session_channels") or {}).get(session.session) if session.session else None
    return info if info and int(info.get("n_channels", -1)) == session.n_channels else None


def build_model(
    session: Session, init: str | Path | None, options: FinetuneOptions
) -> tuple[RPNT, bool, dict]:
    """The model to finetune, whether its read-in is fresh, and provenance for the metadata."""
    n_in, d_out = session.n_channels, session.n_outputs
    overrides = {"target": session.target, **dict(options.config_overrides)}
    if init is None:
        cfg = RPNTConfig.preset(
            options.preset,
            n_channels=n_in,
            n_outputs=d_out,
            bin_s=float(session.bin_s),
            subjects=_session_vocab(session, "subject"),
            sessions=_session_vocab(session, "session"),
            tasks=_session_vocab(session, "task"),
            **overrides,
        )
        return RPNT(cfg), True, {"init": None, "head": "fresh"}
    base_cfg, base_meta = read_header(init)
    base = load_checkpoint(init)
    if base_cfg.spatial_layers:
        base_cfg = base_cfg.replace(spatial_layers=0)  # decode from the temporal encoder (single-site)
    check_bin_width(data_bin_s=session.bin_s, model_bin_s=base_cfg.bin_s)
    provenance = {
        "init": str(init),
        "parent_weights_sha": base_meta.get("weights_sha", ""),
        "parent_kind": base_meta.get("kind", ""),
    }
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("spatial.")}
    seen = seen_in_pretraining(session, base_meta)
    readin_pretrained = base_meta.get("channels") == "readin"
    fresh_read_in = False
    if base_cfg.n_input_channels == n_in and not readin_pretrained:
        cfg = base_cfg.replace(n_outputs=d_out, **overrides)
    elif options.channels == "resample" and not readin_pretrained:
        seed = seen["seed"] if seen and seen["mode"] == "resample" else options.seed
        rs = ChannelResampler(n_channels=n_in, n_max=base_cfg.n_channels, seed=seed)
        cfg = base_cfg.replace(
            n_outputs=d_out, input_channels=n_in, channel_map=tuple(int(i) for i in rs.index), **overrides
        )
        provenance["channel_seed"] = seed
    else:
        cfg = base_cfg.replace(
            n_channels=n_in, n_outputs=d_out, input_channels=0, channel_map=(), **overrides
        )
        state = {k: v for k, v in state.items() if not k.startswith(("read_in.", "rate_out."))}
        if seen and seen["mode"] == "readin":  # the read-in this session got in pretraining
            prefix = f"readin.{session.session}."
            state.update({k.removeprefix(prefix): v for k, v in read_extra_tensors(init, prefix).items()})
        else:
            fresh_read_in = True
    provenance["read_in"] = (
        "fresh" if fresh_read_in else "pretrained, this session" if seen else "pretrained, shared"
    )
    keep_head = (
        is_decoder(base_meta)
        and base_cfg.target == session.target
        and base_cfg.n_outputs == d_out
        and base_cfg.n_input_channels == n_in
    )
    provenance["head"] = "pretrained" if keep_head else "fresh"
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("velocity_")}
    if base_cfg.input_norm:  # the new recording's statistics are set by fit_decoder, not the pool's
        state = {k: v for k, v in state.items() if not k.startswith("input_")}
    model = RPNT(cfg)
    model.load_state_dict(state, strict=False)
    return model, fresh_read_in, provenance


def _set_train_modes(model: RPNT, mode: str, last_layers: int, fresh_read_in: bool) -> list[nn.Parameter]:
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
    bin before ``splits.test`` for the input statistics (counts only, no labels).  Returns the
    model (eval mode) and ``{"val_r2", "best_epoch", "epochs_run", "history", "train_seconds",
    **provenance}``."""
    session = session.with_target(None)  # "target: ... has no 'force'" when the session lacks its target
    if session.multisite:
        raise ValueError("counts: finetuning decodes single-site recordings (T, N)")
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    dev = resolve_device(options.device)
    model, fresh_read_in, provenance = build_model(session, init, options)
    lo, hi = splits.train
    set_input_statistics(model, session.counts[: splits.test[0]])
    vel = np.asarray(session.labels, dtype=np.float32)
    if provenance["head"] == "fresh":  # a pretrained head keeps the normalisation it was trained with
        mean, scale = vel[lo:hi].mean(0), vel[lo:hi].std(0) + 1e-6
        model.set_velocity_normalisation(torch.from_numpy(mean), torch.from_numpy(scale))
    mean, scale = model.velocity_mean.numpy().copy(), model.velocity_scale.numpy().copy()
    model.to(dev)
    params = _set_train_modes(model, options.mode, options.last_layers, fresh_read_in)
    counts_t = torch.from_numpy(np.asarray(session.counts, dtype=np.float32))
    vel_t = torch.from_numpy(vel)
    window_len = min(options.window_len, hi - lo)
    if window_len < 4:
        raise ValueError(f"train_fraction: the train split has only {hi - lo} bins")
    steps = options.steps_per_epoch
    kept = KEPT_HEAD_CORE_LR_SCALE if options.core_lr_scale is None else float(options.core_lr_scale)
    provenance["core_lr_scale"] = kept if provenance["head"] == "pretrained" else 1.0
    head_ids = {id(p) for p in model.velocity_head.parameters()}
    if fresh_read_in or init is None:
        head_ids |= {id(p) for p in model.read_in.parameters()}
    groups = [
        {"params": [p for p in params if id(p) in head_ids], "lr": options.lr},
        {
            "params": [p for p in params if id(p) not in head_ids],
            "lr": options.lr * provenance["core_lr_scale"],
        },
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=options.epochs * steps, eta_min=0.0)
    meta = {k: v.to(dev) for k, v in session_metadata(model, session).items()}
    m_t, s_t = torch.from_numpy(mean).to(dev), torch.from_numpy(scale).to(dev)
    best = {"val_r2": -math.inf, "epoch": -1, "state": None}
    if provenance["head"] == "pretrained":  # the pretrained decoder as it is is the first candidate
        model.eval()
        best = {
            "val_r2": validation_r2(model, session, splits),
            "epoch": -1,
            "state": copy.deepcopy(model.state_dict()),
        }
        _set_train_modes(model, options.mode, options.last_layers, fresh_read_in)
    history = []
    t0 = time.time()
    bad = 0
    for epoch in range(options.epochs):
        losses = []
        for _ in tqdm(
            range(steps),
            desc=f"finetune {epoch + 1}/{options.epochs}",
            leave=False,
            disable=not options.progress,
        ):
            starts = rng.integers(lo, hi - window_len + 1, size=options.batch_size)
            idx = torch.as_tensor(starts)[:, None] + torch.arange(window_len)[None, :]
            x, y = counts_t[idx].to(dev), vel_t[idx].to(dev)  # (B, L, N), (B, L, D)
            bmeta = {k: v.expand(options.batch_size) for k, v in meta.items()}
            loss = velocity_mse(model(x, bmeta)["velocity"], y, mean=m_t, scale=s_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        val_r2 = validation_r2(model, session, splits)
        _set_train_modes(model, options.mode, options.last_layers, fresh_read_in)
        history.append({"epoch": epoch, "train_mse": float(np.mean(losses)), "val_r2": val_r2})
        if on_epoch is not None:
            on_epoch({**history[-1], "epochs": options.epochs, "best": val_r2 > best["val_r2"]})
        if options.progress:
            print(
                f"epoch {epoch + 1}/{options.epochs}  train mse {np.mean(losses):.4f}  val R² {val_r2:.4f}"
                + ("  *best" if val_r2 > best["val_r2"] else ""),
                flush=True,
            )
        if val_r2 > best["val_r2"]:
            best = {"val_r2": val_r2, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            bad = 0
        else:
            bad += 1
            if bad >= options.patience:
                break
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


def finetune(
    session: Session,
    *,
    init: str | Path | None,
    options: FinetuneOptions,
    out: str | Path | None,
    splits: Splits | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Finetune on one labelled session; returns metrics (test R² of the best-validation weights).

    ``on_epoch``: called after every epoch with ``{"epoch", "epochs", "train_mse", "val_r2", "best"}``
    (progress reporting, e.g. a calibration job's progress file)."""
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
