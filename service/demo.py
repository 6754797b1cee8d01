"""``rpnt demo``: the main job, end to end: a new recording day decoded from seconds of labels, live.

Offline half (:mod:`rpnt_core.demo`): with the shared Spike days present, pretrain on the clean
days before the newest one and calibrate the newest from its first 60 s of labels (RPNT
pretrained, RPNT from scratch, classic baselines, the same labels); otherwise the same on
simulated sessions.  Live half (here):

1. export the RPNT decoder with the better *validation* R² to ONNX (parity-checked on the session);
2. start ``rpnt serve`` (daemon + HTTP control plane) in a child process, on a fresh registry;
3. replay the new session through ZeroMQ at real-time pace (the last ``--replay-s`` seconds of
   it), streaming its recorded target series (velocity, cursor position, ...) as the rig's
   KINEMATICS;
4. ``--calibrate-after-s`` seconds in, ``POST /calibrate`` with ``source=recent``: a closed-loop
   few-shot recalibration on what the daemon has decoded so far.  It runs in its own niced
   process while the replay goes on, and goes live at a bin boundary only if it beats the live
   model on its own held-out bins;
5. print the results table, R² of the replayed stream, the per-stage latency table and the
   calibration outcome; write ``replay/report.json`` with ``velocity.png`` and ``latency.png``.

``--offline`` stops after the offline half.  ``--data FILE`` runs it all on a real recording.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import threading
import time
from pathlib import Path

from streaming.serve_process import ServeProcess

DEMO_CALIBRATION_ENV = {
    "RPNT_CALIBRATION__EPOCHS": "8",
    "RPNT_CALIBRATION__STEPS_PER_EPOCH": "10",
    "RPNT_CALIBRATION__MAX_STEPS": "80",
    "RPNT_CALIBRATION__PATIENCE": "4",
}


def http_call(
    url: str,
    *,
    headers: dict | None = None,
    form: dict | None = None,
    raw: bool = False,
    timeout: float = 30.0,
):
    """(status, JSON body | text) of a GET, or of a form POST when ``form`` is given (stdlib only)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    body = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if form is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    return code, (text if raw else json.loads(text))


def wait_for_job(serve: "ServeProcess", job_id: str, *, log) -> dict:
    """Poll ``GET /calibrate/{job_id}`` until the job ends.  No deadline of its own: the service
    fails a job past ``calibration.timeout_s``; a starved job is reported once as waiting for CPU."""
    said = False
    while True:
        st = http_call(f"{serve.url}/calibrate/{job_id}")[1]
        if st.get("state") in ("succeeded", "rejected", "failed"):
            return st
        if st.get("phase") == "waiting for CPU" and not said:
            log(
                f"[demo] calibration job {job_id} is waiting for CPU (other work keeps the cores busy; it runs at "
                "lower priority than decoding and will finish, slower)"
            )
            said = True
        time.sleep(0.5)


