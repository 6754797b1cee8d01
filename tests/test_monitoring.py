"""deploy/grafana and deploy/prometheus against what ``rpnt serve`` really exports, and
service.metrics' collector: every PromQL expression of the dashboard and of the alert rules names
only metrics that a running server's ``GET /metrics`` has; the rules load and fire in Prometheus'
own ``promtool`` (Debian package ``prometheus``; skipped where absent); each app's collector is
its own."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

for _mod in ("fastapi", "uvicorn", "zmq", "onnxruntime", "httpx", "prometheus_client", "yaml"):
    pytest.importorskip(_mod)

import prometheus_client  # noqa: E402
import yaml  # noqa: E402
from conftest import REPO  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_service_http import Server, stream  # noqa: E402
from test_streaming_support import tiny_export  # noqa: E402

from service.metrics import new_registry, render  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "rpnt-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_SERIES = {"up"}  # made by Prometheus itself for every scrape target, not by the daemon
ALERT_NAMES = {
    "RpntDaemonDown",
    "RpntLatencyP99OverBin",
    "RpntBinsLost",
    "RpntRejectsRising",
    "RpntCalibrationFailed",
}


# ---------------------------------------------------------------------------- PromQL → metric names
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRIP = [
    r'"(?:[^"\\]|\\.)*"',
    r"'(?:[^'\\]|\\.)*'",  # string literals
    r"\{[^{}]*\}",  # label matchers
    r"\[[^\[\]]*\]",  # range / subquery selectors
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)",  # label lists
    r"\boffset\s+\S+",
    r"\$\{[^}]*\}|\$\w+",  # Grafana variables ($instance, $__rate_interval, ${DS})
    r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?",  # numbers
]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions, aggregation
    operators or keywords, once strings, label matchers, ranges and label lists are removed).
    Grafana's ``label_values(METRIC, LABEL)`` names METRIC."""
    lv = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr)
    if lv:
        return {lv.group(1)}
    for pattern in _STRIP:
        expr = re.sub(pattern, " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        if re.match(r"\s*\(", expr[m.end() :]) or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_names_parser_finds_names_and_only_names():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, stage) (rate(rpnt_x_bucket{stage="a b",'
        'instance=~"$instance"}[$__rate_interval]))) > on (instance, job) rpnt_bin_seconds'
    ) == {"rpnt_x_bucket", "rpnt_bin_seconds"}
    assert metric_names("up == 0 or rpnt_bogus_total offset 5m unless on() vector(1)") == {
        "up",
        "rpnt_bogus_total",
    }
    assert metric_names("increase(a[1h:5m]) * 1e3 + b") == {"a", "b"}
    assert metric_names("label_values(rpnt_uptime_seconds, instance)") == {"rpnt_uptime_seconds"}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every templating query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p["targets"]:
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        out.append((f"variable {v['name']}", q))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# ---------------------------------------------------------------------------- a real server's /metrics
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Sample names of a running ``rpnt serve``'s /metrics (after a short stream)."""
    tiny = tiny_export(tmp_path_factory)
    srv = Server(registry=tmp_path_factory.mktemp("mon") / "registry", model=tiny["export"]).wait_ready()
    try:
        stream(srv, tiny["counts"][:40], source_id=5)
        with srv.client() as c:
            r = c.get("/metrics")
            om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
        assert om.status_code == 200 and om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        names = {s.name for fam in text_string_to_metric_families(r.text) for s in fam.samples}
        return {"names": names, "text": r.text}
    finally:
        srv.stop()


def test_every_dashboard_query_names_only_exported_metrics(exported):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported["names"] | PROMETHEUS_SERIES, (
            f"{where}: {sorted(names - exported['names'])} not exported; {expr!r}"
        )
    used = set().union(*(metric_names(e) for _, e in exprs))
    for key in (
        "rpnt_stage_latency_seconds_bucket",
        "rpnt_bins_stalled_total",
        "rpnt_sequence_gaps_total",
        "rpnt_rejected_messages_total",
        "rpnt_calibration_jobs_total",
        "rpnt_model_info",
    ):
        assert key in used, key


def test_every_alert_names_only_exported_metrics(exported):
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for r in rules:
        names = metric_names(r["expr"])
        assert names and names <= exported["names"] | PROMETHEUS_SERIES, (r["alert"], sorted(names))
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]


def test_the_server_exports_rejects_by_reason_and_the_bin_width(exported):
    fams = {f.name: f for f in text_string_to_metric_families(exported["text"])}
    reasons = {s.labels["reason"] for s in fams["rpnt_rejected_messages"].samples}
    from streaming.protocol import REJECT_REASONS

    assert reasons == set(REJECT_REASONS)
    assert [s.value for s in fams["rpnt_bin_seconds"].samples] == [0.02]
    assert [s.value for s in fams["rpnt_daemon_running"].samples] == [1.0]


