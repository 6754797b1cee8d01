"""Inference engines behind the one decoder contract (:mod:`rpnt_core.decoder`).

    engine = load_engine("exports/m1")                 # ONNX Runtime CPU, fp32 step graph
    engine = load_engine("exports/m1", precision="int8")
    engine = load_engine("exports/m1", backend="onnx-cuda")    # needs the [gpu] extra on a GPU host
    engine = load_engine("model.safetensors", backend="torch")   # development
    engine.reset(); v = engine.step(counts)             # counts (N,), v (D,) float32

Back-ends (``backend=``):

- ``onnx-cpu`` (default): ONNX Runtime's CPUExecutionProvider.  One intra-op and one inter-op
  thread and no spin-waiting unless configured (``intra_op_threads``, ``inter_op_threads``,
  ``allow_spinning``), so the binner and the HTTP server keep a core.
- ``onnx-cuda`` / ``onnx-tensorrt``: CUDAExecutionProvider / TensorrtExecutionProvider, from the
  ``onnxruntime-gpu`` build (``pip install 'rpnt[gpu]'``).  Which build is installed is an install
  choice; both provide the ``onnxruntime`` module and providers are picked here by name.  A
  provider that is not available, or that the session did not actually take, raises
  :class:`ProviderUnavailableError` — never a silent fall-back to CPU.  The state then lives on
  the GPU between steps (ORT OrtValues on the device); only counts in and outputs out cross PCIe.
- ``openvino-cpu``: OpenVINO's CPU runtime on the same step graph
  (:class:`~exporters.openvino_engine.OpenVinoStepEngine`, ``pip install 'rpnt[openvino]'``);
  step graphs only.  Absent package → :class:`ProviderUnavailableError`.
- ``torch``: the torch model (:class:`rpnt_core.model.TorchDecoder`), for development.  Needs
  torch and the checkpoint; step decoding only.

The ONNX step engine keeps the state as arrays between calls and feeds/fetches by name.  By
default it runs through an ORT IOBinding with two pre-allocated state banks (inputs bound to one
bank, next-state outputs to the other, swapped every step), so a step allocates nothing; set
``io_binding=False`` for the plain ``session.run`` path (compared in ``bench/bench_engines.py``).

Importing this module imports neither torch nor onnx (only numpy and onnxruntime): the daemon
starts without torch.  Graph optimisation happens at load (``ORT_ENABLE_ALL``); we do not ship
ORT-optimised files, because a model serialised at that level may contain hardware-specific
kernels (NCHWc) and ORT contrib ops that neither another CPU nor TensorRT can take.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import onnxruntime as ort

from rpnt_core.decoder import Decoder, DecoderInfo  # numpy only (rpnt_core imports lazily)

from .backends import BACKENDS
from .contract import COUNTS, LOG_RATES, META_BIAS, VELOCITY, ContractError, ModelContract
from .engine_base import StepEngineBase, engine_info, output_shape
from .model_files import read_contract, resolve_model_path
from .ort_sessions import ProviderUnavailableError, open_session, session_options

__all__ = [
    "BACKENDS",
    "OnnxStepEngine",
    "OnnxWindowEngine",
    "ProviderUnavailableError",
    "load_engine",
    "read_contract",
    "session_options",
    "resolve_model_path",
]


def _ort_session(
    path: Path,
    backend: str,
    *,
    intra_op_threads: int,
    inter_op_threads: int,
    allow_spinning: bool,
    optimization: str,
    device_id: int,
    provider_options: Mapping[str, Any] | None,
    graph: str,
    profile_prefix: str | None = None,
) -> tuple[ort.InferenceSession, ModelContract]:
    """The hot-path session of ``path`` and its contract, which must be of a ``graph`` graph."""
    so = session_options(
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_spinning=allow_spinning,
        optimization=optimization,
        profile_prefix=profile_prefix,
    )
    session, contract = open_session(
        path, backend, so, device_id=device_id, provider_options=provider_options
    )
    if contract.graph != graph:
        hint = " (use OnnxWindowEngine / load_engine(..., graph='window'))" if graph == "step" else ""
        raise ContractError(f"{path.name}: a {contract.graph} graph, not a {graph} graph{hint}")
    return session, contract


# ---------------------------------------------------------------------- step engine
class OnnxStepEngine(StepEngineBase):
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` over an exported step graph.

    Args:
        path: the step graph (``rpnt_step[.int8|.fp16].onnx``).
        backend: ``onnx-cpu`` | ``onnx-cuda`` | ``onnx-tensorrt``.
        intra_op_threads, inter_op_threads, allow_spinning: ORT threading (defaults 1, 1, False).
        optimization: ORT graph optimisation level at load (``all``).
        io_binding: run through pre-bound, double-buffered state (default) instead of ``run``.
        warmup_bins: steps run on load (then the state is reset); 0 to skip.
        meta_bias: (d,) metadata bias for ``reset()`` instead of the one baked into the file.
        device_id, provider_options: the GPU and extra options of the execution provider.
        name: ``info.name``.
        profile_prefix: enable ORT profiling (``end_profiling()`` returns the JSON path).

    The state lives in arrays owned by the engine; ``state`` returns a copy keyed by the model's
    state keys.  ``step`` returns a fresh (D,) float32 array (the output buffers are reused).

    Raises:
        ContractError: not a step graph, or graph I/O that does not match its contract.
        ProviderUnavailableError: the back-end's execution provider is missing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str = "onnx-cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        optimization: str = "all",
        io_binding: bool = True,
        warmup_bins: int = 16,
        meta_bias: np.ndarray | None = None,
        device_id: int = 0,
        provider_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        profile_prefix: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.backend = backend
        self.session, self.contract = _ort_session(
            self.path,
            backend,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            allow_spinning=allow_spinning,
            optimization=optimization,
            device_id=device_id,
            provider_options=provider_options,
            graph="step",
            profile_prefix=profile_prefix,
        )
        self._check_io()
        c = self.contract
        self._info = engine_info(c, name or f"rpnt-onnx-{c.precision}", backend)
        self._init_layout(meta_bias)
        self._on_device = backend != "onnx-cpu"
        self._device_id = int(device_id)
        self._io_binding = bool(io_binding)
        self._setup_buffers()
        self.reset()
        self._warm_up(warmup_bins)

    def _check_io(self) -> None:
        c = self.contract
        names_in = {i.name for i in self.session.get_inputs()}
        names_out = {o.name for o in self.session.get_outputs()}
        want_in = {COUNTS} | {s.input for s in c.state}
        want_out = {VELOCITY, LOG_RATES} | {s.output for s in c.state if s.output}
        if names_in != want_in or not want_out <= names_out:
            raise ContractError(
                f"{self.path.name}: graph I/O {sorted(names_in)} → {sorted(names_out)} does not "
                f"match its contract {sorted(want_in)} → {sorted(want_out)}"
            )

    # ------------------------------------------------------------------ buffers
    def _setup_buffers(self) -> None:
        if self._on_device:
            if not self._io_binding:
                raise ValueError(
                    "io_binding=False is only supported on onnx-cpu (GPU state stays on the device)"
                )
            dev = ("cuda", self._device_id)

            def mk(shape: tuple[int, ...]) -> ort.OrtValue:
                return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, *dev)

            self._banks = [{s.input: mk(s.shape) for s in self._carried} for _ in range(2)]
            self._const_vals = {s.input: mk(s.shape) for s in self._const}
        else:
            self._host_banks()
        if self._io_binding:
            self._bind_io()
        else:
            self._out_names = [VELOCITY, LOG_RATES] + [s.output for s in self._carried if s.output]

    def _bind_io(self) -> None:
        """Two IOBindings: binding i reads the state from bank i and writes it into bank 1 − i."""
        ov = ort.OrtValue.ortvalue_from_numpy
        counts_ov = ov(self._counts)
        vel_ov, rates_ov = ov(self._vel), ov(self._rates)
        wrap = (lambda a: a) if self._on_device else ov
        banks_ov = [{k: wrap(a) for k, a in bank.items()} for bank in self._banks]
        const_ov = {k: wrap(a) for k, a in self._const_vals.items()}
        self._bindings = []
        for i in range(2):
            io = self.session.io_binding()
            io.bind_ortvalue_input(COUNTS, counts_ov)
            for k, v in const_ov.items():
                io.bind_ortvalue_input(k, v)
            for s in self._carried:
                io.bind_ortvalue_input(s.input, banks_ov[i][s.input])
                io.bind_ortvalue_output(s.output, banks_ov[1 - i][s.input])
            io.bind_ortvalue_output(VELOCITY, vel_ov)
            io.bind_ortvalue_output(LOG_RATES, rates_ov)
            self._bindings.append(io)
        # keep the OrtValues alive as long as the bindings
        self._ortvalues = (counts_ov, vel_ov, rates_ov, banks_ov, const_ov)

    # ------------------------------------------------------------------ running
    def prewarm(self) -> None:
        """One run on the current state, the stream not advanced (see :meth:`StepEngineBase.prewarm`)."""
        if self._io_binding:
            self.session.run_with_iobinding(self._bindings[self._cur])
        else:
            self.session.run(
                self._out_names, {COUNTS: self._counts, **self._const_vals, **self._banks[self._cur]}
            )

    def _run(self, counts: np.ndarray) -> None:
        self._load_counts(counts)
        if self._io_binding:
            self.session.run_with_iobinding(self._bindings[self._cur])
            self._cur ^= 1
            return
        bank = self._banks[self._cur]
        feeds = {COUNTS: self._counts, **self._const_vals, **bank}
        outs = self.session.run(self._out_names, feeds)
        self._vel[...] = outs[0]
        self._rates[...] = outs[1]
        nxt = self._banks[self._cur ^ 1]
        for s, o in zip(self._carried, outs[2:], strict=True):
            nxt[s.input] = o  # run() returns fresh arrays: take them, no copy
        self._cur ^= 1

    def end_profiling(self) -> str:
        return self.session.end_profiling()


# ---------------------------------------------------------------------- window engine
class OnnxWindowEngine:
    """The window graph: ``run`` a fixed T-bin window, or ``predict`` a whole recording exactly.

    ``run(counts (T, N))`` → ``{"velocity": (T, D), "log_rates": (T, N_model)}``: bin 0 of the
    window is the start of a stream (as ``RPNT.forward``).

    ``predict(counts (T_total, N))`` → (T_total, D): the same numbers as ``reset()`` + ``step`` per
    bin (like ``RPNT.predict_stream``): windows of T bins, each starting ``receptive_field − 1``
    bins before the outputs it keeps, the last one zero-padded on the right (causal: padding after
    a bin never changes it).  Needs T ≥ receptive_field.  ``predict_outputs`` does the same for
    several outputs.

    Args:
        path: the window graph (``rpnt_window.onnx``).
        warmup: run one window of zeros on load.
        meta_bias: (d,) the ``meta_bias`` input instead of the one baked into the file.
        backend, intra_op_threads, inter_op_threads, allow_spinning, optimization, device_id,
            provider_options, name: as :class:`OnnxStepEngine`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str = "onnx-cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        optimization: str = "all",
        warmup: bool = True,
        meta_bias: np.ndarray | None = None,
        device_id: int = 0,
        provider_options: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.session, self.contract = _ort_session(
            self.path,
            backend,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            allow_spinning=allow_spinning,
            optimization=optimization,
            device_id=device_id,
            provider_options=provider_options,
            graph="window",
        )
        c = self.contract
        self._info = engine_info(c, name or f"rpnt-onnx-window-{c.precision}", backend)
        self.window_bins = c.window_bins
        self._bias = (c.meta_bias if meta_bias is None else np.asarray(meta_bias, np.float32)).reshape(1, -1)
        if warmup:
            self.run(np.zeros((self.window_bins, c.n_channels), dtype=np.float32))

    @property
    def info(self) -> DecoderInfo:
        return self._info

    def run(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """One window (T, N) (or (1, T, N)) from a stream start → ``{"velocity": (T, D), "log_rates": (T, N_model)}``.

        Raises:
            ValueError: another shape than the graph's fixed T and N, or counts that are negative
                or not finite.
        """
        c = self.contract
        x = np.asarray(counts)
        if x.ndim == 2:
            x = x[None]
        if x.shape != (1, self.window_bins, c.n_channels):
            raise ValueError(
                f"counts: expected ({self.window_bins}, {c.n_channels}) (the window graph's "
                f"fixed T and N), got {np.shape(counts)}"
            )
        x = x.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError("counts: must be finite and non-negative")
        vel, rates = self.session.run([VELOCITY, LOG_RATES], {COUNTS: x, META_BIAS: self._bias})
        return {VELOCITY: vel[0], LOG_RATES: rates[0]}

    def predict(self, counts: np.ndarray) -> np.ndarray:
        """Exact velocity for a whole recording: counts (T_total, N) → (T_total, D)."""
        return self.predict_outputs(counts, outputs=(VELOCITY,))[VELOCITY]

    def predict_outputs(
        self, counts: np.ndarray, *, outputs: Sequence[str] = (VELOCITY, LOG_RATES)
    ) -> dict[str, np.ndarray]:
        """Exact ``outputs`` for a whole recording: counts (T_total, N) → each (T_total, width).

        Raises:
            ValueError: counts not (T, N), or a window graph shorter than the receptive field.
        """
        c = self.contract
        x = np.asarray(counts)
        if x.ndim != 2 or x.shape[1] != c.n_channels:
            raise ValueError(f"counts: expected (T, {c.n_channels}), got {x.shape}")
        t_total, t_win, prefix = x.shape[0], self.window_bins, c.receptive_field - 1
        if t_win <= prefix:
            raise ValueError(
                f"predict: the window graph's T={t_win} must be ≥ the receptive field "
                f"{c.receptive_field} for exact chunked decoding; export with --window-bins ≥ "
                f"{c.receptive_field}"
            )
        res: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
        c0 = 0
        while c0 < t_total:
            s0 = max(0, c0 - prefix)
            win = np.zeros((t_win, c.n_channels), dtype=np.float32)
            piece = x[s0 : s0 + t_win]
            win[: piece.shape[0]] = piece
            out = self.run(win)
            c1 = min(t_total, s0 + t_win)
            for k in outputs:
                res[k].append(out[k][c0 - s0 : c1 - s0])
            c0 = c1
        return {
            k: np.concatenate(v, axis=0) if v else np.zeros((0, output_shape(c, k)[-1]), np.float32)
            for k, v in res.items()
        }


# ---------------------------------------------------------------------- loader
@overload
def load_engine(
    path_or_dir: str | os.PathLike[str],
    *,
    backend: str = ...,
    precision: str = ...,
    graph: Literal["step"] = ...,
    **kwargs: Any,
) -> Decoder: ...


@overload
def load_engine(
    path_or_dir: str | os.PathLike[str],
    *,
    backend: str = ...,
    precision: str = ...,
    graph: Literal["window"],
    **kwargs: Any,
) -> OnnxWindowEngine: ...


@overload
def load_engine(
    path_or_dir: str | os.PathLike[str],
    *,
    backend: str = ...,
    precision: str = ...,
    graph: str,
    **kwargs: Any,
) -> Decoder | OnnxWindowEngine: ...


def load_engine(
    path_or_dir: str | os.PathLike[str],
    *,
    backend: str = "onnx-cpu",
    precision: str = "fp32",
    graph: str = "step",
    **kwargs: Any,
) -> Decoder | OnnxWindowEngine:
    """Load a decoder engine.

    Args:
        path_or_dir: an export directory (``rpnt export --out DIR``), one of its ``.onnx`` files,
            or — for ``backend="torch"`` — a checkpoint (``.safetensors``) or an export directory
            whose source checkpoint is still at the path recorded in its contract.
        backend: ``onnx-cpu`` (default) | ``onnx-cuda`` | ``onnx-tensorrt`` | ``openvino-cpu`` | ``torch``.
        precision: which step graph of an export directory: ``fp32`` | ``int8`` | ``fp16``.
        graph: ``step`` (a :class:`~rpnt_core.decoder.Decoder`) or ``window`` (offline, ONNX
            Runtime back-ends only).
        kwargs: passed to :class:`OnnxStepEngine` / :class:`OnnxWindowEngine` / the torch engine.

    Returns:
        The engine, warmed up and reset.

    Raises:
        ValueError: an unknown ``backend`` or ``graph``, or a window graph on a step-only back-end.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if graph not in ("step", "window"):
        raise ValueError(f"graph: expected 'step' or 'window', got {graph!r}")
    if backend in ("torch", "openvino-cpu") and graph != "step":
        raise ValueError(f"backend {backend!r}: step graphs only (use onnx-cpu for the window graph)")
    if backend == "torch":
        from .torch_engine import load_torch_engine  # torch only on this path

        return load_torch_engine(path_or_dir, **kwargs)
    path = resolve_model_path(path_or_dir, precision=precision, graph=graph)
    if backend == "openvino-cpu":
        from .openvino_engine import OpenVinoStepEngine  # openvino only on this path

        return OpenVinoStepEngine(path, **kwargs)
    if graph == "step":
        return OnnxStepEngine(path, backend=backend, **kwargs)
    return OnnxWindowEngine(path, backend=backend, **kwargs)
