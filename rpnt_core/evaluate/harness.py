"""One harness for RPNT and the baselines: same session, same splits, same R².

Offline evaluation scores what the online decoder would have said: predictions come from
streaming the session causally from its first bin (``RPNT.predict_stream``, proven equal to
``step``; baselines' ``predict``, proven equal to their ``step``), and R² is computed on the test
bins with :func:`rpnt_core.evaluate.metrics.r2_score` (pooled, variance-weighted across dims).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.session import Session
from ..data.splits import Splits
from ..model.rpnt import RPNT
from .metrics import r2_per_dim, r2_score


def target_labels(model: RPNT, session: Session) -> np.ndarray:
    """The session's series of the behaviour the model decodes (``config.target``).

    Returns:
        (T, D) labels.
    Raises:
        ValueError: starting with ``target:`` when the session lacks that series or its width
            differs from the model's outputs (e.g. 14 EMG channels on a day the model had 16).
    """
    labels = session.with_target(model.config.target).labels
    if labels.shape[1] != model.config.n_outputs:
        raise ValueError(
            f"target: {session.name}'s {model.config.target} has {labels.shape[1]} dimensions, the "
            f"model decodes {model.config.n_outputs}"
        )
    return labels


def session_metadata(model: RPNT, session: Session) -> dict[str, torch.Tensor]:
    """The model's conditioning tensors for the session's subject, session, task and date."""
    return model.metadata_for(
        subject=session.subject, session=session.session, task=session.task, date_days=session.date_days
    )


@torch.no_grad()
def predict_session(
    model: RPNT, session: Session, *, stop: int | None = None, output: str = "velocity"
) -> np.ndarray:
    """One of the model's outputs for bins [0, stop), streamed causally from bin 0.

    Args:
        model: the model.
        session: the session to decode.
        stop: the end bin (``None``: the whole session).
        output: ``"velocity"`` is the decoded target, whatever ``config.target`` names; or another
            output, e.g. ``"latent"``.
    Returns:
        (T', D) for the decoded target, (T', d) for ``"latent"``, with T' = ``stop``.
    """
    stop = session.n_bins if stop is None else stop
    counts = torch.from_numpy(np.asarray(session.counts[:stop], dtype=np.float32))[None]  # (1, T', N)
    dev = next(model.parameters()).device
    out = model.predict_stream(
        counts.to(dev), {k: v.to(dev) for k, v in session_metadata(model, session).items()}
    )
    return out[output][0].cpu().numpy()


@torch.no_grad()
def predict_range(
    model: RPNT, session: Session, start: int, stop: int, *, output: str = "velocity"
) -> np.ndarray:
    """:func:`predict_session`'s output for bins [start, stop) only.

    Identical to streaming from bin 0, computed from ``receptive_field − 1`` bins of history only
    (no output depends on anything older).

    Returns:
        (stop − start, D) (or (stop − start, d) for ``"latent"``).
    """
    lo = max(0, start - (model.receptive_field - 1))
    counts = torch.from_numpy(np.asarray(session.counts[lo:stop], dtype=np.float32))[None]
    dev = next(model.parameters()).device
    out = model.predict_stream(
        counts.to(dev), {k: v.to(dev) for k, v in session_metadata(model, session).items()}
    )
    return out[output][0, start - lo :].cpu().numpy()


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """``{"r2": pooled R², "r2_per_dim": [R² per column]}`` of (T, D) predictions."""
    return {
        "r2": float(r2_score(y_true, y_pred)),
        "r2_per_dim": [float(x) for x in r2_per_dim(y_true, y_pred)],
    }


def evaluate_model(model: RPNT, session: Session, splits: Splits, *, split: str = "test") -> dict:
    """R² of ``model`` on one split of ``session``.

    The session is streamed from bin 0 and scored against its series of the model's target
    (:func:`target_labels`).

    Args:
        model: the model.
        session: the session.
        splits: its splits.
        split: ``"train"``, ``"val"`` or ``"test"``.
    Returns:
        :func:`score`'s ``r2``/``r2_per_dim`` plus ``split``, ``splits``, ``n_bins``, ``target``.
    """
    labels = target_labels(model, session)
    lo, hi = getattr(splits, split)
    pred = predict_session(model, session, stop=hi)[lo:hi]
    return {
        **score(labels[lo:hi], pred),
        "split": split,
        "splits": splits.as_dict(),
        "n_bins": session.n_bins,
        "target": model.config.target,
    }


def evaluate_baseline(name: str, session: Session, splits: Splits, *, seed: int = 0, **hyper) -> dict:
    """Fit a classic baseline to the session's chosen target and score the test split.

    Args:
        name: a key of :data:`~rpnt_core.evaluate.baselines.BASELINES`.
        session: the session; its ``target`` is decoded.
        splits: fit on ``train``, select on ``val``, score ``test`` (streamed from bin 0).
        seed: passed to the baseline's ``fit``.
        **hyper: the baseline's own hyper-parameters (e.g. :class:`~rpnt_core.evaluate.baselines.GRUOptions` fields).
    Returns:
        :func:`score`'s ``r2``/``r2_per_dim`` plus ``split``, ``splits``, ``target``.
    Raises:
        ValueError: an unknown baseline, or a session without its target.
    """
    from .baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"baseline: unknown {name!r}; choose from {sorted(BASELINES)}")
    session = session.with_target(None)  # a clear error when the session lacks its target
    parts = splits.cut(session)
    dec = BASELINES[name].fit(
        train_counts=parts["train"].counts,
        train_velocity=parts["train"].labels,
        val_counts=parts["val"].counts,
        val_velocity=parts["val"].labels,
        bin_s=session.bin_s,
        seed=seed,
        **hyper,
    )
    lo, hi = splits.test
    pred = dec.predict(np.asarray(session.counts[:hi]))[lo:hi]  # streamed from bin 0, like RPNT
    return {
        **score(session.labels[lo:hi], pred),
        "split": "test",
        "splits": splits.as_dict(),
        "target": session.target,
    }
