"""Running exported files: pt2 parity, Detector.from_exported for every format against the checkpoint's
Detector, metadata (classes, baked-in thresholds), the onnxruntime backend's cache, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd300.cli import main
from ssd300.data.synth import SynthConfig, render_image
from ssd300.data.transforms import EvalTransform
from ssd300.errors import UserInputError
from ssd300.export import build_export_module, export_model
from ssd300.exported import format_of, is_exported_file
from ssd300.inference import Detector
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.runners import cached_network_onnx, load_exported

pytestmark = pytest.mark.slow  # exports to every format

onnxruntime = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

LABEL_MAP = LabelMap.from_categories([(3, "disc"), (7, "rectangle"), (11, "triangle")])
SCORE = 0.2


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    # conf_scale tames the untrained conf heads: ~50-150 detections per image above SCORE
    return make_tiny_model(4, conf_scale=0.3).eval()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    synthetic = [np.asarray(render_image(rng, SynthConfig(num_classes=3))[0]) for _ in range(2)]
    return [skimage_data.astronaut(), skimage_data.coffee(), *synthetic]


@pytest.fixture(scope="module")
def files(model, tmp_path_factory, make_tiny_checkpoint) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    written = {
        "onnx": export_model(model, LABEL_MAP, folder / "ssd.onnx", "onnx", exporter="legacy",
                             score_threshold=SCORE, max_detections=100),
        "onnx_raw": export_model(model, LABEL_MAP, folder / "ssd_raw.onnx", "onnx", raw=True, exporter="legacy"),
        "pt2": export_model(model, LABEL_MAP, folder / "ssd.pt2", "pt2", score_threshold=SCORE, max_detections=100),
        "torchscript": export_model(model, LABEL_MAP, folder / "ssd.ts", "torchscript", score_threshold=SCORE,
                                    max_detections=100),
    }
    written["checkpoint"] = make_tiny_checkpoint(folder / "ssd.pt", LABEL_MAP, model=model)
    return written


def _sorted_rows(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = torch.cat((scores[:, None], labels[:, None].float(), boxes), dim=1)
    order = np.lexsort(rows.numpy().T[::-1])
    return rows[torch.from_numpy(order)]


@pytest.mark.parametrize("batch", [1, 3])
def test_pt2_export_matches_pytorch(model, files, photos, batch):
    module = build_export_module(model, score_threshold=SCORE, max_detections=100)
    images = EvalTransform().batch(photos[:batch] if batch <= len(photos) else photos)
    with torch.no_grad():
        want = module(images)
    program = torch.export.load(str(files["pt2"])).module()
    with torch.no_grad():
        got = program(images)
    assert [t.shape for t in got] == [t.shape for t in want] and got[0].shape[0] == batch
    assert torch.equal(got[3], want[3]) and int(want[3].sum()) > 0
    for i in range(batch):
        n = int(want[3][i])
        torch.testing.assert_close(_sorted_rows(got[0][i, :n], got[1][i, :n], got[2][i, :n]),
                                   _sorted_rows(want[0][i, :n], want[1][i, :n], want[2][i, :n]),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["onnx", "onnx_raw", "pt2", "torchscript"])
def test_from_exported_matches_the_checkpoint_detector(files, photos, kind):
    reference = Detector.from_checkpoint(files["checkpoint"], device="cpu", score_threshold=SCORE,
                                         max_detections=100, batch_size=2)(photos)
    options = {"score_threshold": SCORE, "max_detections": 100} if kind == "onnx_raw" else {}
    detector = Detector.from_exported(files[kind], batch_size=2, **options)
    results = detector(photos)
    assert detector.label_map == LABEL_MAP
    assert sum(len(r) for r in reference) > 20
    for want, got in zip(reference, results):
        assert len(got) == len(want) and got.image_size == want.image_size
        assert got.class_names == want.class_names
        torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.boxes, want.boxes, atol=0.05, rtol=1e-4)  # pixels
        assert got.category_ids.tolist() == [LABEL_MAP.category_ids[i] for i in got.labels.tolist()]


def test_exported_metadata_and_baked_in_thresholds(files, photos):
    network = load_exported(files["onnx"])
    assert (network.format, network.runtime, network.raw, network.precision) == ("onnx", "onnxruntime", False, "fp32")
    assert network.settings["score_threshold"] == pytest.approx(SCORE) and network.settings["max_detections"] == 100
    assert load_exported(files["onnx_raw"]).raw and load_exported(files["pt2"]).format == "pt2"
    # The file's threshold is the default; a stricter one and a smaller cap filter further.
    loose = Detector.from_exported(files["onnx"])(photos[0])
    strict = Detector.from_exported(files["onnx"], score_threshold=0.3, max_detections=5)(photos[0])
    assert len(loose) > 5 and float(loose.scores.min()) > SCORE
    expected = loose.scores[loose.scores > 0.3][:5]
    torch.testing.assert_close(strict.scores, expected)
    with pytest.raises(UserInputError, match="baked in.*score threshold"):
        Detector.from_exported(files["onnx"], score_threshold=0.05)
    with pytest.raises(UserInputError, match="IoU threshold"):
        Detector.from_exported(files["pt2"], iou_threshold=0.6)
    with pytest.raises(ValueError, match="whole detector"):
        Detector.from_exported(files["onnx"]).predict_tensor(torch.zeros(1, 3, 300, 300))


def test_openvino_runtime_runs_onnx_files(files, photos):
    pytest.importorskip("openvino")
    want = Detector.from_exported(files["onnx"])(photos)
    got = Detector.from_exported(files["onnx"], runtime="openvino")(photos)
    assert sum(len(w) for w in want) > 20
    for w, g in zip(want, got):
        # Near-equal scores may swap places between kernels: compare the sorted rows.
        assert len(g) == len(w)
        torch.testing.assert_close(_sorted_rows(g.boxes_normalized, g.scores, g.labels),
                                   _sorted_rows(w.boxes_normalized, w.scores, w.labels), atol=1e-3, rtol=1e-3)


def test_file_kinds_and_bad_files(files, tmp_path):
    assert is_exported_file(files["onnx"]) and is_exported_file(files["pt2"]) and is_exported_file(files["torchscript"])
    assert not is_exported_file(files["checkpoint"])  # a torch.save zip, not TorchScript
    assert format_of(files["torchscript"]) == "torchscript" and format_of(files["pt2"]) == "pt2"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="junk.onnx"):
        load_exported(junk)
    with pytest.raises(UserInputError, match="no such"):
        load_exported(tmp_path / "missing.pt2")
    with pytest.raises(UserInputError, match="runtime"):
        load_exported(files["pt2"], runtime="openvino")
    # An ONNX file without our metadata: refused with a hint, not mis-read.
    import onnx

    proto = onnx.load(str(files["onnx_raw"]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(UserInputError, match="no ssd300 export metadata"):
        load_exported(foreign)


def test_onnxruntime_backend_exports_once_per_weights(model, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SSD300_CACHE_DIR", str(tmp_path / "cache"))
    first = Detector(model, LABEL_MAP, device="cpu", backend="onnxruntime", score_threshold=SCORE)
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # files.cache_dir("onnx")
    assert len(cached) == 1

    import ssd300.export

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported although the network is cached")

    monkeypatch.setattr(ssd300.export, "export_onnx", no_export)
    second = Detector(model, LABEL_MAP, device="cpu", backend="onnxruntime", score_threshold=SCORE)
    torch.testing.assert_close(second(photos[0]).scores, first(photos[0]).scores)
    # Other weights -> another file (the cache never serves a stale network).
    other = SSD300("resnet18", num_classes=4).eval()
    with pytest.raises(AssertionError, match="re-exported"):
        cached_network_onnx(other)


def test_detect_command_runs_an_exported_file(files, tmp_path):
    from PIL import Image

    image = tmp_path / "images" / "astronaut.jpg"
    image.parent.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(image)
    out = tmp_path / "out"
    rc = main(["detect", str(image), "--model", str(files["pt2"]), "--out", str(out), "--no-images",
               "--score-threshold", "0.25"])
    assert rc == 0
    record = json.loads((out / "detections" / "astronaut.json").read_text())
    want = Detector.from_checkpoint(files["checkpoint"], device="cpu", score_threshold=0.25, max_detections=100)(image)
    assert [d["class_name"] for d in record["detections"]] == want.class_names and len(want) > 0
    assert {d["category_id"] for d in record["detections"]} <= {3, 7, 11}
    rc = main(["detect", str(image), "--model", str(files["onnx"]), "--out", str(out), "--amp"])
    assert rc == 2


def test_an_onnx_file_with_another_suffix_is_recognised_by_content(files, photos, tmp_path, capsys):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(files["onnx"].read_bytes())
    assert is_exported_file(renamed) and format_of(renamed) == "onnx"
    want = Detector.from_exported(files["onnx"])(photos[0])
    got = Detector.from_exported(renamed)(photos[0])
    torch.testing.assert_close(got.scores, want.scores)
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(files["checkpoint"].read_bytes())
    assert not is_exported_file(checkpoint)  # a checkpoint stays a checkpoint, whatever its name
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(photos[0]).save(image)
    assert main(["detect", str(image), "--model", str(renamed), "--out", str(tmp_path / "out"), "--no-images"]) == 0
    # ONNX, but not ours: said what it is (not "not a PyTorch file")
    import onnx

    proto = onnx.load(str(files["onnx_raw"]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.bin"
    onnx.save(proto, str(foreign))
    capsys.readouterr()
    assert main(["detect", str(image), "--model", str(foreign), "--out", str(tmp_path / "out2")]) == 2
    assert f"{foreign}: has no ssd300 export metadata" in capsys.readouterr().err


def test_an_exported_file_given_as_a_training_checkpoint_says_what_it_is(files, tmp_path):
    from ssd300.checkpoint import load_checkpoint

    renamed = tmp_path / "model.bin"
    renamed.write_bytes(files["onnx"].read_bytes())
    for path, fmt in ((renamed, "onnx"), (files["pt2"], "pt2"), (files["torchscript"], "torchscript")):
        with pytest.raises(UserInputError, match=rf"^checkpoint {path}: is a file written by ssd300 export "
                                                 rf"\({fmt}\), not a training checkpoint; detect runs it"):
            load_checkpoint(path)
    load_checkpoint(files["checkpoint"])  # ours still loads
