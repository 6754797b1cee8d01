"""The model finetuning starts from, and how it meets a session's channels.

Builds the model: from scratch (``init=None``, preset sized to the session), or from a
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

A checkpoint that is already a decoder (:func:`~rpnt_core.checkpoint.is_decoder`: supervised
pretraining, or a finetuned / from-scratch decoder such as the live model ``POST /calibrate``
starts from) of the same target, output width and input width (the same array) keeps its head
(provenance ``head: "pretrained"``); a head is tied to the units it read, so another input width
means a fresh head.  An ``input_norm`` checkpoint's input statistics are dropped: the new
recording's are set before training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import is_decoder, load_checkpoint, read_extra_tensors, read_header
from ..config import RPNTConfig
from ..data.channels import ChannelResampler
from ..data.session import Session, check_bin_width
from ..model.rpnt import RPNT
from .options import FinetuneOptions


def _session_vocab(session: Session, attr: str) -> tuple[str, ...]:
    """A one-name vocabulary of the session's ``subject``/``session``/``task`` (empty if unnamed)."""
    v = getattr(session, attr)
    return (v,) if v else ()


def seen_in_pretraining(session: Session, meta: dict) -> dict | None:
    """How a pretraining run presented ``session`` (same name and channel count), if it did.

    Args:
        session: the session to finetune on.
        meta: the checkpoint's metadata (see :func:`~rpnt_core.train.pretrain.session_alignment`).

    Returns:
        ``{"mode": "resample", "seed": S, ...}``: its channel map (reused, so its columns mean what
        they meant in pretraining); ``{"mode": "readin", ...}``: its per-session read-in is stored
        in the checkpoint (reused instead of a fresh one); None when the run did not see it.
    """
    info = (meta.get("session_channels") or {}).get(session.session) if session.session else None
    return info if info and int(info.get("n_channels", -1)) == session.n_channels else None


def build_model(
    session: Session, init: str | Path | None, options: FinetuneOptions
) -> tuple[RPNT, bool, dict]:
    """The model to finetune on ``session`` (see the module docstring for the rules).

    Args:
        session: the labelled session, with its chosen target.
        init: the checkpoint to start from, or None for a model from scratch.
        options: ``preset`` (from scratch), ``channels`` and ``seed`` (another width),
            ``config_overrides``.

    Returns:
        The model, whether its read-in is fresh (and so always trained), and provenance for the
        checkpoint metadata (``init``, ``head``, ``read_in``, parent, channel seed).

    Raises:
        ValueError: a checkpoint trained at another bin width.
    """
    overrides = {"target": session.target, **dict(options.config_overrides)}
    if init is None:
        cfg = RPNTConfig.preset(
            options.preset,
            n_channels=session.n_channels,
            n_outputs=session.n_outputs,
            bin_s=float(session.bin_s),
            subjects=_session_vocab(session, "subject"),
            sessions=_session_vocab(session, "session"),
            tasks=_session_vocab(session, "task"),
            **overrides,
        )
        return RPNT(cfg), True, {"init": None, "head": "fresh"}
    base_cfg, base_meta = read_header(init)
    base_state = load_checkpoint(init).state_dict()
    if base_cfg.spatial_layers:
        base_cfg = base_cfg.replace(spatial_layers=0)  # decode from the temporal encoder (single-site)
    check_bin_width(data_bin_s=session.bin_s, model_bin_s=base_cfg.bin_s)
    provenance = {
        "init": str(init),
        "parent_weights_sha": base_meta.get("weights_sha", ""),
        "parent_kind": base_meta.get("kind", ""),
    }
    state = {k: v for k, v in base_state.items() if not k.startswith("spatial.")}
    cfg, state, fresh_read_in = _meet_channels(
        session, init, base_cfg, base_meta, state, options, overrides, provenance
    )
    keep_head = (
        is_decoder(base_meta)
        and base_cfg.target == session.target
        and base_cfg.n_outputs == session.n_outputs
        and base_cfg.n_input_channels == session.n_channels
    )
    provenance["head"] = "pretrained" if keep_head else "fresh"
    dropped = () if keep_head else ("velocity_",)
    if base_cfg.input_norm:  # the new recording's statistics are set by fit_decoder, not the pool's
        dropped += ("input_",)
    model = RPNT(cfg)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(dropped)}, strict=False)
    return model, fresh_read_in, provenance


def _meet_channels(
    session: Session,
    init: str | Path,
    base_cfg: RPNTConfig,
    base_meta: dict,
    state: dict[str, torch.Tensor],
    options: FinetuneOptions,
    overrides: dict,
    provenance: dict,
) -> tuple[RPNTConfig, dict[str, torch.Tensor], bool]:
    """How the checkpoint's model meets ``session``'s channels: as it is (same width), through a
    channel map, or through a read-in (its own from pretraining, else fresh).  Returns the config,
    the weights to load and whether the read-in is fresh; records ``read_in`` (and a channel map's
    seed) in ``provenance``."""
    n_in, d_out = session.n_channels, session.n_outputs
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
    return cfg, state, fresh_read_in
