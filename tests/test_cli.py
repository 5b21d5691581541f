import subprocess
import sys

import pytest

from ssd300 import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_reference_style_flags_route_to_train(monkeypatch):
    seen = {}

    class FakeTrain:
        @staticmethod
        def add_arguments(parser):
            parser.add_argument("--mode")

        @staticmethod
        def run(args):
            seen["mode"] = args.mode
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: FakeTrain)
    assert cli.main(["--mode", "evaluation"]) == 0
    assert seen == {"mode": "evaluation"}


def test_user_input_error_is_one_line_exit_2(monkeypatch, capsys):
    from ssd300.errors import UserInputError

    class Failing:
        @staticmethod
        def add_arguments(parser):
            pass

        @staticmethod
        def run(args):
            raise UserInputError("data/ann.json: annotation 3 points at unknown image 9")

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Failing)
    assert cli.main(["evaluate"]) == 2
    err = capsys.readouterr().err
    assert err == "ssd300 evaluate: error: data/ann.json: annotation 3 points at unknown image 9\n"


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ssd300", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "synth" in result.stdout
