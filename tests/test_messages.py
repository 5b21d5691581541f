"""Messages that name the right thing (issue 18, item 9): contradicting flags, inputs of the wrong
kind (a file for a folder, a folder for a file, a classifier for a detector), float images out of
range, help texts that list every format. The library names fields, the CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.checkpoint import load_checkpoint, load_model
from ssd300.cli import main
from ssd300.commands.detect import expand_entries
from ssd300.commands.options import cli_message
from ssd300.data.coco import resolve_split
from ssd300.data.synth import generate_synthetic_dataset
from ssd300.errors import UserInputError
from ssd300.inference import Detector
from ssd300.train_config import TrainConfig


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _image(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- detect: which model


def test_detect_refuses_model_and_checkpoint_together(tmp_path, capsys):
    image = _image(tmp_path / "a.jpg")
    onnx, ckpt = tmp_path / "A.onnx", tmp_path / "B.pt"
    onnx.write_bytes(b"x")
    ckpt.write_bytes(b"x")
    rc, err = _err(capsys, ["detect", image, "--model", onnx, "--checkpoint", ckpt, "--out", tmp_path / "o"])
    assert rc == 2
    line = _one_error_line(err)
    assert str(onnx) in line and str(ckpt) in line and "--model" in line and "--checkpoint" in line
    assert not (tmp_path / "o").exists()
    rc, err = _err(capsys, ["detect", image, "--out", tmp_path / "o"])
    assert rc == 2 and "--checkpoint" in _one_error_line(err)


def test_detect_names_the_flag_the_user_gave(tmp_path, capsys):
    image = _image(tmp_path / "a.jpg")
    rc, err = _err(capsys, ["detect", image, "--model", tmp_path / "missing.pt", "--out", tmp_path / "o"])
    assert rc == 2 and _one_error_line(err).endswith(f"error: --model {tmp_path / 'missing.pt'}: no such file")
    exported = tmp_path / "m.onnx"
    exported.write_bytes(b"x")
    rc, err = _err(capsys, ["detect", image, "--model", exported, "--out", tmp_path / "o", "--amp"])
    line = _one_error_line(err)
    assert rc == 2 and f"--model {exported}: an exported file runs as exported" in line and "--checkpoint" not in line


def test_a_run_folder_given_as_checkpoint_suggests_its_checkpoint(tmp_path, capsys, tiny_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(tiny_checkpoint.read_bytes())
    image = _image(tmp_path / "a.jpg")
    rc, err = _err(capsys, ["detect", image, "--checkpoint", run, "--out", tmp_path / "o"])
    assert rc == 2
    assert _one_error_line(err).endswith(
        f"--checkpoint {run}: is a folder, not a model file; did you mean --checkpoint {run / 'last.pt'}?")
    # the library says the same to Python callers; best.pt wins over last.pt
    (run / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(UserInputError, match=r"is a folder, not a checkpoint file; did you mean .*best\.pt\?$"):
        load_checkpoint(run)
    # train/evaluate: the config's check says "folder", not "file not found"
    with pytest.raises(UserInputError) as caught:
        TrainConfig(mode="evaluation", checkpoint=run)
    assert str(caught.value) == f"checkpoint {run}: is a folder, not a file; did you mean {run / 'best.pt'}?"
    assert cli_message(caught.value).startswith(f"--checkpoint {run}: is a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _err(capsys, ["evaluate", "--checkpoint", empty, "--data", tmp_path])
    assert rc == 2 and f"--checkpoint {empty}: is a folder, not a file" in _one_error_line(err)


def test_a_resnet_classifier_given_as_checkpoint_suggests_backbone_path(tmp_path, capsys):
    # torchvision's ResNet layout (a few of its keys are enough to be recognised)
    state = {"conv1.weight": torch.zeros(2, 3, 1, 1), "bn1.weight": torch.ones(2),
             "layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1), "layer4.0.conv1.weight": torch.zeros(2, 2, 1, 1),
             "fc.weight": torch.zeros(10, 2), "fc.bias": torch.zeros(10)}
    classifier = tmp_path / "resnet18.pth"
    torch.save(state, classifier)
    with pytest.raises(UserInputError) as caught:
        load_model(classifier)
    assert "not an SSD300 checkpoint but a ResNet classifier's weights" in str(caught.value)
    assert str(caught.value).endswith("give the file to training as backbone_path")
    assert caught.value.fields == ("backbone_path",)
    rc, err = _err(capsys, ["detect", _image(tmp_path / "a.jpg"), "--checkpoint", classifier, "--out", tmp_path / "o"])
    line = _one_error_line(err)
    assert rc == 2 and str(classifier) in line and line.endswith("give the file to training as --backbone-path")


# ----------------------------------------------------------------------------- Detector: pixel values


def test_detector_refuses_float_images_out_of_range_nan_and_empty(tiny_model):
    detector = Detector(tiny_model, device="cpu")
    with pytest.raises(UserInputError) as caught:
        detector(np.full((20, 30, 3), 200.0, np.float32))
    message = str(caught.value)
    assert message == ("images: a float image array (shape (20, 30, 3), float32) has values in [200, 200]; "
                       "float pixels must be finite and in [0, 1]; for 0..255 pixels pass uint8 (or divide by 255)")
    assert caught.value.fields == ("images",)
    nan = np.zeros((8, 8, 3), np.float64)
    nan[0, 0, 0] = np.nan
    with pytest.raises(UserInputError, match=r"^images: a float image array \(shape \(8, 8, 3\), float64\) holds 1 "
                                             r"NaN/inf values \(values in \[0, 0\]\); float pixels must be finite"):
        detector(nan)
    with pytest.raises(UserInputError, match=r"has values in \[-0\.5, 0\.5\]"):
        detector(torch.full((3, 10, 10), 0.5).index_fill_(1, torch.tensor([0]), -0.5))
    with pytest.raises(UserInputError, match=r"^images: an empty image array \(shape \(0, 0\), uint8\)"):
        detector(np.zeros((0, 0), np.uint8))
    with pytest.raises(UserInputError, match=r"^images: an empty image tensor \(shape \(3, 0, 5\), float32\)"):
        detector([torch.zeros(3, 0, 5)])
    # in range: accepted, the same result as the uint8 image it scales to
    ok = detector(np.full((20, 30, 3), 1.0, np.float32))
    same = detector(np.full((20, 30, 3), 255, np.uint8))
    assert ok.image_size == (30, 20)
    torch.testing.assert_close(ok.scores, same.scores)


# ----------------------------------------------------------------------------- data paths


def test_data_given_a_json_file_says_it_is_a_file_and_what_data_expects(tmp_path, capsys):
    annotations = tmp_path / "instances.json"
    annotations.write_text("{}")
    with pytest.raises(UserInputError) as caught:
        resolve_split(annotations, "val")
    assert str(caught.value) == (
        f"data {annotations}: is a file; data takes a dataset folder (holding val/ or val2017/ and "
        "annotations/instances_val.json, or a VOC/YOLO layout); for a single COCO-format json give it as "
        "val_annotations with its image folder as val_images")
    assert caught.value.fields == ("data", "val_annotations", "val_images")
    rc, err = _err(capsys, ["evaluate", "--data", annotations, "--checkpoint", annotations])
    line = _one_error_line(err)
    assert rc == 2 and f"--data {annotations}: is a file" in line
    assert "give it as --val-annotations with its image folder as --val-images" in line
    assert "does not exist" not in line


# ----------------------------------------------------------------------------- synth --train 0


def test_synth_with_an_empty_train_split(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--train", "0", "--val", "2"]) == 0
    said = capsys.readouterr().out
    assert "0 train + 2 val images" in said and f"the train split is empty: evaluate with --data {out}" in said
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert train["images"] == [] and train["annotations"] == [] and train["categories"] == val["categories"]
    assert (out / "train").is_dir() and not any((out / "train").iterdir())
    assert resolve_split(out, "val")[1] == out / "annotations" / "instances_val.json"
    with pytest.raises(UserInputError, match=r"the train split is empty: image folder .*train has no images$"):
        resolve_split(out, "train")
    rc, err = _err(capsys, ["train", "--data", out, "--epochs", "1"])
    assert rc == 2 and f"--data {out}: the train split is empty" in _one_error_line(err)
    generate_synthetic_dataset(tmp_path / "noval", 2, 0)
    assert json.loads((tmp_path / "noval" / "annotations" / "instances_val.json").read_text())["images"] == []


# ----------------------------------------------------------------------------- detect inputs


def test_broken_links_and_missing_inputs_are_listed_with_ids(tmp_path):
    folder = tmp_path / "photos"
    _image(folder / "b.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "a.jpg")
    os.symlink(tmp_path / "gone.txt", folder / "notes.txt")  # not an image name: not an input
    entries = expand_entries([str(tmp_path / "nope.jpg"), str(folder), str(tmp_path / "none*.png")])
    assert entries == [
        (str(tmp_path / "nope.jpg"), "no such file or folder"),
        (str(folder / "a.jpg"), f"broken symbolic link (its target {tmp_path / 'gone.jpg'} does not exist)"),
        (str(folder / "b.jpg"), None),
        (str(tmp_path / "none*.png"), "pattern matches no image files"),
    ]


def test_detect_lists_every_skipped_input_with_its_id_and_the_path_once(tmp_path, capsys, tiny_checkpoint):
    folder = tmp_path / "photos"
    _image(folder / "b.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "a.jpg")
    (folder / "c.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    rc = main(["detect", str(tmp_path / "nope.jpg"), str(folder), "--checkpoint", str(tiny_checkpoint),
               "--out", str(out), "--no-images", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0
    run = json.loads((out / "images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name) for i in run["images"]] == [(3, "b.jpg")]
    assert [(s["id"], Path(s["file_name"]).name) for s in run["skipped"]] == [(1, "nope.jpg"), (2, "a.jpg"),
                                                                              (4, "c.jpg")]
    assert run["skipped"][1]["error"].startswith("broken symbolic link")
    assert run["skipped"][2]["error"].startswith("not a readable image") and "c.jpg" not in run["skipped"][2]["error"]
    lines = [line for line in err.splitlines() if "c.jpg" in line]
    assert len(lines) == 1 and lines[0].count("c.jpg") == 1, lines
    assert f"skipping {folder / 'a.jpg'}: broken symbolic link" in err


# ----------------------------------------------------------------------------- flags


def test_evaluate_has_strict_images(tmp_path):
    import argparse

    from ssd300.commands import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")  # the config checks it exists; nothing loads it here
    assert evaluate.config_from_args(parser.parse_args(["--checkpoint", str(ckpt), "--strict-images"])).strict_images
    assert not evaluate.config_from_args(parser.parse_args(["--checkpoint", str(ckpt)])).strict_images


@pytest.mark.parametrize("epochs", [0, -3])
def test_epochs_messages_agree(epochs, tmp_path, capsys):
    with pytest.raises(UserInputError) as caught:
        TrainConfig(epochs=epochs)
    assert str(caught.value) == f"epochs must be >= 1 to train, got {epochs}"
    rc, err = _err(capsys, ["train", "--data", tmp_path, "--epochs", str(epochs)])
    assert rc == 2 and _one_error_line(err).endswith(f"--epochs must be >= 1 to train, got {epochs}")


def test_help_texts_list_every_exported_format(capsys):
    for command, wanted in (("detect", ("ONNX", "pt2", "TorchScript")), ("export", ("ONNX", "pt2", "torchscript"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(word in text for word in wanted), (command, text)
    assert main(["--help"]) == 0
    overview = capsys.readouterr().out
    assert "ONNX, pt2 (torch.export) or TorchScript" in overview and "ONNX/pt2/TorchScript" in overview
