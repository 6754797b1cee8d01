"""The model contract that travels inside every exported ONNX file (``metadata_props``).

Nothing here imports torch or onnx: the daemon reads the contract through ONNX Runtime
(``InferenceSession.get_modelmeta().custom_metadata_map``) and must start without torch.

Keys (all values are strings; JSON where noted)
-----------------------------------------------
==========================  ================================================================
``rpnt.format``             ``rpnt-onnx/1``
``rpnt.graph``              ``step`` (one bin + state → outputs + next state) or ``window``
``rpnt.precision``          ``fp32`` | ``int8`` (dynamic, CPU) | ``fp16`` (weights and compute;
                            graph I/O stays float32)
``rpnt.n_channels``         channels per bin that callers feed (``config.n_input_channels``)
``rpnt.n_model_channels``   channels after the model's channel map (width of ``log_rates``)
``rpnt.n_outputs``          D, width of ``velocity``
``rpnt.target``             the behaviour series the ``velocity`` output holds (``velocity``,
                            ``position``, ``force``, ``emg``, ...: the model's
                            ``config.target``).  Optional when reading: files exported before
                            the key existed decode velocity.
``rpnt.bin_s``              bin width in seconds the model was trained at
``rpnt.window``             W, attention window in bins (size of the ring buffers)
``rpnt.window_bins``        T of a window graph (0 for a step graph)
``rpnt.receptive_field``    bins an output can depend on (L·(W + k_q − 2) + 1)
``rpnt.opset``              ai.onnx opset of the graph
``rpnt.inputs``             JSON list of {name, shape, dtype, units}
``rpnt.outputs``            JSON list of {name, shape, dtype, units}
``rpnt.state``              JSON list of {key, input, output, shape, dtype, init}: the state
                            layout in graph-input order.  ``output`` is the name of the graph
                            output holding the entry's next value, or null for an entry that is
                            constant per stream (``meta_bias``).  ``init`` is ``zeros`` or
                            ``meta_bias``.
``rpnt.meta_bias``          the metadata bias vector (d,) as base64 of little-endian float32:
                            the initial value of ``state.meta_bias`` (step graph) and the
                            default for the window graph's ``meta_bias`` input.  It is baked
                            in **here, in the metadata** (not as a graph constant), so the graph
                            stays a pure function of its inputs and a caller may feed another bias.
``rpnt.metadata``           JSON {subject, session, task, date_days} the bias was computed for
``rpnt.weights_sha``        the checkpoint's weights hash (the model's identity / version)
``rpnt.data_fingerprint``   the checkpoint's training-data fingerprint
``rpnt.rpnt_version``       rpnt version that wrote the checkpoint
``rpnt.exporter_version``   rpnt version that exported the graph
``rpnt.torch_version``      torch version used for the export
``rpnt.config``             the model's RPNTConfig as JSON
``rpnt.checkpoint``         path of the source checkpoint at export time (informational)
``rpnt.created``            UTC ISO time of the export
==========================  ================================================================

Reading is strict: a missing or malformed key raises :class:`ContractError` naming it (except
``rpnt.target``, see above).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

FORMAT = "rpnt-onnx/1"
PREFIX = "rpnt."

STEP_FILE = "rpnt_step.onnx"
WINDOW_FILE = "rpnt_window.onnx"
MANIFEST_FILE = "export.json"
PRECISIONS = ("fp32", "int8", "fp16")

#: Export defaults, declared once for ``rpnt export`` and :func:`exporters.onnx_export.export_model`
#: (``export.json`` records the values an export used): max abs error allowed for a float32 graph,
#: max R² drop for a reduced-precision one, bins per parity stream.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_R2_GATE = 0.005
DEFAULT_PARITY_BINS = 300

_T = TypeVar("_T")

COUNTS = "counts"
VELOCITY = "velocity"
LOG_RATES = "log_rates"
META_BIAS = "meta_bias"

UNITS = {
    COUNTS: "spike counts per bin (non-negative), channels in the order the model was trained on",
    VELOCITY: "the decoded behaviour target named by rpnt.target, in its training units (the model's "
    "velocity_mean/velocity_scale are applied)",
    LOG_RATES: "natural log of the expected spike count per bin, per model channel",
    META_BIAS: "metadata bias added to every token (model units)",
}


class ContractError(ValueError):
    """An ONNX file whose rpnt contract (metadata_props) is missing or malformed."""


def step_file(precision: str = "fp32") -> str:
    """File name of the step graph of ``precision`` inside an export directory."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return STEP_FILE if precision == "fp32" else f"rpnt_step.{precision}.onnx"


