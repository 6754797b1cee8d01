"""What every engine over an exported graph shares, whatever runs the graph.

- :func:`engine_info`: the :class:`~rpnt_core.decoder.DecoderInfo` of an engine, from the contract;
- :class:`StepEngineBase`: the step-graph half of the decoder contract that does not depend on the
  runtime — the state layout read from the contract, the host buffers (counts in, velocity and
  log-rates out, two state banks swapped every step), ``reset`` / ``step`` / ``state`` /
  ``set_state`` and the counts checks.  A runtime subclass (:class:`~exporters.runtime.OnnxStepEngine`,
  :class:`~exporters.openvino_engine.OpenVinoStepEngine`) binds the buffers and runs the graph.

Imports numpy, ``rpnt_core.decoder`` and the contract only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rpnt_core.decoder import DecoderInfo, check_counts

from .contract import LOG_RATES, VELOCITY, ContractError, ModelContract, StateEntry


def engine_info(contract: ModelContract, name: str, backend: str) -> DecoderInfo:
    """The decoder facts of an engine over ``contract``'s graph.

    ``extra`` holds ``backend``, ``precision``, ``graph``, ``target``, ``window``,
    ``receptive_field``, ``rpnt_version`` and ``exporter_version``.
    """
    return DecoderInfo(
        n_channels=contract.n_channels,
        n_outputs=contract.n_outputs,
        bin_s=contract.bin_s,
        name=name,
        version=contract.weights_sha,
        fingerprint=contract.data_fingerprint,
        extra={
            "backend": backend,
            "precision": contract.precision,
            "graph": contract.graph,
            "target": contract.target,
            "window": contract.window,
            "receptive_field": contract.receptive_field,
            "rpnt_version": contract.rpnt_version,
            "exporter_version": contract.exporter_version,
        },
    )


def output_shape(contract: ModelContract, name: str) -> tuple[int, ...]:
    """The shape of the graph output ``name``.

    Raises:
        ContractError: the contract lists no such output.
    """
    for t in contract.outputs:
        if t.name == name:
            return t.shape
    raise ContractError(f"rpnt.outputs: no output named {name!r}")


class StepEngineBase:
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` over a step graph, minus the runtime.

    A subclass sets ``path``, ``backend``, ``contract`` and ``_info``, calls :meth:`_init_layout`,
    binds the buffers, and implements :meth:`_run` (one step from bank ``_cur`` into bank
    ``_cur ^ 1``, then flip ``_cur``) and :meth:`prewarm`.  The state lives in buffers owned by the
    engine: ``_banks[i]`` maps each carried entry's graph input name to its value, ``_const_vals``
    the entries constant per stream (``meta_bias``).  With ``_on_device`` the banks hold the
    runtime's device values (``update_inplace`` / ``numpy()``) instead of numpy arrays.
    """

    path: Path
    backend: str
    contract: ModelContract
    _info: DecoderInfo
    _banks: list[dict[str, Any]]
    _const_vals: dict[str, Any]

    def _init_layout(self, meta_bias: np.ndarray | None) -> None:
        """State layout and host I/O buffers from ``self.contract`` (state banks not made)."""
        c = self.contract
        self._n = c.n_channels
        self._init = c.initial_state(meta_bias)
        self._carried: list[StateEntry] = [s for s in c.state if s.output]
        self._const: list[StateEntry] = [s for s in c.state if not s.output]
        self._on_device = False
        self._counts = np.zeros((1, self._n), dtype=np.float32)  # (1, N)
        self._vel = np.zeros(output_shape(c, VELOCITY), dtype=np.float32)  # (1, D)
        self._rates = np.zeros(output_shape(c, LOG_RATES), dtype=np.float32)  # (1, N_model)
        self._cur = 0

    def _host_banks(self) -> None:
        """Two numpy state banks and the constant entries, all zeros (filled by ``reset``)."""
        self._banks = [
            {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._carried} for _ in range(2)
        ]
        self._const_vals = {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._const}

    def _warm_up(self, bins: int) -> None:
        """``bins`` steps of zero counts, then ``reset()``; nothing for ``bins`` ≤ 0."""
        if bins > 0:
            zero = np.zeros(self._n, dtype=np.float32)
            for _ in range(int(bins)):
                self.step(zero)
            self.reset()

    def _write(self, dst: Any, value: np.ndarray) -> None:
        if self._on_device:
            dst.update_inplace(np.ascontiguousarray(value, dtype=np.float32))
        else:
            np.copyto(dst, value)

    def _run(self, counts: np.ndarray) -> None:
        raise NotImplementedError

    def prewarm(self) -> None:
        """Run the graph once on the current state without advancing the stream: the weights and
        code come back into the caches ahead of a bin at real-time pace, in the calling thread
        (no other core is used).  The next ``step`` returns exactly what it would have: only the
        output buffers and the spare state bank are written, and the next step overwrites both."""
        raise NotImplementedError

    def end_profiling(self) -> str:
        """The runtime's profile file (engines loaded with profiling on)."""
        raise NotImplementedError(f"profiling: not supported by the {self.backend} engine")

    # ------------------------------------------------------------------ contract
    @property
    def info(self) -> DecoderInfo:
        return self._info

    def reset(self) -> None:
        """Forget all history: zeros everywhere, ``meta_bias`` from the model's metadata."""
        self._cur = 0
        for s in self._carried:
            self._write(self._banks[0][s.input], self._init[s.input])
        for s in self._const:
            self._write(self._const_vals[s.input], self._init[s.input])

    def step(self, counts: np.ndarray) -> np.ndarray:
        """One bin of counts (N,) → velocity (D,) float32 (a fresh array)."""
        self._run(counts)
        return self._vel[0].copy()

    def step_outputs(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """One bin → ``{"velocity": (D,), "log_rates": (N_model,)}`` (copies)."""
        self._run(counts)
        return {VELOCITY: self._vel[0].copy(), LOG_RATES: self._rates[0].copy()}

    def _load_counts(self, counts: np.ndarray) -> None:
        """``check_counts`` semantics (shape (N,), any real dtype, finite and ≥ 0 as float32) with
        a fast path: cast straight into the bound input buffer, then one min and one max.  Any
        failure defers to :func:`rpnt_core.decoder.check_counts` for the canonical error."""
        arr = np.asarray(counts)
        row = self._counts[0]
        if arr.shape == (self._n,) and arr.dtype.kind in "biuf":
            np.copyto(row, arr, casting="unsafe")
            if row.min() >= 0.0 and row.max() < np.inf:  # NaN fails both comparisons
                return
        row[...] = check_counts(counts, self._n)  # raises ValueError for anything invalid

    # ------------------------------------------------------------------ extras
    @property
    def state(self) -> dict[str, np.ndarray]:
        """Copy of the current state keyed by the model's state keys."""
        out = {}
        for s in self._carried:
            v = self._banks[self._cur][s.input]
            out[s.key] = np.array(v.numpy() if self._on_device else v, copy=True)
        for s in self._const:
            v = self._const_vals[s.input]
            out[s.key] = np.array(v.numpy() if self._on_device else v, copy=True)
        return out

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a state (model keys, e.g. from :attr:`state` or ``RPNT.init_state``/``step``).

        Raises:
            ValueError: an entry is missing or has another shape.
        """
        missing = [s.key for s in self.contract.state if s.key not in state]
        if missing:
            raise ValueError(f"state: missing entries {missing}")
        for s in self.contract.state:
            arr = np.asarray(state[s.key], dtype=np.float32)
            if arr.shape != s.shape:
                raise ValueError(f"state[{s.key!r}]: expected shape {s.shape}, got {arr.shape}")
        self._cur = 0
        for s in self._carried:
            self._write(self._banks[0][s.input], np.asarray(state[s.key], dtype=np.float32))
        for s in self._const:
            self._write(self._const_vals[s.input], np.asarray(state[s.key], dtype=np.float32))
