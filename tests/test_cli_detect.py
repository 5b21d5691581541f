"""``ssd300 detect`` and ``ssd300 export`` end to end: inputs, outputs, skips, strict mode, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.cli import main
from ssd300.commands.detect import expand_inputs, output_names
from ssd300.errors import UserInputError
from ssd300.inference import Detector
from ssd300.labels import LabelMap

LABEL_MAP = LabelMap.from_categories([(5, "disc"), (9, "ring")])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_tiny_model, make_tiny_checkpoint) -> Path:
    model = make_tiny_model(3, conf_scale=0.3).eval()
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ssd.pt", LABEL_MAP, model=model)


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path) -> Path:
    _image(tmp_path / "one.jpg", (320, 240), 0)
    _image(tmp_path / "folder" / "two.png", (200, 300), 1)
    _image(tmp_path / "folder" / "one.jpg", (260, 260), 2)  # same stem as ../one.jpg
    (tmp_path / "folder" / "readme.txt").write_text("not an image")  # ignored: not an image name
    (tmp_path / "folder" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    _image(tmp_path / "globbed" / "three.jpg", (300, 200), 3)
    return tmp_path


def test_expand_inputs_orders_and_deduplicates(inputs):
    paths, missing = expand_inputs([str(inputs / "one.jpg"), str(inputs / "folder"),
                                    str(inputs / "glob*" / "*.jpg"), str(inputs / "one.jpg"),
                                    str(inputs / "nope.jpg"), str(inputs / "none*.png")])
    names = [str(Path(p).relative_to(inputs)) for p in paths]
    assert names == ["one.jpg", "folder/broken.jpg", "folder/one.jpg", "folder/two.png", "globbed/three.jpg"]
    assert [Path(m).name for m, _ in missing] == ["nope.jpg", "none*.png"]
    assert output_names(paths) == ["one_1", "broken", "one_3", "two", "three"]


def test_detect_writes_json_coco_results_and_annotated_images(inputs, checkpoint, capsys):
    out = inputs / "out"
    rc = main(["detect", "--checkpoint", str(checkpoint), str(inputs / "one.jpg"), str(inputs / "folder"),
               str(inputs / "globbed" / "*.jpg"), "--out", str(out), "--device", "cpu", "--batch-size", "2",
               "--score-threshold", "0.2", "--max-detections", "50"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "not a readable image" in err

    run = json.loads((out / "images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name) for i in run["images"]] == [
        (1, "one.jpg"), (3, "one.jpg"), (4, "two.png"), (5, "three.jpg")]  # id 2 = the broken file
    assert run["categories"] == [{"id": 5, "name": "disc"}, {"id": 9, "name": "ring"}]
    assert [Path(s["file_name"]).name for s in run["skipped"]] == ["broken.jpg"]
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["one_1.jpg", "one_3.jpg", "three.jpg", "two.png"]

    # The per-image JSON equals the Python API's result for that file.
    record = json.loads((out / "detections" / "two.json").read_text())
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.2, max_detections=50)
    expected = detector(inputs / "folder" / "two.png")
    assert record["image_id"] == 4 and (record["width"], record["height"]) == (200, 300)
    assert len(record["detections"]) == len(expected) > 0
    first = record["detections"][0]
    assert first["class_name"] == expected.class_names[0]
    assert first["category_id"] == {"disc": 5, "ring": 9}[first["class_name"]]
    np.testing.assert_allclose(first["box"], expected.boxes[0].tolist(), atol=0.02)

    # COCO results: xywh in pixels, ids from the label map and images.json.
    results = json.loads((out / "coco_results.json").read_text())
    mine = [r for r in results if r["image_id"] == 4]
    assert len(mine) == len(expected)
    l, t, r, b = first["box"]
    np.testing.assert_allclose(mine[0]["bbox"], [l, t, r - l, b - t], atol=0.02)
    assert {r["category_id"] for r in results} <= {5, 9}
    assert all(len(json.loads((out / "detections" / f"{n}.json").read_text())["detections"]) <= 50
               for n in ("one_1", "one_3", "two", "three"))


def test_strict_makes_a_bad_file_fatal(inputs, checkpoint, capsys):
    rc = main(["detect", "--checkpoint", str(checkpoint), str(inputs / "folder"), "--out", str(inputs / "o"),
               "--device", "cpu", "--strict", "--no-images"])
    assert rc == 2
    assert "broken.jpg" in capsys.readouterr().err
    rc = main(["detect", "--checkpoint", str(checkpoint), str(inputs / "missing.jpg"), str(inputs / "one.jpg"),
               "--out", str(inputs / "o"), "--device", "cpu", "--strict"])
    assert rc == 2 and "missing.jpg: no such file" in capsys.readouterr().err


def test_wrong_checkpoint_and_bad_flags_are_one_line_errors(inputs, checkpoint, capsys):
    from torchvision.models import resnet18

    wrong = inputs / "classifier.pt"
    torch.save(resnet18().state_dict(), wrong)
    rc = main(["detect", "--checkpoint", str(wrong), str(inputs / "one.jpg"), "--out", str(inputs / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "classifier.pt" in err and "not an SSD300" in err and len(err.strip().splitlines()) == 1
    rc = main(["detect", "--checkpoint", str(checkpoint), str(inputs / "one.jpg"), "--out", str(inputs / "o"),
               "--score-threshold", "2"])
    assert rc == 2 and "--score-threshold" in capsys.readouterr().err
    detect = ["detect", "--checkpoint", str(checkpoint), str(inputs / "one.jpg"), "--out", str(inputs / "o")]
    export = ["export", "--checkpoint", str(checkpoint), "--out", str(inputs / "o.pt")]
    for command in (detect, export):  # one validation (PostprocessConfig), naming the flag
        rc = main([*command, "--topk-per-class", "0"])
        err = capsys.readouterr().err
        assert rc == 2 and "--topk-per-class must be an integer >= 1, got 0" in err, err
    rc = main(["detect", "--checkpoint", str(checkpoint), str(inputs / "nothing_here"), "--out", str(inputs / "o")])
    assert rc == 2 and "no images" in capsys.readouterr().err


def test_library_errors_name_fields_and_the_cli_names_flags(inputs, checkpoint, capsys):
    from ssd300.inference import Detector

    # The library speaks Python: the argument's name, never a flag.
    with pytest.raises(UserInputError, match="^batch_size must be >= 1, got 0$"):
        Detector.from_checkpoint(checkpoint, batch_size=0)
    with pytest.raises(UserInputError, match="^backend must be one of torch, onnxruntime, got 'tensorrt'$"):
        Detector.from_checkpoint(checkpoint, backend="tensorrt")
    with pytest.raises(UserInputError, match="^opset 5: supported opsets") as error:
        from ssd300.export import resolve_exporter

        resolve_exporter("auto", 5)
    assert error.value.fields == ("opset",)
    # The CLI writes the same errors with its flags.
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(inputs / "o.onnx"), "--opset", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --opset 5: supported opsets" in err, err
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(inputs / "o.onnx"), "--int8",
               "--calibration", str(inputs), "--calibration-images", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --calibration-images must be >= 1, got 0" in err, err


def test_export_command_writes_a_checked_file(inputs, checkpoint, capsys):
    out = inputs / "ssd_raw.pt"
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--raw"])
    assert rc == 0 and out.is_file()
    assert "labels and counts equal" in capsys.readouterr().out
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(inputs / "ssd.bin")])
    assert rc == 2 and "--format" in capsys.readouterr().err
