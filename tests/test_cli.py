"""The ``rpnt`` command line as people meet it: every ``--help`` reads cleanly."""

from __future__ import annotations

import pytest

from rpnt_core.cli import COMMANDS, main


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