def state_input(key: str) -> str:
    """Graph input name of the state entry ``key``."""
    return f"state.{key}"


def state_output(key: str) -> str:
    """Graph output name of the next value of the state entry ``key``."""
    return f"next_state.{key}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape, dtype, units (``rpnt.inputs``/``outputs``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    units: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "units": self.units}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            units=str(d.get("units", "")),
        )


@dataclass(frozen=True)
class StateEntry:
    """One entry of the step graph's state layout (``rpnt.state``)."""

    key: str  # the model's state key (RPNT.state_shapes)
    input: str  # graph input name
    output: str | None  # graph output with the next value; None = constant per stream
    shape: tuple[int, ...]
    dtype: str = "float32"
    init: str = "zeros"  # "zeros" | "meta_bias"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "input": self.input,
            "output": self.output,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "init": self.init,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StateEntry:
        init = str(d.get("init", "zeros"))
        if init not in ("zeros", META_BIAS):
            raise ContractError(f"rpnt.state: entry {d.get('key')!r} has unknown init {init!r}")
        out = d.get("output")
        return cls(
            key=str(d["key"]),
            input=str(d["input"]),
            output=None if out is None else str(out),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d.get("dtype", "float32")),
            init=init,
        )


@dataclass(frozen=True)
class ModelContract:
    """The contract of one exported graph: the ``rpnt.*`` keys of the module docstring, typed.

    :meth:`to_props` / :meth:`from_props` convert to and from ``metadata_props``.
    """

    graph: str
    precision: str
    n_channels: int
    n_model_channels: int
    n_outputs: int
    bin_s: float
    window: int
    receptive_field: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    meta_bias: np.ndarray  # (d,) float32
    state: tuple[StateEntry, ...] = ()
    window_bins: int = 0
    opset: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    weights_sha: str = ""
    data_fingerprint: str = ""
    rpnt_version: str = ""
    exporter_version: str = ""
    torch_version: str = ""
    config_json: str = "{}"
    checkpoint: str = ""
    created: str = ""
    target: str = "velocity"

    # ------------------------------------------------------------------ (de)serialisation
    def to_props(self) -> dict[str, str]:
        """The contract as ``metadata_props`` (``rpnt.``-prefixed string keys and values)."""
        bias = np.ascontiguousarray(self.meta_bias, dtype="<f4").reshape(-1)
        props = {
            "format": FORMAT,
            "graph": self.graph,
            "precision": self.precision,
            "n_channels": str(int(self.n_channels)),
            "n_model_channels": str(int(self.n_model_channels)),
            "n_outputs": str(int(self.n_outputs)),
            "target": self.target,
            "bin_s": repr(float(self.bin_s)),
            "window": str(int(self.window)),
            "window_bins": str(int(self.window_bins)),
            "receptive_field": str(int(self.receptive_field)),
            "opset": str(int(self.opset)),
            "inputs": json.dumps([t.to_json() for t in self.inputs]),
            "outputs": json.dumps([t.to_json() for t in self.outputs]),
            "state": json.dumps([s.to_json() for s in self.state]),
            "meta_bias": base64.b64encode(bias.tobytes()).decode("ascii"),
            "metadata": json.dumps(self.metadata, sort_keys=True),
            "weights_sha": self.weights_sha,
            "data_fingerprint": self.data_fingerprint,
            "rpnt_version": self.rpnt_version,
            "exporter_version": self.exporter_version,
            "torch_version": self.torch_version,
            "config": self.config_json,
            "checkpoint": self.checkpoint,
            "created": self.created,
        }
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, source: str = "model") -> ModelContract:
        """Read a contract from ``metadata_props``; ``source`` names the file in errors.

        Raises:
            ContractError: a missing or unreadable key, another format, graph or precision.
        """

        def get(key: str) -> str:
            full = PREFIX + key
            if full not in props:
                raise ContractError(
                    f"{full}: missing from the metadata of {source} "
                    f"(not an rpnt export, or written by an incompatible version)"
                )
            return props[full]

        def parse(key: str, fn: Callable[[str], _T]) -> _T:
            raw = get(key)
            try:
                return fn(raw)
            except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
                raise ContractError(f"{PREFIX}{key}: unreadable value in {source} ({exc})") from exc

        fmt = get("format")
        if fmt != FORMAT:
            raise ContractError(f"{PREFIX}format: {source} has {fmt!r}, this rpnt reads {FORMAT!r}")
        graph = get("graph")
        if graph not in ("step", "window"):
            raise ContractError(f"{PREFIX}graph: expected 'step' or 'window', got {graph!r}")
        precision = get("precision")
        if precision not in PRECISIONS:
            raise ContractError(f"{PREFIX}precision: expected one of {PRECISIONS}, got {precision!r}")

        def bias(raw: str) -> np.ndarray:
            return np.frombuffer(base64.b64decode(raw.encode("ascii"), validate=True), dtype="<f4").astype(
                np.float32
            )

        return cls(
            graph=graph,
            precision=precision,
            n_channels=parse("n_channels", int),
            n_model_channels=parse("n_model_channels", int),
            n_outputs=parse("n_outputs", int),
            bin_s=parse("bin_s", float),
            window=parse("window", int),
            window_bins=parse("window_bins", int),
            receptive_field=parse("receptive_field", int),
            opset=parse("opset", int),
            inputs=parse("inputs", lambda s: tuple(TensorSpec.from_json(d) for d in json.loads(s))),
            outputs=parse("outputs", lambda s: tuple(TensorSpec.from_json(d) for d in json.loads(s))),
            state=parse("state", lambda s: tuple(StateEntry.from_json(d) for d in json.loads(s))),
            meta_bias=parse("meta_bias", bias),
            metadata=parse("metadata", json.loads),
            weights_sha=get("weights_sha"),
            data_fingerprint=get("data_fingerprint"),
            rpnt_version=get("rpnt_version"),
            exporter_version=get("exporter_version"),
            torch_version=get("torch_version"),
            config_json=get("config"),
            checkpoint=get("checkpoint"),
            created=get("created"),
            target=props.get(PREFIX + "target", "velocity"),
        )

    # ------------------------------------------------------------------ helpers
    def initial_state(self, meta_bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Fresh state keyed by graph input name: zeros, except ``meta_bias`` entries."""
        bias = self.meta_bias if meta_bias is None else np.asarray(meta_bias, dtype=np.float32).reshape(-1)
        out: dict[str, np.ndarray] = {}
        for s in self.state:
            arr = np.zeros(s.shape, dtype=np.float32)
            if s.init == META_BIAS:
                if bias.size != arr[0].size:
                    raise ValueError(f"meta_bias: expected {arr[0].size} values, got {bias.size}")
                arr[...] = bias.reshape(arr.shape[1:])
            out[s.input] = arr
        return out

    def describe(self) -> str:
        """A few human-readable lines (used by the CLI and reports)."""
        lines = [
            f"graph {self.graph} ({self.precision}), opset {self.opset}",
            f"channels in {self.n_channels} (model {self.n_model_channels}), outputs {self.n_outputs} "
            f"({self.target}), "
            f"bin {self.bin_s * 1000:g} ms, W {self.window}, receptive field {self.receptive_field} bins"
            + (f", window T {self.window_bins}" if self.window_bins else ""),
            f"weights {self.weights_sha or '?'}, data {self.data_fingerprint or '?'}, "
            f"rpnt {self.rpnt_version or '?'} → exported by {self.exporter_version or '?'}",
        ]
        if self.state:
            n = sum(int(np.prod(s.shape)) for s in self.state)
            lines.append(f"state: {len(self.state)} tensors, {n} floats ({n * 4 / 1024:.1f} KiB)")
        return "\n".join(lines)
