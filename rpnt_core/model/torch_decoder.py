"""The torch RPNT model behind the one decoder contract (:mod:`rpnt_core.decoder`)."""

from __future__ import annotations

import numpy as np
import torch

from ..decoder import DecoderInfo, check_count_block, check_counts
from .rpnt import RPNT


class TorchDecoder:
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` over an :class:`RPNT` in eval mode.

    Single-site models only (the daemon's contract); metadata is fixed at construction.
    """

    def __init__(self, model: RPNT, *, metadata: dict | None = None, name: str = "rpnt-torch") -> None:
        if model.config.spatial_layers:
            raise ValueError("TorchDecoder: multi-site models are decoded with RPNT.step directly")
        self.model = model.eval()
        self._metadata = metadata
        meta = getattr(model, "checkpoint_meta", {}) or {}
        self._info = DecoderInfo(
            n_channels=model.config.n_input_channels,
            n_outputs=model.config.n_outputs,
            bin_s=model.config.bin_s,
            name=name,
            version=str(meta.get("weights_sha", "")),
            fingerprint=str(meta.get("data_fingerprint", "")),
        )
        self.reset()

    @property
    def info(self) -> DecoderInfo:
        return self._info

    def reset(self) -> None:
        self._state = self.model.init_state(1, self._metadata)

    @torch.no_grad()
    def step(self, counts: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(check_counts(counts, self._info.n_channels)).unsqueeze(0)  # (1, N)
        out, self._state = self.model.step(x, self._state)
        return out["velocity"][0].numpy()

    @torch.no_grad()
    def predict(self, counts: np.ndarray) -> np.ndarray:
        """Decode a whole recording (T, N) → (T, D) from an empty state: the same numbers as
        ``reset()`` then ``step`` per bin (via :meth:`RPNT.predict_stream`, proven equal)."""
        x = torch.from_numpy(check_count_block(counts, self._info.n_channels))[None]  # (1, T, N)
        return self.model.predict_stream(x, self._metadata)["velocity"][0].numpy()
