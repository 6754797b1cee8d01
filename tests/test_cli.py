"""The ``rpnt`` command line as people meet it: every ``--help`` reads cleanly, and Ctrl-C in a long
``rpnt pretrain`` says where the best checkpoint is and how to resume (exit 130, no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from rpnt_core.cli import COMMANDS, main

LIVE = 300.0  # liveness guard for the child process (torch import + a first epoch); never a timing assertion


# ============================================================================ --help
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_subcommand_has_no_doubled_percent(command, capsys):
    try:
        main([command, "--help"])
    except SystemExit as ex:
        assert ex.code == 0
    else:  # main returned: the subcommand's module did not import
        pytest.skip(f"rpnt {command} needs an extra that is not installed: {capsys.readouterr().err}")
    text = capsys.readouterr().out
    assert text.startswith("usage: rpnt ") and "%%" not in text, text


def test_help_percentages_read_as_written(capsys):
    for command, expect in (("pretrain", "last 10% of each recording"), ("finetune", "test = last 20%")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert expect in " ".join(capsys.readouterr().out.split()), command


def test_help_of_the_development_daemon_cli_has_no_doubled_percent():
    pytest.importorskip("zmq")
    from streaming.cli import build_replay_parser, build_serve_parser

    for parser in (build_serve_parser(), build_replay_parser()):
        assert "%%" not in parser.format_help()


# ============================================================================ flags from the options
PRETRAIN_FLAGS = {
    "--data", "--out", "--preset", "--epochs", "--seed", "--device", "--threads", "--steps-per-epoch",
    "--batch-size", "--window-len", "--lr", "--channels", "--adapter-lr-scale", "--target-share",
    "--objective", "--target", "--n-max", "--spatial", "--resume", "--allow-flagged", "--quiet",
}  # fmt: skip
FINETUNE_FLAGS = {
    "--data", "--target", "--allow-flagged", "--init", "--out", "--train-fraction", "--label-seconds",
    "--mode", "--last-layers", "--channels", "--preset", "--seed", "--device", "--threads", "--epochs",
    "--steps-per-epoch", "--batch-size", "--window-len", "--lr", "--patience", "--quiet",
}  # fmt: skip


def _flags(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def test_the_training_commands_keep_their_flags_and_take_the_options_defaults():
    from rpnt_core.commands import _finetune_parser, _pretrain_parser
    from rpnt_core.flags import option_values
    from rpnt_core.train.options import FinetuneOptions, PretrainOptions

    pre, ft = _pretrain_parser(), _finetune_parser()
    assert _flags(pre) == PRETRAIN_FLAGS and _flags(ft) == FINETUNE_FLAGS
    a = pre.parse_args(["--data", "d.npz", "--out", "p.safetensors"])
    assert a.objective is None  # the command chooses it from the data
    assert PretrainOptions(**option_values(PretrainOptions, a)) == PretrainOptions()
    a = ft.parse_args(["--data", "d.npz", "--out", "f.safetensors"])
    assert a.epochs is None and a.label_seconds is None  # sized to the labels with --label-seconds
    assert FinetuneOptions(**option_values(FinetuneOptions, a)) == FinetuneOptions()
    a = pre.parse_args(
        ["--data", "d", "--out", "o", "--quiet", "--spatial", "--objective", "masked", "--lr", "2e-3"]
    )
    opts = PretrainOptions(**option_values(PretrainOptions, a))
    assert (opts.progress, opts.spatial, opts.objective, opts.lr) == (False, True, "masked", 2e-3)
    with pytest.raises(SystemExit):
        ft.parse_args(["--data", "d", "--out", "o", "--train-fraction", "0.3", "--label-seconds", "60"])


def test_the_training_commands_build_their_help_without_torch():
    code = (
        "import contextlib, io, sys\n"
        "from rpnt_core.cli import main\n"
        "for command in ('pretrain', 'finetune', 'evaluate', 'inspect', 'simulate'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'])\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# ============================================================================ Ctrl-C in rpnt pretrain
def _session(path):
    from rpnt_core.data import Session, save_npz

    rng = np.random.default_rng(0)
    return save_npz(Session(counts=rng.poisson(1.0, size=(400, 6)).astype(np.int64), bin_s=0.02), path)


def _pretrain_cmd(data, out, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rpnt_core.cli",
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "2",
        "--window-len",
        "16",
        "--threads",
        "1",
        *extra,
    ]


def _env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal (a test run started in the background inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_pretrain_names_the_best_checkpoint_and_how_to_resume(tmp_path):
    pytest.importorskip("torch")
    from rpnt_core.checkpoint import read_header

    data = _session(tmp_path / "s.npz")
    out = tmp_path / "pre.safetensors"
    err_path = tmp_path / "stderr.txt"
    # far more epochs than can run before the signal: it is sent once the first epoch has been reported
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            _pretrain_cmd(data, out, "--epochs", "100000"),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=_default_sigint,
        )
        try:
            first = proc.stdout.readline()  # blocks until the first epoch's progress line
            assert first.startswith("epoch 1/100000"), first + err_path.read_text()
            proc.send_signal(signal.SIGINT)
            proc.stdout.read()
            rc = proc.wait(LIVE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = stderr.strip().splitlines()
    best, resume = lines[-2:]
    assert best.startswith(f"rpnt pretrain: interrupted; the best checkpoint so far is {out} (epoch "), stderr
    assert "validation loss" in best
    assert (
        "run the same command with --resume" in resume
        and str(out.with_suffix(".resume.safetensors")) in resume
    )
    epoch = int(best.split("(epoch ")[1].split(",")[0])
    assert read_header(out)[1]["metrics"]["epoch"] + 1 == epoch  # the message reads the checkpoint itself

    # the advice works: --resume continues after the epochs already done
    done = len((tmp_path / "pre.log.jsonl").read_text().splitlines())
    r = subprocess.run(
        _pretrain_cmd(data, out, "--epochs", str(done + 1), "--resume", "--quiet"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "pre.log.jsonl").read_text().splitlines()
    assert len(log) == done + 1 and '"epoch": %d' % done in log[-1]


def test_interrupt_before_any_epoch_says_nothing_was_saved(tmp_path):
    from rpnt_core.commands import _pretrain_interrupted

    msg = _pretrain_interrupted(tmp_path / "pre.safetensors", best_saved=False, resumable=False)
    assert msg == (
        "rpnt pretrain: interrupted before the first epoch ended; nothing was saved (run the command again)"
    )
    msg = _pretrain_interrupted(tmp_path / "pre.safetensors", best_saved=True, resumable=False)
    assert "--resume" not in msg and str(tmp_path / "pre.safetensors") in msg
