"""The ``openvino-cpu`` back-end of :func:`exporters.runtime.load_engine`: OpenVINO's CPU runtime
on the same exported ONNX step graph (``pip install 'rpnt[openvino]'``).

Same file, same contract, same state layout as :class:`~exporters.runtime.OnnxStepEngine`: both
are a :class:`~exporters.engine_base.StepEngineBase` (``reset``, ``state``, ``set_state``, counts
checks); only the runner differs.  Like the ORT engine it runs double-buffered: two OpenVINO infer requests, request i
reading the state from bank i and writing the next state into bank 1 − i, all buffers the
engine's own numpy arrays (shared with OpenVINO, no copies), swapped every step.

One inference thread, no CPU pinning (the binner and the HTTP server keep the other core), bf16
inference precision unless asked otherwise (``inference_precision="f32"``).  bf16 is a reduced
precision that the export's parity gate does not see (it runs ONNX Runtime): its R² loss vs fp32
is reported by ``bench/bench_engines.py`` and held to the gate's bar in
``tests/test_openvino_engine.py``.  Known problem: OpenVINO 2026.4.1 can crash compiling the step
graph at f32 inference precision (``docs/engines.md``), so the default here is ``bf16``; on a CPU
without bf16 OpenVINO falls back to f32 — check that the engine loads
(``rpnt serve --backend openvino-cpu`` once) before relying on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .contract import COUNTS, LOG_RATES, VELOCITY, ContractError
from .engine_base import StepEngineBase, engine_info
from .model_files import read_contract
from .ort_sessions import ProviderUnavailableError

INSTALL_HINT = "install OpenVINO: pip install 'rpnt[openvino]'"


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoStepEngine(StepEngineBase):
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` with OpenVINO's CPU plugin.

    Args:
        path: the step graph (``rpnt_step[.int8].onnx``).
        intra_op_threads: OpenVINO inference threads (default 1).
        inference_precision: ``bf16`` (default) or ``f32``.
        warmup_bins, meta_bias, name: as :class:`~exporters.runtime.OnnxStepEngine`.
        allow_spinning: accepted for the common loader signature; OpenVINO's CPU plugin has no
            such switch.  Other ``OnnxStepEngine`` options are accepted and ignored likewise.

    Raises:
        ProviderUnavailableError: the openvino package is not installed.
        ContractError: not a step graph, or graph inputs that do not match its contract.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
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
        self._info = engine_info(c, name or f"rpnt-openvino-{c.precision}", self.backend)
        self._info.extra["inference_precision"] = inference_precision
        self._init_layout(meta_bias)
        self._host_banks()
        self._requests = [self._bind(ov, i) for i in range(2)]
        self.reset()
        self._warm_up(warmup_bins)

    def _bind(self, ov: Any, i: int) -> Any:
        """Infer request ``i``: state in from bank i, next state out into bank 1 − i."""
        req = self.compiled.create_infer_request()
        ins = {COUNTS: self._counts, **self._const_vals, **self._banks[i]}
        outs = {
            VELOCITY: self._vel,
            LOG_RATES: self._rates,
            **{s.output: self._banks[1 - i][s.input] for s in self._carried if s.output},
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
        """One run on the current state, the stream not advanced (see :meth:`StepEngineBase.prewarm`)."""
        self._requests[self._cur].infer()
