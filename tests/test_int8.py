"""INT8 export: parity with fp32 on confident objects (a small trained model, real photographs and
synthetic images), same outputs/metadata as the fp32 file, calibration inputs, the agreement measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ssd300.checkpoint import load_model
from ssd300.cli import main
from ssd300.data import synth
from ssd300.errors import UserInputError
from ssd300.export import export_model
from ssd300.runners import load_exported
from ssd300.inference import Detector
from ssd300.postprocess import Detections
from ssd300.quantize import calibration_files, confident_agreement, export_int8

pytestmark = pytest.mark.slow  # INT8 exports and calibration

onnxruntime = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

# A ResNet-18 SSD300 trained by `ssd300 demo` (3 shape classes, 10 epochs) stored in fp16: see
# tests/data/README.md for how it was made. Confident on the demo's synthetic shapes.
CHECKPOINT = Path(__file__).parent / "data" / "ssd300_r18_synth_fp16.pt"
CONFIDENT = 0.5  # "confident objects": fp32 score >= this
MIN_IOU = 0.9
# The share of them INT8 must reproduce (a broken INT8 path reproduces none). The onnxruntime
# quantiser keeps the heads float: 22 of 24 measured, the goal. NNCF quantises the heads
# too; this small demo model's best scores are only ~0.5-0.65, so its int8 heads move some boxes
# below IoU 0.9 (17 of 24 measured).
REPRODUCED = {"onnxruntime": 0.9, "nncf": 0.7}


def _shapes_on(background: Image.Image, rng: np.random.Generator, count: int) -> Image.Image:
    """Demo-style shapes (classes 0..2, typical colours) drawn on a photograph."""
    image = background.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    shorter = min(image.size)
    for _ in range(count):
        label = int(rng.integers(3))
        name, hue, _ = synth.SHAPES[label]
        size = int(rng.uniform(0.35, 0.6) * shorter)
        left = int(rng.uniform(0, image.width - size))
        top = int(rng.uniform(0, image.height - size))
        synth._draw_shape(draw, name, (left, top, left + size - 1, top + size - 1), synth._color(rng, hue, 0.0), rng)
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real photographs (scikit-image) with and without shapes drawn on them, and synthetic images."""
    folder = tmp_path_factory.mktemp("int8_images")
    rng = np.random.default_rng(7)
    config = synth.SynthConfig(num_classes=3, min_size=0.3, max_size=0.7, max_objects=3, random_color_prob=0.0)
    pictures = [Image.fromarray(p) for p in (skimage_data.astronaut(), skimage_data.coffee(),
                                              skimage_data.chelsea(), skimage_data.rocket())]
    images = [*pictures, *(_shapes_on(p, rng, 2) for p in pictures * 2),
              *(synth.render_image(rng, config)[0] for _ in range(20))]
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:02d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


def _int8_file(photos: list[Path], folder: Path, quantizer: str) -> Path:
    model, label_map, _ = load_model(CHECKPOINT)
    return export_int8(model, label_map, folder / f"ssd.int8.{quantizer}.onnx", photos[0].parent,
                       calibration_images=len(photos), quantizer=quantizer)


@pytest.fixture(scope="module")
def int8_file(photos, tmp_path_factory) -> Path:
    return _int8_file(photos, tmp_path_factory.mktemp("int8"), "onnxruntime")


@pytest.mark.parametrize("quantizer", ["onnxruntime", "nncf"])
def test_int8_detections_agree_with_fp32_on_confident_objects(photos, int8_file, tmp_path, quantizer):
    if quantizer == "nncf":
        pytest.importorskip("nncf")
    path = int8_file if quantizer == "onnxruntime" else _int8_file(photos, tmp_path, quantizer)
    required = REPRODUCED[quantizer]
    fp32 = Detector.from_checkpoint(CHECKPOINT, device="cpu", batch_size=8)(photos)
    int8 = Detector.from_exported(path, batch_size=8)(photos)
    as_detections = [[Detections(r.boxes, r.scores, r.labels) for r in results] for results in (fp32, int8)]
    reproduced, confident = confident_agreement(*as_detections, min_score=CONFIDENT, min_iou=MIN_IOU)
    print(f"INT8 ({quantizer}) reproduces {reproduced} of fp32's {confident} confident detections")
    assert confident >= 20
    assert reproduced >= required * confident, f"INT8 reproduced {reproduced} of {confident} confident detections"
    # The converse: what INT8 is confident about, fp32 has too (a little looser: INT8 scores that
    # cross 0.5 from just below add unstable boxes; measured 26 of 29 for onnxruntime).
    back, confident_int8 = confident_agreement(as_detections[1], as_detections[0], min_score=CONFIDENT,
                                               min_iou=MIN_IOU)
    assert confident_int8 >= 0.6 * confident and back >= (required - 0.1) * confident_int8


