"""The daemon's options are declared once (streaming.options.DaemonConfig): the flags of every command
line, the [daemon] settings and the run-time DaemonOptions are derived from it, with the same names,
defaults and bounds."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from streaming.cli import SERVE_FLAGS, build_replay_parser, build_serve_parser  # noqa: E402
from streaming.flags import as_argv, config_from_args  # noqa: E402
from streaming.options import BACKENDS, TUNING, DaemonConfig, DaemonOptions  # noqa: E402


def _action(parser, dest):
    return next(a for a in parser._actions if a.dest == dest)


def test_every_daemon_parser_has_the_tuning_flags_with_the_declared_defaults():
    for parser in (build_serve_parser(), build_replay_parser()):
        for name in TUNING:
            action = _action(parser, name)
            assert action.option_strings == ["--" + name.replace("_", "-")]
            assert action.default == DaemonConfig.model_fields[name].default
            assert DaemonConfig.model_fields[name].description in action.help
        assert tuple(_action(parser, "backend").choices) == BACKENDS


def test_the_development_serve_keeps_its_own_bin_width_default():
    a = build_serve_parser().parse_args(["--model", "m"])
    assert (a.bin_ms, a.ingest, a.publish) == (20.0, "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556")
    assert "(default 20.0)" in _action(build_serve_parser(), "bin_ms").help


def test_runtime_option_defaults_are_the_declared_ones():
    assert DaemonConfig().options() == DaemonOptions()
    assert DaemonConfig(record_nwb="x.nwb").options().record_s == DaemonConfig().record_max_s
    assert DaemonConfig(bin_ms=50).bin_s(0.02) == 0.05 and DaemonConfig().bin_s(0.02) == 0.02


def test_a_flag_out_of_its_bounds_is_named():
    a = build_serve_parser().parse_args(["--model", "m", "--warmup-bins", "-1", "--rt-priority", "100"])
    with pytest.raises(ValueError, match=r"--warmup-bins: .*greater than or equal to 0.*--rt-priority"):
        config_from_args(DaemonConfig, a, SERVE_FLAGS)


def test_flags_for_a_child_daemon_round_trip():
    argv = ["--stall-ms", "5", "--affinity", "0,2", "--gc-freeze", "--rt-priority", "10"]
    cfg = config_from_args(DaemonConfig, build_serve_parser().parse_args(["--model", "m", *argv]), TUNING)
    again = build_serve_parser().parse_args(["--model", "m", *as_argv(cfg, TUNING)])
    assert config_from_args(DaemonConfig, again, TUNING) == cfg
    assert as_argv(DaemonConfig(), TUNING) == []
