"""The library names fields, the CLI names flags: one table plus each command's own spellings."""

from __future__ import annotations

import pickle

from ssd300.cli import main
from ssd300.commands.options import cli_message, flag_of
from ssd300.errors import UserInputError


def test_fields_become_flags_by_rule_table_and_command_override():
    error = UserInputError("num_train must be >= 0, got -3 (batch_size 2)", fields=("num_train", "batch_size"))
    assert cli_message(error) == "--train must be >= 0, got -3 (--batch-size 2)"
    assert cli_message(error, {"num_train": "--num-train-images"}) == (
        "--num-train-images must be >= 0, got -3 (--batch-size 2)")
    assert flag_of("iou_crop") == "--no-iou-crop" and flag_of("eval_backend") == "--eval-backend"


def test_only_whole_words_are_rewritten_and_fields_survive_pickling():
    error = UserInputError("save_dir and save: save is a file", fields=("save",))
    assert cli_message(error) == "save_dir and --save: save is a file"
    again = pickle.loads(pickle.dumps(error))
    assert again.fields == ("save",) and str(again) == str(error)


def test_synth_and_demo_spell_the_same_field_their_own_way(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--train", "-3"]) == 2
    synth_error = capsys.readouterr().err
    assert "--train" in synth_error and "num_train" not in synth_error
    assert main(["demo", "--out", str(tmp_path / "d"), "--num-train-images", "-3"]) == 2
    demo_error = capsys.readouterr().err
    assert "--num-train-images -3" in demo_error and "num_train" not in demo_error
