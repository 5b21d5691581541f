"""Fail before the work, in one line, with the documented exit code; CLI manners (--version,
defaults in --help, plain top-level help, demo's --num-train-images)."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300 import __version__, cli
from ssd300.cli import main
from ssd300.coco_eval import load_coco_ground_truth
from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_eval_loader, build_train_loader
from ssd300.data.synth import generate_synthetic_dataset
from ssd300.distributed import DistributedContext
from ssd300.errors import EXIT_DIVERGED, EXIT_NO_RESULTS, Interrupted, NoResultsError, UserInputError
from ssd300.evaluation import EvaluationInterrupted, evaluate_model
from ssd300.files import check_output_path
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.runtime import Runtime
from ssd300.trainer import NonFiniteLossError

UNWRITABLE = Path("/proc/ssd300-test/out")  # /proc takes no new files, even as root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=2, num_val=2, seed=0,
                                      num_classes=2, max_objects=2, min_width=240, max_width=260,
                                      min_height=200, max_height=220)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint  # 3 classes: disc, rectangle


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- output paths --------------------------------------------------------------------------------


def test_check_output_path(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserInputError, match=r"^save .*file.txt: exists and is not a folder") as info:
        check_output_path(a_file, "save", folder=True)
    assert info.value.fields == ("save",)
    with pytest.raises(UserInputError, match=r"^results .*: is a folder; give a file name"):
        check_output_path(tmp_path, "results", folder=False)
    with pytest.raises(UserInputError, match=r"^out .*file.txt/x/y.json: .*file.txt is a file, not a folder"):
        check_output_path(a_file / "x" / "y.json", "out", folder=False)
    with pytest.raises(UserInputError, match=r"^out /proc/ssd300-test/out: cannot write in /proc") as info:
        check_output_path(UNWRITABLE, "--out", folder=True)  # a flag spelling is taken as its field
    assert info.value.fields == ("out",)
    deep = tmp_path / "new" / "deeper" / "results.json"
    assert check_output_path(deep, "results", folder=False) == deep
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the probe file is gone


@pytest.mark.parametrize("flag,folder", [("--save", True), ("--json-summary", False), ("--log-file", False),
                                         ("--tensorboard", True), ("--results", False)])
def test_train_output_paths_are_checked_before_the_work(capsys, data_dir, flag, folder):
    target = UNWRITABLE if folder else UNWRITABLE / "file.json"
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), "--backbone", "resnet18", "--epochs", "1",
                                   "--device", "cpu", flag, str(target)])
    assert f"error: {flag} {target}: cannot write in /proc" in err


def test_evaluate_detect_export_output_paths_are_checked_before_the_work(capsys, data_dir, checkpoint, tmp_path):
    image = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), (90, 20, 200)).save(image)
    for argv in (["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--device", "cpu",
                  "--results", str(UNWRITABLE / "r.json")],
                 ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--device", "cpu",
                  "--json-summary", str(UNWRITABLE / "s.json")],
                 ["detect", "--checkpoint", str(checkpoint), str(image), "--out", str(UNWRITABLE)],
                 ["export", "--checkpoint", str(checkpoint), "--out", str(UNWRITABLE / "m.onnx")],
                 ["export", "--checkpoint", str(checkpoint), "--out", str(UNWRITABLE / "m.pt")]):
        err = _one_line_error(capsys, argv)
        assert "cannot write in /proc" in err and ("--results" in err or "--json-summary" in err or "--out" in err)


def test_evaluation_prints_its_summary_before_writing_results(data_dir, checkpoint, tmp_path):
    label_map = LabelMap.from_categories([(1, "disc"), (2, "rectangle")])
    dataset = CocoDetection(data_dir / "val", data_dir / "annotations" / "instances_val.json", train=False,
                            label_map=label_map)
    model = SSD300("resnet18", num_classes=3)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    lines: list[str] = []
    blocked = tmp_path / "results.json"
    blocked.mkdir()  # the write fails after the evaluation
    with pytest.raises(OSError):
        evaluate_model(model, build_eval_loader(dataset, 2, num_workers=0), load_coco_ground_truth(
            dataset.annotation_file), label_map, ctx=DistributedContext(), runtime=Runtime.resolve("cpu", amp=False),
            channels_last=False, results_path=blocked, log=lines.append)
    assert any("Average Precision" in line or "(no detections)" in line for line in lines), lines

    calls = iter([False, True])
    with pytest.raises(EvaluationInterrupted):  # stops at the second batch when asked
        evaluate_model(model, build_eval_loader(dataset, 1, num_workers=0), None, label_map,
                       ctx=DistributedContext(), runtime=Runtime.resolve("cpu", amp=False), channels_last=False,
                       should_stop=lambda: next(calls))


# -- refused values ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "--seed must be in [0, 2147483647], got -1"),
    (["--epochs", "0"], "--epochs must be >= 1 to train, got 0"),
    (["--dali", "--num-workers", "0"], "--num-workers 0 with --dali: the DALI pipeline needs"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--keep-last", "-2"], "--keep-last must be >= 0"),
    (["--resume"], "--resume needs --save: the run folder"),
])
def test_bad_run_flags_are_one_line_errors(capsys, data_dir, flags, message):
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), *flags])
    assert message in err


def test_export_opset_outside_the_supported_range_is_refused(capsys, checkpoint, tmp_path):
    for opset, exporter in (("5", "auto"), ("11", "legacy"), ("17", "dynamo"), ("99", "auto")):
        err = _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"),
                                       "--opset", opset, "--exporter", exporter])
        assert f"--opset {opset}:" in err and ".." in err
    assert not (tmp_path / "m.onnx").exists()


def test_strict_images_error_crosses_the_worker_boundary_as_one_line(tmp_path):
    data = generate_synthetic_dataset(tmp_path / "synth", num_train=2, num_val=0, seed=0, num_classes=2,
                                      max_objects=1, min_width=240, max_width=260, min_height=200, max_height=220)
    broken = sorted((data / "train").iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    dataset = CocoDetection(data / "train", data / "annotations" / "instances_train.json", train=True, strict=True)
    loader = build_train_loader(dataset, 2, num_workers=1, seed=0)
    with pytest.raises(UserInputError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and str(broken) in message and "DataLoader" not in message, message


# -- exit codes ----------------------------------------------------------------------------------


class _Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise self.exc


@pytest.mark.parametrize("exc,code", [
    (NonFiniteLossError("loss is nan at iteration 3"), EXIT_DIVERGED),
    (NoResultsError("none of the 2 inputs could be read"), EXIT_NO_RESULTS),
    (UserInputError("bad"), 2),
    (Interrupted("terminated", signal.SIGTERM), 143),
    (Interrupted("interrupted", signal.SIGINT), 130),
    (KeyboardInterrupt(), 130),
])
def test_exit_codes(monkeypatch, capsys, exc, code):
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: _Raising(exc))
    assert main(["train"]) == code
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert code not in (2,) or isinstance(exc, UserInputError) and type(exc) is UserInputError


def test_detect_exits_4_when_no_input_could_be_read_and_skipped_files_keep_their_id(capsys, checkpoint, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "b.png").write_bytes(b"nope")
    out = tmp_path / "out"
    rc = main(["detect", "--checkpoint", str(checkpoint), str(tmp_path / "a.jpg"), str(tmp_path / "b.png"),
               "--out", str(out), "--device", "cpu"])
    assert rc == EXIT_NO_RESULTS
    assert "none of the 2 inputs could be read" in capsys.readouterr().err
    run = json.loads((out / "images.json").read_text())
    assert run["images"] == [] and [(s["id"], Path(s["file_name"]).name) for s in run["skipped"]] == [
        (1, "a.jpg"), (2, "b.png")]


# -- CLI manners ---------------------------------------------------------------------------------


def test_version_defaults_in_help_and_plain_top_level_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ssd300 {__version__}"
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "``" not in top and ":mod:" not in top and "ssd300 COMMAND --help" in " ".join(top.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 65)" in text and "(default: 32)" in text and "(default: 0.0026)" in text
    assert "(default: 21 31 37 42 48 53 59 64)" in text and "(default: False)" not in text


def test_demo_counts_are_named_num_and_the_old_spelling_still_works(capsys):
    from ssd300.commands import demo

    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    demo.add_arguments(parser)
    help_text = parser.format_help()
    assert "--num-train-images" in help_text and "--train-images" not in help_text.replace("--num-train-images", "")
    assert parser.parse_args([]).num_train_images == demo.DEMO_DEFAULTS["train_images"]
    args = parser.parse_args(["--train-images", "7", "--val-images", "3"])
    assert (args.num_train_images, args.num_val_images) == (7, 3)
    assert "--train-images is deprecated; use --num-train-images" in capsys.readouterr().err


def test_synth_refuses_a_non_empty_folder_without_overwrite(capsys, tmp_path):
    out = tmp_path / "data"
    (out / "annotations").mkdir(parents=True)
    theirs = out / "annotations" / "instances_train.json"
    theirs.write_text('{"images": [], "annotations": [], "categories": []}')
    argv = ["synth", "--out", str(out), "--train", "2", "--val", "1"]
    err = _one_line_error(capsys, argv)
    assert "is not empty (it holds a different dataset); pass --overwrite" in err
    assert theirs.read_text().startswith('{"images": []')
    assert main([*argv, "--overwrite"]) == 0 and len(json.loads(theirs.read_text())["images"]) == 2
    capsys.readouterr()
    assert main(argv) == 0  # the same dataset again: kept, nothing to overwrite
    np.testing.assert_equal(len(list((out / "train").glob("*.jpg"))), 2)