def test_int8_file_has_the_fp32_files_outputs_and_metadata(photos, int8_file, tmp_path):
    model, label_map, _ = load_model(CHECKPOINT)
    fp32_file = export_model(model, label_map, tmp_path / "ssd.onnx", "onnx", exporter="legacy")
    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (fp32_file, int8_file)]
    for kind in ("get_inputs", "get_outputs"):
        fp32_io, int8_io = ([(a.name, a.type, len(a.shape)) for a in getattr(s, kind)()] for s in sessions)
        assert fp32_io == int8_io
    fp32_meta, int8_meta = (s.get_modelmeta().custom_metadata_map for s in sessions)
    for key in ("producer", "class_names", "category_ids", "outputs", "settings", "input"):
        assert int8_meta[key] == fp32_meta[key]
    assert int8_meta["precision"] == "int8" and int(int8_meta["calibration_images"]) == len(photos)
    # The network is quantised (int8 weights), the post-processing is not.
    import onnx

    graph = onnx.load(str(int8_file)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") > 20 and "NonMaxSuppression" in ops
    assert json.loads(int8_meta["class_names"])[1:] == ["disc", "rectangle", "triangle"]
    exported = load_exported(int8_file)
    assert exported.precision == "int8" and not exported.raw


def test_calibration_files_from_a_folder_or_a_coco_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (i, i, i)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    picked = calibration_files(folder, 4)
    assert [p.name for p in picked] == ["0.png", "3.png", "6.png", "9.png"]  # spread over the sorted list
    assert len(calibration_files(folder, 50)) == 10
    root = synth.generate_synthetic_dataset(tmp_path / "coco", num_train=5, num_val=3, seed=0, num_classes=2)
    files = calibration_files(root, 100)
    assert len(files) == 5 and all(p.parent.name == "train" for p in files)  # training split, not val
    with pytest.raises(UserInputError, match="^calibration .*missing"):
        calibration_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no image files"):
        calibration_files(tmp_path / "empty")
    with pytest.raises(UserInputError, match="^calibration_images must be >= 1") as error:
        calibration_files(folder, 0)
    from ssd300.commands.options import cli_message

    assert cli_message(error.value).startswith("--calibration-images must be >= 1")


def test_confident_agreement_matches_by_label_and_iou():
    reference = [Detections(torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]]),
                            torch.tensor([0.9, 0.8, 0.3]), torch.tensor([1, 2, 1]))]
    same = [Detections(torch.tensor([[0.5, 0.5, 0.9, 0.91], [0.1, 0.1, 0.5, 0.5]]), torch.tensor([0.7, 0.6]),
                       torch.tensor([2, 1]))]
    assert confident_agreement(reference, same) == (2, 2)  # the 0.3 one is not confident
    wrong_label = [Detections(same[0].boxes, same[0].scores, torch.tensor([1, 2]))]
    assert confident_agreement(reference, wrong_label) == (0, 2)
    shifted = [Detections(same[0].boxes + 0.05, same[0].scores, same[0].labels)]  # IoU ~0.6
    assert confident_agreement(reference, shifted) == (0, 2)
    one_box = [Detections(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0.9]), torch.tensor([1]))]
    twice = [Detections(torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 2), torch.tensor([0.9, 0.8]), torch.tensor([1, 1]))]
    assert confident_agreement(twice, one_box) == (1, 2)  # one candidate matches one reference only


def test_export_command_int8_flags(photos, tmp_path, capsys):
    rc = main(["export", "--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "a.onnx"), "--int8"])
    assert rc == 2 and "--calibration" in capsys.readouterr().err
    rc = main(["export", "--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "a.pt2"), "--int8",
               "--calibration", str(photos[0].parent)])
    assert rc == 2 and "--int8 writes ONNX" in capsys.readouterr().err
    rc = main(["export", "--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "a.onnx"),
               "--calibration", str(photos[0].parent)])
    assert rc == 2 and "only used with --int8" in capsys.readouterr().err
    rc = main(["export", "--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "a.onnx"), "--int8",
               "--calibration", str(tmp_path / "nowhere")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err and not (tmp_path / "a.onnx").exists()


def test_auto_quantizer_is_nncf_when_installed_else_onnxruntime(monkeypatch):
    import ssd300.optional as optional
    from ssd300.quantize import resolve_quantizer

    monkeypatch.setattr(optional, "available", lambda module: True)
    assert resolve_quantizer() == resolve_quantizer("auto") == "nncf"
    monkeypatch.setattr(optional, "available", lambda module: module != "nncf")
    assert resolve_quantizer("auto") == "onnxruntime"
    assert resolve_quantizer("onnxruntime") == "onnxruntime"
    with pytest.raises(UserInputError, match="^quantizer must be one of auto, nncf, onnxruntime"):
        resolve_quantizer("tflite")
