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
  torch and the checkpoint.

The ONNX step engine keeps the state as arrays between calls and feeds/fetches by name.  By
default it runs through an ORT IOBinding with two pre-allocated state banks (inputs bound to one
bank, next-state outputs to the other, swapped every step), so a step allocates nothing; set
``io_binding=False`` for the plain ``session.run`` path (measured in ``bench/bench_engines.py``).

Importing this module imports neither torch nor onnx (only numpy and onnxruntime): the daemon
starts without torch.  Graph optimisation happens at load (``ORT_ENABLE_ALL``); we do not ship
ORT-optimised files, because a model serialised at that level may contain hardware-specific
kernels (NCHWc) and ORT contrib ops that neither another CPU nor TensorRT can take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from rpnt_core.decoder import DecoderInfo, check_counts  # numpy only (rpnt_core imports lazily)

from .contract import (
    COUNTS,
    LOG_RATES,
    META_BIAS,
    VELOCITY,
    WINDOW_FILE,
    ContractError,
    ModelContract,
    step_file,
)

BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt", "openvino-cpu", "torch")
_PROVIDERS = {
    "onnx-cpu": "CPUExecutionProvider",
    "onnx-cuda": "CUDAExecutionProvider",
    "onnx-tensorrt": "TensorrtExecutionProvider",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

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


class ProviderUnavailableError(RuntimeError):
    """The requested ONNX Runtime execution provider is not available in this install/host."""


# ---------------------------------------------------------------------- sessions
def session_options(
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
    optimization: str = "all",
    profile_prefix: str | None = None,
) -> ort.SessionOptions:
    """ORT session options for the hot path (defaults: 1 + 1 threads, no spinning, ORT_ENABLE_ALL)."""
    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization: expected one of {sorted(_OPT_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.graph_optimization_level = _OPT_LEVELS[optimization]
    so.log_severity_level = 3  # errors only: warnings about unused initialisers etc. are noise here
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def _providers(
    backend: str,
    *,
    device_id: int,
    provider_options: Mapping[str, Any] | None,
    precision: str,
    cache_dir: Path | None,
) -> list:
    if backend not in _PROVIDERS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    wanted = _PROVIDERS[backend]
    available = ort.get_available_providers()
    if wanted not in available:
        hint = (
            "install the GPU build on a host with an NVIDIA GPU: pip install 'rpnt[gpu]' "
            "(onnxruntime-gpu instead of onnxruntime; uninstall the CPU onnxruntime first)"
        )
        raise ProviderUnavailableError(
            f"backend {backend!r} needs ONNX Runtime's {wanted}, which this onnxruntime "
            f"{ort.__version__} does not provide (available: {available}); {hint}"
        )
    opts = dict(provider_options or {})
    if backend == "onnx-cpu":
        return [(wanted, opts)]
    opts.setdefault("device_id", int(device_id))
    if backend == "onnx-tensorrt":
        if precision == "fp16":
            opts.setdefault("trt_fp16_enable", True)
        if cache_dir is not None:
            opts.setdefault("trt_engine_cache_enable", True)
            opts.setdefault("trt_engine_cache_path", str(cache_dir / "trt_cache"))
        chain = [(wanted, opts)]
        if "CUDAExecutionProvider" in available:
            chain.append(("CUDAExecutionProvider", {"device_id": int(device_id)}))
        return chain + ["CPUExecutionProvider"]
    return [(wanted, opts), "CPUExecutionProvider"]


def _open_session(
    path: Path,
    backend: str,
    so: ort.SessionOptions,
    *,
    device_id: int,
    provider_options: Mapping[str, Any] | None,
    precision: str,
) -> ort.InferenceSession:
    providers = _providers(
        backend,
        device_id=device_id,
        provider_options=provider_options,
        precision=precision,
        cache_dir=path.parent,
    )
    sess = ort.InferenceSession(str(path), so, providers=providers)
    wanted = _PROVIDERS[backend]
    if wanted not in sess.get_providers():
        raise ProviderUnavailableError(
            f"backend {backend!r}: ONNX Runtime did not take {wanted} for {path.name} (session "
            f"providers {sess.get_providers()}); check the CUDA/cuDNN/TensorRT libraries on this host"
        )
    return sess


def _open_with_contract(
    path: Path,
    backend: str,
    so: ort.SessionOptions,
    *,
    device_id: int,
    provider_options: Mapping[str, Any] | None,
) -> tuple[ort.InferenceSession, ModelContract]:
    """The session and the contract read from it (the file is parsed once).  TensorRT needs the
    precision before the session exists (fp16 engine flag), so there the contract is read first."""
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    precision = "fp32"
    if backend == "onnx-tensorrt":
        precision = read_contract(path).precision
    else:
        _providers(
            backend,
            device_id=device_id,
            provider_options=provider_options,
            precision=precision,
            cache_dir=None,
        )  # a missing provider fails before the (slow) session is built
    sess = _open_session(
        path, backend, so, device_id=device_id, provider_options=provider_options, precision=precision
    )
    return sess, read_contract(sess)


def resolve_model_path(
    path_or_dir: str | os.PathLike, *, precision: str = "fp32", graph: str = "step"
) -> Path:
    """An export directory → the file of ``graph``/``precision`` in it; a file → itself."""
    p = Path(path_or_dir)
    if p.is_dir():
        name = step_file(precision) if graph == "step" else WINDOW_FILE
        f = p / name
        if not f.is_file():
            have = sorted(x.name for x in p.glob("*.onnx"))
            raise FileNotFoundError(
                f"{p}: no {name} (graph={graph!r}, precision={precision!r}); this export has {have}"
            )
        return f
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file or directory: {p}")
    return p


def read_contract(path_or_session: str | os.PathLike | ort.InferenceSession) -> ModelContract:
    """The rpnt contract stored in an exported ONNX file (via ONNX Runtime; no onnx import)."""
    if isinstance(path_or_session, ort.InferenceSession):
        sess, source = path_or_session, "session"
    else:
        source = str(path_or_session)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return ModelContract.from_props(sess.get_modelmeta().custom_metadata_map, source=source)


def _info(contract: ModelContract, name: str, backend: str) -> Any:
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


# ---------------------------------------------------------------------- step engine
class OnnxStepEngine:
    """``reset()`` / ``step(counts (N,)) -> velocity (D,)`` over an exported step graph.

    Args:
        path: the step graph (``rpnt_step[.int8|.fp16].onnx``).
        backend: ``onnx-cpu`` | ``onnx-cuda`` | ``onnx-tensorrt``.
        intra_op_threads, inter_op_threads, allow_spinning: ORT threading (defaults 1, 1, False).
        optimization: ORT graph optimisation level at load (``all``).
        io_binding: run through pre-bound, double-buffered state (default) instead of ``run``.
        warmup_bins: steps run on load (then the state is reset); 0 to skip.
        meta_bias: (d,) metadata bias for ``reset()`` instead of the one baked into the file.
        name: ``info.name``.
        profile_prefix: enable ORT profiling (``end_profiling()`` returns the JSON path).

    The state lives in arrays owned by the engine; ``state`` returns a copy keyed by the model's
    state keys.  ``step`` returns a fresh (D,) float32 array (the output buffers are reused).
    """

    def __init__(
        self,
        path: str | os.PathLike,
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
        so = session_options(
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            allow_spinning=allow_spinning,
            optimization=optimization,
            profile_prefix=profile_prefix,
        )
        self.session, self.contract = _open_with_contract(
            self.path, backend, so, device_id=device_id, provider_options=provider_options
        )
        c = self.contract
        if c.graph != "step":
            raise ContractError(
                f"{self.path.name}: a {c.graph} graph, not a step graph "
                "(use OnnxWindowEngine / load_engine(..., graph='window'))"
            )
        names_in = {i.name for i in self.session.get_inputs()}
        names_out = {o.name for o in self.session.get_outputs()}
        want_in = {COUNTS} | {s.input for s in c.state}
        want_out = {VELOCITY, LOG_RATES} | {s.output for s in c.state if s.output}
        if names_in != want_in or not want_out <= names_out:
            raise ContractError(
                f"{self.path.name}: graph I/O {sorted(names_in)} → {sorted(names_out)} does not "
                f"match its contract {sorted(want_in)} → {sorted(want_out)}"
            )
        self._info = _info(c, name or f"rpnt-onnx-{c.precision}", backend)
        self._n = c.n_channels
        self._init = c.initial_state(meta_bias)
        self._carried = [s for s in c.state if s.output]
        self._const = [s for s in c.state if not s.output]
        self._on_device = backend != "onnx-cpu"
        self._device_id = int(device_id)
        self._counts = np.zeros((1, self._n), dtype=np.float32)
        self._vel = np.zeros(_out_shape(c, VELOCITY), dtype=np.float32)
        self._rates = np.zeros(_out_shape(c, LOG_RATES), dtype=np.float32)
        self._io_binding = bool(io_binding)
        self._setup_buffers()
        self.reset()
        if warmup_bins > 0:
            zero = np.zeros(self._n, dtype=np.float32)
            for _ in range(int(warmup_bins)):
                self.step(zero)
            self.reset()

    # ------------------------------------------------------------------ buffers
    def _setup_buffers(self) -> None:
        c = self.contract
        if self._on_device:
            if not self._io_binding:
                raise ValueError(
                    "io_binding=False is only supported on onnx-cpu (GPU state stays on the device)"
                )
            dev = ("cuda", self._device_id)
            mk = lambda shape: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, *dev)  # noqa: E731
            self._banks = [{s.input: mk(s.shape) for s in self._carried} for _ in range(2)]
            self._const_vals = {s.input: mk(s.shape) for s in self._const}
        else:
            self._banks = [
                {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._carried} for _ in range(2)
            ]
            self._const_vals = {s.input: np.zeros(s.shape, dtype=np.float32) for s in self._const}
        self._cur = 0
        if not self._io_binding:
            self._out_names = [VELOCITY, LOG_RATES] + [s.output for s in self._carried]
            return
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

    def _write(self, dst: Any, value: np.ndarray) -> None:
        if self._on_device:
            dst.update_inplace(np.ascontiguousarray(value, dtype=np.float32))
        else:
            np.copyto(dst, value)

    # ------------------------------------------------------------------ contract
    @property
    def info(self) -> Any:
        return self._info

    def reset(self) -> None:
        """Forget all history: zeros everywhere, ``meta_bias`` from the model's metadata."""
        self._cur = 0
        for s in self._carried:
            self._write(self._banks[0][s.input], self._init[s.input])
        for s in self._const:
            self._write(self._const_vals[s.input], self._init[s.input])

    def step(self, counts: np.ndarray) -> np.ndarray:
        """One bin of counts (N,) → velocity (D,) float32."""
        self._run(counts)
        return self._vel[0].copy()

    def step_outputs(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """One bin → ``{"velocity": (D,), "log_rates": (N_model,)}`` (copies)."""
        self._run(counts)
        return {VELOCITY: self._vel[0].copy(), LOG_RATES: self._rates[0].copy()}

    def prewarm(self) -> None:
        """Run the graph once on the current state without advancing the stream: the weights and
        code come back into the caches ahead of a bin at real-time pace, in the calling thread
        (no other core is used).  The next ``step`` returns exactly what it would have: only the
        output buffers and the spare state bank are written, and the next step overwrites both."""
        if self._io_binding:
            self.session.run_with_iobinding(self._bindings[self._cur])
        else:
            self.session.run(
                self._out_names, {COUNTS: self._counts, **self._const_vals, **self._banks[self._cur]}
            )

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
        for s, o in zip(self._carried, outs[2:]):
            nxt[s.input] = o  # run() returns fresh arrays: take them, no copy
        self._cur ^= 1

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
        """Load a state (model keys, e.g. from :attr:`state` or ``RPNT.init_state``/``step``)."""
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

    def end_profiling(self) -> str:
        return self.session.end_profiling()


def _out_shape(c: ModelContract, name: str) -> tuple[int, ...]:
    for t in c.outputs:
        if t.name == name:
            return t.shape
    raise ContractError(f"rpnt.outputs: no output named {name!r}")


# ---------------------------------------------------------------------- window engine
class OnnxWindowEngine:
    """The window graph: ``run`` a fixed T-bin window, or ``predict`` a whole recording exactly.

    ``run(counts (T, N))`` → ``{"velocity": (T, D), "log_rates": (T, N_model)}``: bin 0 of the
    window is the start of a stream (as ``RPNT.forward``).

    ``predict(counts (T_total, N))`` → (T_total, D): the same numbers as ``reset()`` + ``step`` per
    bin (like ``RPNT.predict_stream``): windows of T bins, each starting ``receptive_field − 1``
    bins before the outputs it keeps, the last one zero-padded on the right (causal: padding after
    a bin never changes it).  Needs T ≥ receptive_field.
    """

    def __init__(
        self,
        path: str | os.PathLike,
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
        so = session_options(
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            allow_spinning=allow_spinning,
            optimization=optimization,
        )
        self.session, self.contract = _open_with_contract(
            self.path, backend, so, device_id=device_id, provider_options=provider_options
        )
        c = self.contract
        if c.graph != "window":
            raise ContractError(f"{self.path.name}: a {c.graph} graph, not a window graph")
        self._info = _info(c, name or f"rpnt-onnx-window-{c.precision}", backend)
        self.window_bins = c.window_bins
        self._bias = (c.meta_bias if meta_bias is None else np.asarray(meta_bias, np.float32)).reshape(1, -1)
        if warmup:
            self.run(np.zeros((self.window_bins, c.n_channels), dtype=np.float32))

    @property
    def info(self) -> Any:
        return self._info

    def run(self, counts: np.ndarray) -> dict[str, np.ndarray]:
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

    def predict(self, counts: np.ndarray, *, outputs: Sequence[str] = (VELOCITY,)) -> Any:
        """Exact outputs for a whole recording (T_total, N) → (T_total, D) (or a dict if several
        ``outputs`` are asked for)."""
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
        res = {k: [] for k in outputs}
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
        cat = {
            k: np.concatenate(v, axis=0) if v else np.zeros((0, _out_shape(c, k)[-1]), np.float32)
            for k, v in res.items()
        }
        return cat[outputs[0]] if len(outputs) == 1 else cat


# ---------------------------------------------------------------------- loader
def load_engine(
    path_or_dir: str | os.PathLike,
    *,
    backend: str = "onnx-cpu",
    precision: str = "fp32",
    graph: str = "step",
    **kwargs: Any,
) -> Any:
    """Load a decoder engine.

    Args:
        path_or_dir: an export directory (``rpnt export --out DIR``), one of its ``.onnx`` files,
            or — for ``backend="torch"`` — a checkpoint (``.safetensors``) or an export directory
            whose source checkpoint is still at the path recorded in its contract.
        backend: ``onnx-cpu`` (default) | ``onnx-cuda`` | ``onnx-tensorrt`` | ``torch``.
        precision: which step graph of an export directory: ``fp32`` | ``int8`` | ``fp16``.
        graph: ``step`` (a :class:`~rpnt_core.decoder.Decoder`) or ``window`` (offline).
        kwargs: passed to :class:`OnnxStepEngine` / :class:`OnnxWindowEngine` / the torch engine.

    Every engine warms up on load and starts reset.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if graph not in ("step", "window"):
        raise ValueError(f"graph: expected 'step' or 'window', got {graph!r}")
    if backend == "torch":
        from .torch_engine import load_torch_engine  # torch only on this path

        return load_torch_engine(path_or_dir, **kwargs)
    if backend == "openvino-cpu" and graph != "step":
        raise ValueError("backend 'openvino-cpu': step graphs only (use onnx-cpu for the window graph)")
    path = resolve_model_path(path_or_dir, precision=precision, graph=graph)
    if backend == "openvino-cpu":
        from .openvino_engine import OpenVinoStepEngine  # openvino only on this path

        return OpenVinoStepEngine(path, **kwargs)
    cls = OnnxStepEngine if graph == "step" else OnnxWindowEngine
    return cls(path, backend=backend, **kwargs)