# ---------------------------------------------------------------------------- promtool (real Prometheus)
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")
def test_promtool_loads_the_rules_and_they_fire_on_synthetic_series(tmp_path):
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # the rules as shipped, less their annotations (promtool compares annotations exactly; their
    # templates were checked above): what fires, when, with which labels
    doc = yaml.safe_load(ALERTS.read_text())
    for g in doc["groups"]:
        for rule in g["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    base = 'instance="rig1", job="rpnt"'
    series = [
        # daemon: 50 bins/s, p99 at 30 ms (> a 20 ms bin): every bin falls in the 30 ms bucket
        (f'rpnt_stage_latency_seconds_bucket{{{base}, stage="daemon", le="0.02"}}', "0+0x20"),
        (f'rpnt_stage_latency_seconds_bucket{{{base}, stage="daemon", le="0.03"}}', "0+3000x20"),
        (f'rpnt_stage_latency_seconds_bucket{{{base}, stage="daemon", le="+Inf"}}', "0+3000x20"),
        (f"rpnt_bin_seconds{{{base}}}", "0.02x20"),
        (f"rpnt_daemon_running{{{base}}}", "1x5 0x15"),
        (f"up{{{base}}}", "1x20"),
        (f"rpnt_bins_stalled_total{{{base}}}", "0+1x20"),
        (f"rpnt_sequence_gaps_total{{{base}}}", "0x20"),
        (f"rpnt_late_packets_total{{{base}}}", "0x20"),
        (f"rpnt_publish_dropped_total{{{base}}}", "0x20"),
        (f"rpnt_decode_errors_total{{{base}}}", "0x20"),
        (f'rpnt_rejected_messages_total{{{base}, reason="channel_count"}}', "0+5x20"),
        (f'rpnt_rejected_messages_total{{{base}, reason="magic"}}', "0x20"),
        (f'rpnt_calibration_jobs_total{{{base}, state="failed"}}', "0 0 1x18"),
    ]
    common = {"instance": "rig1", "job": "rpnt", "severity": "warning"}
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "RpntDaemonDown",
                        "exp_alerts": [{"exp_labels": common | {"severity": "critical"}}],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "RpntLatencyP99OverBin",
                        "exp_alerts": [{"exp_labels": common}],
                    },
                    {"eval_time": "15m", "alertname": "RpntBinsLost", "exp_alerts": [{"exp_labels": common}]},
                    {
                        "eval_time": "15m",
                        "alertname": "RpntRejectsRising",
                        "exp_alerts": [{"exp_labels": common | {"reason": "channel_count"}}],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "RpntCalibrationFailed",
                        "exp_alerts": [{"exp_labels": common | {"state": "failed"}}],
                    },
                    {
                        "eval_time": "3m",
                        "alertname": "RpntDaemonDown",
                        "exp_alerts": [],
                    },  # running, scraped: quiet
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    r = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yml"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- the collector
def _input(bins: int, version: str) -> dict:
    return {
        "snapshot": {
            "latency_ms": {},
            "counters": {"bins": bins},
            "rejected": {},
            "uptime_s": 1.0,
            "running": True,
        },
        "status": {"generation": 1, "model_version": version, "fingerprint": None, "bin_s": 0.02},
        "calibration_totals": {},
        "calibration_running": False,
        "registry_version": None,
    }


def test_each_app_has_its_own_collector_and_nothing_goes_to_the_global_registry():
    a, b = new_registry(lambda: _input(7, "a")), new_registry(lambda: _input(9, "b"))
    ga, gb = (prometheus_client.generate_latest(r).decode() for r in (a, b))
    assert "rpnt_bins_total 7.0" in ga and "rpnt_bins_total 9.0" in gb
    assert 'version="a"' in ga and 'version="b"' not in ga
    assert not any(n.startswith("rpnt_") for n in prometheus_client.REGISTRY._names_to_collectors)
    assert render(**_input(7, "a")) == ga


def test_docs_name_every_exported_family():
    ops = (REPO / "deploy" / "OPERATIONS.md").read_text()
    fams = {f.name for f in text_string_to_metric_families(render(**_input(1, "x")))}
    for fam in fams:
        assert fam in ops, f"{fam} is exported but deploy/OPERATIONS.md does not name it"


def test_the_deploy_files_are_where_the_docs_say():
    assert isinstance(json.loads(DASHBOARD.read_text())["panels"], list)
    for doc in (REPO / "deploy" / "OPERATIONS.md", REPO / "README.md"):
        text = doc.read_text()
        assert "deploy/grafana/rpnt-dashboard.json" in text and "deploy/prometheus/alerts.yml" in text, doc
    assert Path(ALERTS).is_file()