def live_part(
    *, workdir: Path, data, result: dict, replay_s: float, calibrate_after_s: float | None, progress: bool
) -> dict:
    """The live half (steps 1–5 of the module docstring) on ``data`` (the offline half's data:
    ``target`` session, ``splits``, ``source``) with the offline ``result``'s decoders.

    Returns:
        ``decoder``, ``offline_test_r2``, ``test_split``, ``export``, ``export_parity``, ``report``
        (what :func:`live_lines` prints) and ``report_dir``.  Raises ``RuntimeError`` when the
        service does not start or the replay fails.
    """
    import numpy as np

    from streaming.report import write_report

    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    target = data.target
    chosen, step_rep = export_best(workdir / "export", data=data, result=result, log=log)
    run_dir = workdir / "live"
    run_dir.mkdir(parents=True, exist_ok=True)
    log("[demo] starting rpnt serve (daemon + HTTP control plane) …")
    serve = ServeProcess(
        model=workdir / "export",
        registry=workdir / "registry",
        run_dir=run_dir,
        token=secrets.token_urlsafe(24),
        env=DEMO_CALIBRATION_ENV,
    )
    out: dict = {
        "decoder": chosen["decoder"],
        "offline_test_r2": chosen["test_r2"],
        "test_split": list(data.splits.test),
        "export": str(workdir / "export"),
        "export_parity": {k: step_rep.get(k) for k in ("max_abs_error", "passed") if k in step_rep},
    }
    T = target.n_bins
    lo = T - min(T, max(1, int(round(replay_s / target.bin_s))))
    counts, vel = np.asarray(target.counts[lo:]), np.asarray(target.labels[lo:], dtype=np.float32)
    try:
        serve.wait_ready()
        log(
            f"[demo] replaying bins {lo}–{T} ({(T - lo) * target.bin_s:.0f} s) at real-time pace"
            + (f"; POST /calibrate (closed loop) after {calibrate_after_s:g} s" if calibrate_after_s else "")
            + " …"
        )
        res, job = replay_with_calibration(
            serve,
            counts=counts,
            labels={target.target: vel},
            bin_s=target.bin_s,
            calibrate_after_s=calibrate_after_s,
            log=log,
        )
        status = http_call(serve.url + "/status")[1]
        (run_dir / "metrics.txt").write_text(http_call(serve.url + "/metrics", raw=True)[1])
        models = http_call(serve.url + "/models")[1]
    finally:
        rc = serve.stop()
    rep = replay_report(
        res, data=data, export=workdir / "export", first_bin=lo, counts=counts, velocity=vel, calibration=job
    )
    rep.update(models=models, serve_exit=rc, daemon_counters=status.get("counters"))
    write_report(run_dir / "replay", rep, res, vel)
    out.update(report=rep, report_dir=str(run_dir / "replay"))
    return out


def export_best(out: Path, *, data, result: dict, log) -> tuple[dict, dict]:
    """Export the RPNT decoder of ``result`` with the best *validation* R² (never chosen on test)
    to ``out``, parity-checked on ``data``'s target session; (its results row, the step graph's
    parity report)."""
    from exporters.onnx_export import export_model
    from rpnt_core import load_checkpoint
    from rpnt_core.data.session import conditioning_metadata

    target = data.target
    rpnt_rows = [r for r in result["rows"] if r.get("checkpoint")]
    chosen = max(rpnt_rows, key=lambda r: r["val_r2"])
    log(f"[demo] exporting {chosen['decoder']} (best validation R² {chosen['val_r2']:.4f}) to ONNX …")
    ckpt = Path(chosen["checkpoint"]).resolve()
    exp = export_model(
        load_checkpoint(ckpt),
        out,
        parity_counts=target.counts,
        parity_target=target.labels,
        parity_source=data.source,
        checkpoint=str(ckpt),
        metadata=conditioning_metadata(target),
    )
    return chosen, exp.reports.get("step", {})


