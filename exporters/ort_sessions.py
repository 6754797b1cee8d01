"""ONNX Runtime sessions for the engines: options for the hot path and execution providers by name.

- :func:`session_options`: one intra-op and one inter-op thread, no spin-waiting,
  ``ORT_ENABLE_ALL`` unless configured, so the binner and the HTTP server keep a core;
- :func:`open_session`: the session of an exported graph on a back-end (``onnx-cpu``,
  ``onnx-cuda``, ``onnx-tensorrt``), with the contract read from it.  A provider that is not
  available, or that the session did not actually take, raises :class:`ProviderUnavailableError`
  — never a silent fall-back to CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .contract import ModelContract
from .model_files import read_contract

#: The ONNX Runtime back-ends and the execution provider each needs.
PROVIDERS = {
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

#: One provider chain entry: a name, or (name, options).
Provider = str | tuple[str, dict[str, Any]]


class ProviderUnavailableError(RuntimeError):
    """The requested ONNX Runtime execution provider is not available in this install/host."""


def session_options(
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
    optimization: str = "all",
    profile_prefix: str | None = None,
) -> ort.SessionOptions:
    """ORT session options for the hot path (defaults: 1 + 1 threads, no spinning, ORT_ENABLE_ALL).

    Args:
        optimization: graph optimisation level at load: ``disable`` | ``basic`` | ``extended`` | ``all``.
        profile_prefix: enable ORT profiling, files named after this prefix.
    """
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
) -> list[Provider]:
    """The provider chain of ``backend`` (GPU back-ends fall back per node to CUDA, then CPU).

    Raises:
        ValueError: not an ONNX Runtime back-end.
        ProviderUnavailableError: this onnxruntime build lacks the provider.
    """
    if backend not in PROVIDERS:
        raise ValueError(f"backend: expected one of {tuple(PROVIDERS)}, got {backend!r}")
    wanted = PROVIDERS[backend]
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
        chain: list[Provider] = [(wanted, opts)]
        if "CUDAExecutionProvider" in available:
            chain.append(("CUDAExecutionProvider", {"device_id": int(device_id)}))
        return [*chain, "CPUExecutionProvider"]
    return [(wanted, opts), "CPUExecutionProvider"]


def open_session(
    path: Path,
    backend: str,
    so: ort.SessionOptions,
    *,
    device_id: int,
    provider_options: Mapping[str, Any] | None,
) -> tuple[ort.InferenceSession, ModelContract]:
    """The session of the graph ``path`` on ``backend`` and the contract read from it.

    The file is parsed once, except for TensorRT, which needs the precision before the session
    exists (fp16 engine flag), so there the contract is read first.  A missing provider fails
    before the (slow) session is built.

    Raises:
        FileNotFoundError: no such file.
        ProviderUnavailableError: the provider is missing, or the session did not take it.
        ContractError: the file has no rpnt contract.
    """
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    precision = read_contract(path).precision if backend == "onnx-tensorrt" else "fp32"
    chain = _providers(
        backend,
        device_id=device_id,
        provider_options=provider_options,
        precision=precision,
        cache_dir=path.parent,
    )
    sess = ort.InferenceSession(str(path), so, providers=chain)
    wanted = PROVIDERS[backend]
    if wanted not in sess.get_providers():
        raise ProviderUnavailableError(
            f"backend {backend!r}: ONNX Runtime did not take {wanted} for {path.name} (session "
            f"providers {sess.get_providers()}); check the CUDA/cuDNN/TensorRT libraries on this host"
        )
    return sess, read_contract(sess)
