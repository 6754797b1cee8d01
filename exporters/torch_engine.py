"""The torch back-end of :func:`exporters.runtime.load_engine` (development; imports torch).

A thin layer over :class:`rpnt_core.model.TorchDecoder` (not a second implementation): it adds
warm-up on load, the engine ``info`` fields, and reports ``n_channels = config.n_input_channels``
(the channel count callers feed; ``TorchDecoder`` reports ``config.n_channels``, which differs
when the model has a ``channel_map``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rpnt_core.checkpoint import load_checkpoint, read_header
from rpnt_core.model.rpnt import RPNT
from rpnt_core.model.torch_decoder import TorchDecoder

from .contract import ContractError


class TorchEngine(TorchDecoder):
    """:class:`TorchDecoder` + warm-up + engine info.  ``metadata``: names (subject, session,
    task, date_days) as in :meth:`RPNT.metadata_for`, or tensors as ``RPNT.init_state`` takes."""

    def __init__(
        self,
        model: RPNT,
        *,
        metadata: Mapping[str, Any] | None = None,
        name: str = "rpnt-torch",
        warmup_bins: int = 16,
    ) -> None:
        meta_t = None
        if metadata:
            if all(isinstance(v, (str, int, float)) or v is None for v in metadata.values()):
                kw = {k: v for k, v in metadata.items() if v not in (None, "")}
                meta_t = model.metadata_for(batch_size=1, **kw)
            else:
                meta_t = dict(metadata)
        super().__init__(model, metadata=meta_t, name=name)
        c = model.config
        self._info = dataclasses.replace(
            self._info,
            n_channels=c.n_input_channels,
            extra={
                "backend": "torch",
                "precision": "fp32",
                "graph": "step",
                "target": c.target,
                "window": c.window,
                "receptive_field": model.receptive_field,
            },
        )
        if warmup_bins > 0:
            zero = np.zeros(c.n_input_channels, dtype=np.float32)
            for _ in range(int(warmup_bins)):
                self.step(zero)
            self.reset()


def load_torch_engine(
    path_or_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    warmup_bins: int = 16,
    name: str = "rpnt-torch",
    threads: int | None = None,
) -> TorchEngine:
    """A checkpoint, or an export (directory or .onnx) whose source checkpoint still exists.

    ``threads``: if given, ``torch.set_num_threads(threads)`` (process-wide)."""
    p = Path(path_or_dir)
    if p.is_dir() or p.suffix == ".onnx":
        from .model_files import read_contract, resolve_model_path  # onnxruntime only on this path

        contract = read_contract(resolve_model_path(p))
        ckpt = Path(contract.checkpoint) if contract.checkpoint else None
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(
                f"backend 'torch' needs the checkpoint; {p} was exported from "
                f"{contract.checkpoint or 'an in-memory model'}, which is not there — "
                "pass the .safetensors path instead"
            )
        _, meta = read_header(ckpt)
        if contract.weights_sha and meta.get("weights_sha") != contract.weights_sha:
            raise ContractError(
                f"{ckpt}: weights {meta.get('weights_sha')} differ from the export's "
                f"{contract.weights_sha}; pass the matching checkpoint"
            )
        if metadata is None:
            metadata = contract.metadata
        p = ckpt
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    return TorchEngine(load_checkpoint(p), metadata=metadata, name=name, warmup_bins=warmup_bins)