class BackgroundReplay:
    """:func:`streaming.replay.run_replay` into a running ``rpnt serve`` on a thread of its own.

    Args:
        serve: the service (its ``ingest`` / ``publish`` endpoints).
        counts: (T, N) counts to replay.
        bin_s: their bin width, in seconds.
        **options: ``run_replay``'s other keyword arguments (``labels``, ``realtime``,
            ``send_kinematics``, ``drain_timeout_s`` …).
    """

    def __init__(self, serve: ServeProcess, *, counts, bin_s: float, **options) -> None:
        self._box: dict = {}
        kwargs = dict(counts=counts, bin_ns=round(bin_s * 1e9), ingest=serve.ingest, publish=serve.publish)
        self.thread = threading.Thread(target=self._run, kwargs={**kwargs, **options}, name="demo-replay")
        self.thread.start()

    def _run(self, **kwargs) -> None:
        from streaming.replay import run_replay

        try:
            self._box["res"] = run_replay(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self._box["error"] = exc

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def result(self):
        """Wait for the replay to end; its result.  Raises ``RuntimeError`` if it failed."""
        self.thread.join()
        if "error" in self._box:
            raise RuntimeError(f"replay failed: {self._box['error']}")
        return self._box["res"]


def replay_with_calibration(
    serve: ServeProcess, *, counts, labels: dict, bin_s: float, calibrate_after_s: float | None, log
) -> tuple:
    """Replay ``counts`` into ``serve`` at real-time pace with ``labels`` as the rig's KINEMATICS;
    once the daemon has decoded ``calibrate_after_s`` seconds of bins, ``POST /calibrate``
    (``source=recent``) and, after the replay, wait for that job.

    Returns:
        (the replay's :func:`streaming.replay.run_replay` result, the job's final status — or the
        refused request's answer with its ``http_status`` — or None without a calibration).
    """
    replay = BackgroundReplay(
        serve, counts=counts, bin_s=bin_s, labels=labels, realtime=True, send_kinematics=True
    )
    job = calibrate_when_decoded(serve, replay, seconds=calibrate_after_s, bin_s=bin_s, log=log)
    res = replay.result()
    if job and job.get("job_id"):
        job = wait_for_job(serve, job["job_id"], log=log)
    return res, job


def calibrate_when_decoded(
    serve: ServeProcess, replay: BackgroundReplay, *, seconds: float | None, bin_s: float, log
) -> dict | None:
    """``POST /calibrate`` (``source=recent``, ``seconds``) once the daemon has *decoded* that many
    seconds of bins (not after that much wall time: a slow start on a busy machine would leave too
    few recent bins, a 422), unless ``replay`` ends first; its answer with ``http_status``, or None."""
    if not seconds:
        return None
    need = int(math.ceil(seconds / bin_s))
    while (
        replay.is_alive()
        and (http_call(serve.url + "/status")[1].get("counters") or {}).get("bins", 0) < need
    ):
        replay.join(0.2)
    if not replay.is_alive():
        return None
    code, job = http_call(
        serve.url + "/calibrate",
        headers=serve.headers(),
        form={"source": "recent", "seconds": str(seconds)},
    )
    log(f"[demo] POST /calibrate → {code} {job.get('job_id') or job.get('detail')}")
    return job | {"http_status": code}


def replay_report(
    res, *, data, export: Path, first_bin: int, counts, velocity, calibration: dict | None
) -> dict:
    """The replay's report (:func:`streaming.report.build_report`) in the session's bin numbers
    (the replay started at ``first_bin``): scores on the test split, the bins a swap landed on, and
    whether the daemon's output equals ``export`` decoding ``counts`` offline; ``calibration``: the job's
    final status (or None)."""
    import numpy as np

    from streaming.protocol import PredFlag
    from streaming.report import build_report

    target, (test_lo, test_hi) = data.target, data.splits.test
    lo = first_bin
    rep = build_report(
        res,
        recorded_velocity=velocity,
        test_range=(max(0, test_lo - lo), test_hi - lo) if test_hi > lo else None,
        meta={
            "data": data.source,
            "target": target.target,
            "bin_range": [lo, target.n_bins],
            "model": str(export),
            "daemon_mode": "rpnt serve (child process)",
            "backend": "onnx-cpu",
        },
    )
    if "score_test" in rep:  # bins of the session, not of the replayed range
        rep["score_test"]["bins"] = [lo + b for b in rep["score_test"]["bins"]]
    rep["calibration"] = calibration
    swapped = np.flatnonzero((res.flags & int(PredFlag.SWAPPED)) != 0)
    rep["swap_bins"] = [int(lo + k) for k in swapped]
    rep["online_equals_offline"] = compare_offline(export, counts, res)
    return rep


def compare_offline(export: Path, counts, res) -> dict:
    """The replayed predictions against the same export decoding the same counts offline
    (:func:`rpnt_core.decoder.decode_stream`), over the bins before the first swap or STALLED bin
    (a swap changes the model; a stalled bin closes with what had arrived, as a live rig would see)."""
    import numpy as np

    from exporters.runtime import load_engine
    from rpnt_core.decoder import decode_stream
    from streaming.protocol import PredFlag

    offline = decode_stream(load_engine(export), np.asarray(counts))
    stop_flags = int(PredFlag.SWAPPED) | int(PredFlag.STALLED)
    hit = np.flatnonzero((res.flags & stop_flags) != 0)
    n = int(hit[0]) if hit.size else int(res.n_bins)
    m = res.received[:n]
    err = float(np.abs(res.velocity[:n][m] - offline[:n][m]).max()) if m.any() else float("nan")
    return {
        "bins_compared": int(m.sum()),
        "max_abs_diff": err,
        "equal": bool(m.any() and err <= 1e-4),
        "stopped_at": None if not hit.size else {"bin": int(hit[0]), "flags": int(res.flags[hit[0]])},
    }


def live_lines(live: dict) -> list[str]:
    """The live half's summary lines for the terminal, from :func:`live_part`'s answer."""
    from streaming.report import summary_lines

    rep = live["report"]
    lines = [f"live: {live['decoder']} exported to ONNX and served by `rpnt serve`"]
    lines += summary_lines(rep)
    st = rep.get("score_test")
    swap_before_test = bool(rep["swap_bins"] and st and rep["swap_bins"][0] < st["bins"][1])
    eq = rep["online_equals_offline"]
    why = "" if eq["stopped_at"] is None else f" (up to bin {eq['stopped_at']['bin']}: a swap or STALLED bin)"
    lines.append(
        f"online = offline: the daemon's predictions {'equal' if eq['equal'] else 'DIFFER FROM'} the same "
        f"export decoding the same counts offline on {eq['bins_compared']} bins{why}, max |Δ| "
        f"{eq['max_abs_diff']:.1e}"
    )
    lines.append(
        f"offline `rpnt evaluate` of the served model on the whole test split {live['test_split']}: "
        f"{live['offline_test_r2']:.4f}"
        + (
            " (the stream above was decoded by the recalibrated model from the swap on)"
            if swap_before_test
            else ""
        )
    )
    job = rep.get("calibration")
    if job:
        res = job.get("result") or {}
        if job.get("state") in ("succeeded", "rejected"):
            lines.append(
                f"calibration (POST /calibrate, closed loop, {job.get('n_bins')} bins): {job['state']} — "
                f"holdout R² candidate {res.get('candidate_holdout_r2', float('nan')):.4f} vs live "
                f"{res.get('live_holdout_r2', float('nan')):.4f}"
                + (
                    f"; swapped in at bin {rep['swap_bins'][0]} with no bin missed"
                    if rep["swap_bins"] and rep["bins_lost"] == 0
                    else ""
                )
                + (
                    ""
                    if rep["swap_bins"] or job["state"] != "succeeded"
                    else " (went live after the replay ended)"
                )
            )
        else:
            lines.append(
                f"calibration: {job.get('state') or job.get('http_status')} — "
                f"{job.get('error') or job.get('detail')}"
            )
    lines.append(f"report: {Path(live['report_dir']) / 'report.json'} (+ velocity.png, latency.png)")
    return lines


def main(argv: list[str] | None = None) -> int:
    from rpnt_core.demo import add_demo_arguments, format_table, offline_part

    p = argparse.ArgumentParser(
        prog="rpnt demo",
        description=__doc__.split("\n\n")[0]
        + " "
        + (
            "Simulate → pretrain → few-shot finetune → export → start the daemon → replay the held-out session "
            "through ZeroMQ at real-time pace while one POST /calibrate runs → R², latency table, report with plots. "
            "About 5 minutes on 2 cores."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(p)
    p.add_argument(
        "--offline", action="store_true", help="stop after the offline half (no export, daemon, replay)"
    )
    p.add_argument(
        "--replay-s",
        type=float,
        default=60.0,
        help="replay the last this-many seconds of the session (default 60: all of a simulated one)",
    )
    p.add_argument(
        "--calibrate-after-s",
        type=float,
        default=12.0,
        help="POST /calibrate (source=recent) this far into the replay; 0 = no calibration (default 12)",
    )
    a = p.parse_args(argv)
    try:
        result, data, workdir = offline_part(a)
        live = (
            None
            if a.offline
            else live_part(
                workdir=workdir,
                data=data,
                result=result,
                replay_s=a.replay_s,
                calibrate_after_s=a.calibrate_after_s or None,
                progress=not a.quiet,
            )
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"rpnt demo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"rpnt demo: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    if live is not None:
        result["live"] = {k: v for k, v in live.items() if k != "report"}
        (workdir / "results.json").write_text(json.dumps(result, indent=2, default=str))
        print()
        print("\n".join(live_lines(live)))
    print(f"results: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
