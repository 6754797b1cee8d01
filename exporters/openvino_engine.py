"""The ``openvino-cpu`` back-end of :func:`exporters.runtime.load_engine`: OpenVINO's CPU runtime
on the same exported ONNX step graph (``pip install 'rpnt[openvino]'``).

Same file, same contract, same state layout as :class:`~exporters.runtime.OnnxStepEngine`, whose
state handling it inherits (``reset``, ``state``, ``set_state``, counts checks); only the runner
differs.  Like the ORT engine it runs double-buffered: two OpenVINO infer requests, request i
reading the state from bank i and writing the next state into bank 1 − i, all buffers the
engine's own numpy arrays (shared with OpenVINO, no copies), swapped every step.

One inference thread, no CPU pinning (the binner and the HTTP server keep the other core), bf16
inference precision unless asked otherwise (``inference_precision="f32"``).  bf16 is a reduced
precision that the export's parity gate does not see (it runs ONNX Runtime): its R² loss vs fp32
is measured in ``bench/bench_engines.py`` and checked in ``tests/test_openvino_engine.py``.
Known problem: OpenVINO 2026.4.1 segfaults compiling the step graph at f32 inference precision
(seen on an AMD EPYC with AVX-512 bf16), so the default here is ``bf16``; on a CPU without bf16
OpenVINO falls back to f32 — check that the engine loads (``rpnt serve --backend openvino-cpu``
once) before relying on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .contract import COUNTS, LOG_RATES, VELOCITY, ContractError
from .runtime import OnnxStepEngine, ProviderUnavailableError, _info, _out_shape, read_contract

INSTALL_HINT = "install OpenVINO: pip install 'rpnt[openvino]'"


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoStepEngine(OnnxStepEngine):
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` with OpenVINO's CPU plugin.

    Args:
        path: the step graph (``rpnt_step[.int8].onnx``).
        intra_op_threads: OpenVINO inference threads (default 1).
        inference_precision: ``bf16`` (default) or ``f32``.
        warmup_bins, meta_bias, name: as :class:`~exporters.runtime.OnnxStepEngine`.
        allow_spinning: accepted for the common loader signature; OpenVINO's CPU plugin has no
            such switch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        intra_op_threads: int = 1,
        inference_precision: str = "bf16",
        warmup_bins: int = 16,
        meta_bias: np.ndarray | None = None,
        name: str | None = None,
        allow_spinning: bool = False,
        **_: Any,
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ProviderUnavailableError(
                f"backend 'openvino-cpu' needs the openvino package; {INSTALL_HINT}"
            ) from None
        if inference_precision not in ("f32", "bf16"):
            raise ValueError(f"inference_precision: expected 'f32' or 'bf16', got {inference_precision!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model: no such file: {self.path}")
        self.backend = "openvino-cpu"
        self.contract = c = read_contract(self.path)
        if c.graph != "step":
            raise ContractError(f"{self.path.name}: a {c.graph} graph, not a step graph")
        core = ov.Core()
        cfg = {
            "INFERENCE_NUM_THREADS": int(intra_op_threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": inference_precision,
        }
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", cfg)
        self._info = _info(c, name or f"rpnt-openvino-{c.precision}", self.backend)
        self._info.extra["inference_precision"] = inference_precision
        self._n = c.n_channels
        self._init = c.initial_state(meta_bias)
        self._carried = [s for s in c.state if s.output]
        self._const = [s for s in c.state if not s.output]
        self._on_device = False
        self._io_binding = True
        self._counts = np.zeros((1, self._n), dtype=np.float32)
        self._vel = np.zeros(_out_shape(c, VELOCITY), dtype=np.float32)
        self._rates = np.zeros(_out_shape(c, LOG_RATES), dtype=np.float32)
        self._banks = [
            {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._carried} for _ in range(2)
        ]
        self._const_vals = {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._const}
        self._cur = 0
        self._requests = [self._bind(ov, i) for i in range(2)]
        self.reset()
        if warmup_bins > 0:
            zero = np.zeros(self._n, dtype=np.float32)
            for _ in range(int(warmup_bins)):
                self.step(zero)
            self.reset()

    def _bind(self, ov: Any, i: int) -> Any:
        """Infer request ``i``: state in from bank i, next state out into bank 1 − i."""
        req = self.compiled.create_infer_request()
        ins = {COUNTS: self._counts, **self._const_vals, **self._banks[i]}
        outs = {
            VELOCITY: self._vel,
            LOG_RATES: self._rates,
            **{s.output: self._banks[1 - i][s.input] for s in self._carried},
        }
        names_in = {p.get_any_name() for p in self.compiled.inputs}
        if names_in != set(ins):
            raise ContractError(
                f"{self.path.name}: graph inputs {sorted(names_in)} do not match its contract {sorted(ins)}"
            )
        for name, arr in ins.items():
            req.set_tensor(name, ov.Tensor(arr, shared_memory=True))
        for name, arr in outs.items():
            req.set_tensor(name, ov.Tensor(arr, shared_memory=True))
        return req

    def _run(self, counts: np.ndarray) -> None:
        self._load_counts(counts)
        self._requests[self._cur].infer()
        self._cur ^= 1

    def prewarm(self) -> None:
        """As :meth:`OnnxStepEngine.prewarm`: one run on the current state, the stream not advanced."""
        self._requests[self._cur].infer()

    def end_profiling(self) -> str:
        raise NotImplementedError("profiling: ORT engines only")
