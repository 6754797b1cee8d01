"""Adapters between the daemon's native protocol and the stacks labs already run (docs/adapters.md).

    rpnt serve --model M --ingest-adapter lsl:rig-spikes --publish-adapter lsl:rpnt-predictions
    rpnt serve --model M --ingest-adapter 'redis:rpnt:spikes?port=6379' --publish-adapter redis:rpnt:predictions
    rpnt serve --model M --ingest-adapter 'openephys:tcp://127.0.0.1:5556?rate=30000'

A spec is ``KIND:TARGET[?key=value&...]``: the kind, then what to connect to (an LSL stream name, a
Redis stream key, a ZeroMQ endpoint), then options.  :func:`parse_spec` checks it (kind, direction,
option names) without importing the kind's library; :func:`build_ingest` / :func:`build_publish`
import it and make the bridge (see :mod:`streaming.adapters.base`).
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl

from .base import AdapterError, AdapterSpec, IngestAdapter, PublishAdapter

#: kind → (module, ingest class, publish class, the Python package it needs, options per direction)
_COMMON_INGEST = ("source_id", "free_run")
KINDS: dict[str, dict] = {
    "lsl": {
        "module": "lsl",
        "ingest": "LslIngest",
        "publish": "LslPublish",
        "package": "pylsl",
        "options": {"ingest": _COMMON_INGEST + ("resolve_s",), "publish": ("type",)},
    },
    "redis": {
        "module": "redis_stream",
        "ingest": "RedisIngest",
        "publish": "RedisPublish",
        "package": "redis",
        "options": {
            "ingest": _COMMON_INGEST + ("host", "port", "db", "start"),
            "publish": ("host", "port", "db", "maxlen"),
        },
    },
    "openephys": {
        "module": "openephys",
        "ingest": "OpenEphysIngest",
        "publish": None,
        "package": None,
        "options": {"ingest": _COMMON_INGEST + ("rate", "heartbeat")},
    },
}

__all__ = [
    "KINDS",
    "AdapterError",
    "AdapterSpec",
    "IngestAdapter",
    "PublishAdapter",
    "build_ingest",
    "build_publish",
    "check_available",
    "parse_spec",
    "start_adapters",
    "stop_adapters",
]


def parse_spec(text: str, *, direction: str) -> AdapterSpec:
    """``KIND:TARGET[?k=v&...]`` → :class:`AdapterSpec`; :class:`AdapterError` (one line naming the
    spec) for an unknown kind, a kind that cannot go this ``direction`` ("ingest" / "publish"), an
    empty target or an unknown option."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise AdapterError(f"{text}: expected KIND:TARGET with KIND one of {', '.join(KINDS)}")
    k = KINDS[kind]
    if k[direction] is None:
        can = [d for d in ("ingest", "publish") if k[d]]
        raise AdapterError(f"{text}: {kind} is an {' and '.join(can)} adapter only")
    target, _, query = rest.partition("?")
    if not target:
        raise AdapterError(f"{text}: nothing after '{kind}:' (expected a stream name, key or endpoint)")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    allowed = k["options"][direction]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise AdapterError(
            f"{text}: unknown option {unknown[0]} for {kind} {direction} (options: {', '.join(allowed)})"
        )
    return AdapterSpec(text=text, kind=kind, target=target, options=options)


def check_available(spec: AdapterSpec) -> None:
    """:class:`AdapterError` when the Python package the kind needs is not installed."""
    pkg = KINDS[spec.kind]["package"]
    if pkg is None:
        return
    try:
        importlib.import_module(pkg)
    except ImportError:
        raise AdapterError(
            f"{spec.text}: the {spec.kind} adapter needs the '{pkg}' package (pip install 'rpnt[adapters]')"
        ) from None
    except (RuntimeError, OSError) as exc:  # pylsl: its bundled liblsl does not load on this platform
        raise AdapterError(f"{spec.text}: the '{pkg}' package does not load here: {exc}") from None


def _cls(spec: AdapterSpec, direction: str) -> type:
    check_available(spec)
    k = KINDS[spec.kind]
    module = importlib.import_module(f"{__name__}.{k['module']}")
    return getattr(module, k[direction])


def build_ingest(spec: AdapterSpec, *, ingest: str, bin_ns: int, n_channels: int) -> IngestAdapter:
    """The ingest bridge for ``spec`` (not started), sending to the daemon at ``ingest``."""
    return _cls(spec, "ingest")(spec=spec, ingest=ingest, bin_ns=bin_ns, n_channels=n_channels)


def build_publish(spec: AdapterSpec, *, publish: str, n_outputs: int, bin_ns: int) -> PublishAdapter:
    """The publish bridge for ``spec`` (not started), reading the daemon's PUB socket at ``publish``."""
    return _cls(spec, "publish")(spec=spec, publish=publish, n_outputs=n_outputs, bin_ns=bin_ns)


def start_adapters(daemon, *, ingest: list[str], publish: list[str]) -> list:
    """Build and start the bridges for a started ``daemon`` (its bound endpoints, bin width, channel
    and output counts); each one's counters join ``daemon.snapshot()["adapters"]`` under
    ``"ingest KIND:TARGET"`` / ``"publish KIND:TARGET"``."""
    bridges = [
        build_ingest(
            parse_spec(t, direction="ingest"),
            ingest=daemon.endpoints["ingest"],
            bin_ns=daemon.bin_ns,
            n_channels=daemon.n_channels,
        )
        for t in ingest
    ]
    bridges += [
        build_publish(
            parse_spec(t, direction="publish"),
            publish=daemon.endpoints["publish"],
            n_outputs=daemon.n_outputs,
            bin_ns=daemon.bin_ns,
        )
        for t in publish
    ]
    for b in bridges:
        daemon.attach_adapter(f"{b.direction} {b.spec.text}", b.stats.as_dict)
        b.start()
    return bridges


def stop_adapters(bridges: list, *, timeout_s: float = 10.0) -> None:
    """Stop every bridge and wait for its thread (they exit within one poll, ≤ ~1 s)."""
    for b in bridges:
        b.stop()
    for b in bridges:
        b.join(timeout_s)
