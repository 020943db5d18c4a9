"""The `jacana` command: every subcommand is wired and documents itself."""

from __future__ import annotations

import pytest

from jacana.cli.main import build_parser, main


@pytest.mark.parametrize("command", ["generate", "evaluate", "optimize", "serve-stage"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: jacana " + command in capsys.readouterr().out


def test_serve_stage_refuses_a_missing_stage(capsys):
    args = build_parser().parse_args(["serve-stage", "--stage", "no_such_module:factory"])
    assert args.func(args) == 2
    assert "no_such_module" in capsys.readouterr().err


def test_relax_end_is_checked_before_any_data(capsys):
    for bad in ("0", "1.5", "wide"):
        with pytest.raises(SystemExit) as info:
            main(["optimize", "--relax-end", bad, "--out", "unused"])
        assert info.value.code == 2 and "expected a scale in (0, 1]" in capsys.readouterr().err
    args = build_parser().parse_args(["optimize", "--out", "o"])
    assert args.relax_end == 0.1  # the default annealing
    assert build_parser().parse_args(["optimize", "--relax-end", "1", "--out", "o"]).relax_end == 1.0
