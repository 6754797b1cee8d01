"""Checkpoints: one ``.safetensors`` file — weights plus JSON config and metadata in its header.

Layout of the safetensors header's ``__metadata__`` (all strings):
- ``format``: ``rpnt-checkpoint/1``
- ``config``: :meth:`RPNTConfig.to_json`
- tensors named ``extra.*`` are not part of the model (not loaded by :func:`load_checkpoint`,
  not in ``weights_sha``): training by-products a later step may reuse, e.g. the per-session
  read-ins of a pretraining run (``extra.readin.<session>.{read_in,rate_out}.{weight,bias}``),
  read with :func:`read_extra_tensors`.
- ``meta``: JSON object — ``kind`` (pretrained/finetuned/scratch), ``rpnt_version``, ``created``
  (UTC ISO time), ``data_fingerprint`` (hash of the training sessions), ``weights_sha`` (hash of
  the tensors: the model's identity), ``metrics`` (e.g. best validation loss, test R²), and
  whatever the trainer adds (splits, parent checkpoint, ...).

Loading never unpickles: safetensors holds raw tensors and the header is parsed as JSON.  Writes
are atomic (temporary file + ``os.replace``), so a crash mid-save never leaves a torn checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from importlib import metadata as _md
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import RPNTConfig
from .model.rpnt import RPNT

FORMAT = "rpnt-checkpoint/1"
EXTRA = "extra."


class CheckpointError(ValueError):
    """A file that is not a readable rpnt checkpoint, or one that cannot serve as asked."""


def require_trained_head(meta: dict[str, Any], checkpoint: str | Path) -> None:
    """Raise :class:`CheckpointError` for a pretraining checkpoint: its decoding head never saw a
    label, so it would decode noise (exporting, serving or scoring it as a decoder is refused)."""
    if meta.get("kind") == "pretrained":
        raise CheckpointError(
            f"checkpoint: {Path(checkpoint).name} is a pretraining checkpoint (self-supervised, "
            "no labels): its decoding head is untrained and would decode noise. Finetune it "
            f"first: rpnt finetune --init {checkpoint} --data SESSION --out ft.safetensors"
        )


def is_decoder(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's head was trained on labels: supervised pretraining (a decoder of its
    pool) or a finetuned / from-scratch decoder."""
    return bool(meta.get("supervised")) or meta.get("kind") in ("finetuned", "scratch")


def package_version() -> str:
    try:
        return _md.version("rpnt")
    except _md.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def weights_sha(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes), 12 hex chars."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(
    model: RPNT,
    path: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write ``model`` to ``path`` atomically; returns the metadata that was stored.

    ``extra``: tensors stored next to the model under ``extra.<name>`` (see the module docstring)."""
    state = model.state_dict()
    full_meta = {
        "kind": "unknown",
        "rpnt_version": package_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_fingerprint": "",
        "metrics": {},
        **(meta or {}),
        "weights_sha": weights_sha(state),
    }
    atomic_save_tensors(
        {**state, **{EXTRA + k: v for k, v in (extra or {}).items()}},
        Path(path),
        {"format": FORMAT, "config": model.config.to_json(), "meta": json.dumps(full_meta, sort_keys=True)},
    )
    return full_meta


def read_header(path: str | Path) -> tuple[RPNTConfig, dict[str, Any]]:
    """Config and metadata of a checkpoint without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint: {path} is not a safetensors file ({exc})") from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} has format {header.get('format')!r}, expected {FORMAT!r}")
    try:
        config = RPNTConfig.from_dict(json.loads(header["config"]))
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {path} has an unreadable config/meta header ({exc})") from exc
    return config, meta


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> RPNT:
    """The model stored at ``path``, in eval mode, with ``model.checkpoint_meta`` set."""
    config, meta = read_header(path)
    model = RPNT(config)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k in f.keys():  # noqa: SIM118 - a safetensors handle: keys(), no iteration
            if not k.startswith(EXTRA):
                tensors[k] = f.get_tensor(k)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {path} does not match its config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.checkpoint_meta = meta
    return model.to(device).eval()


def read_extra_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``extra.*`` tensors of a checkpoint whose name starts with ``prefix`` (names without ``extra.``)."""
    read_header(path)  # a clear error for a file that is not a checkpoint
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k[len(EXTRA) :]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA + prefix)}  # noqa: SIM118 - see above
