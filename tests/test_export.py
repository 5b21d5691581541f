"""Export: the exportable post-processing against PostProcessor and a plain loop, then ONNX and
TorchScript parity with the PyTorch path on real photographs and synthetic images, batch 1 and 3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from ssd300.box_coder import decode_boxes
from ssd300.data.synth import SynthConfig, render_image
from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.export import ExportableDetector, _dynamo_available, export_model, format_from_suffix
from ssd300.postprocess import flat_detections, pad_per_image
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.postprocess import PostprocessConfig, PostProcessor

from matching import assert_same_detections

onnxruntime = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

NUM_CLASSES = 21
SCORE_THRESHOLD = 0.2  # with the scaled conf head below: 100-200 detections per image, counts vary


def _random_outputs(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(n, 4, 8732, generator=g) * 0.5
    logits = torch.randn(n, num_classes, 8732, generator=g) * 2.0
    return locs, logits


def _loop_oracle(locs, logits, score_threshold, iou_threshold, topk, max_det):
    """Plain per-image, per-class reference: threshold, top-k, torchvision NMS, best max_det."""
    dboxes = default_boxes_300()
    boxes = decode_boxes(locs, dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh)
    probs = logits.softmax(dim=1)
    out = []
    for i in range(logits.shape[0]):
        rows = []
        for c in range(1, logits.shape[1]):
            scores = probs[i, c]
            idx = torch.nonzero(scores > score_threshold).flatten()
            idx = idx[scores[idx].argsort(descending=True)[:topk]]
            kept = idx[nms(boxes[i, idx], scores[idx], iou_threshold)]
            rows += [(float(scores[k]), c, boxes[i, k]) for k in kept.tolist()]
        rows.sort(key=lambda r: -r[0])
        rows = rows[:max_det]
        out.append((torch.stack([r[2] for r in rows]).clamp(0, 1), torch.tensor([r[0] for r in rows]),
                    torch.tensor([r[1] for r in rows])))
    return out


@pytest.mark.parametrize("seed,num_classes,threshold", [(0, 5, 0.05), (1, 21, 0.1), (2, 81, 0.02)])
def test_exportable_postprocessing_matches_loop_oracle_and_postprocessor(seed, num_classes, threshold):
    locs, logits = _random_outputs(3, num_classes, seed)
    dboxes = default_boxes_300()
    config = PostprocessConfig(score_threshold=threshold, iou_threshold=0.45, topk_per_class=50, max_detections=60)
    module = ExportableDetector(torch.nn.Identity(), config=config)
    flat = flat_detections(locs, logits, dboxes.xywh, 0.1, 0.2, config)
    boxes, scores, labels, counts = pad_per_image(*flat, torch.arange(3), 60)
    oracle = _loop_oracle(locs, logits, threshold, 0.45, 50, 60)
    reference = PostProcessor(dboxes, config)(locs, logits)
    assert module.settings()["max_detections"] == 60
    for i in range(3):
        k = int(counts[i])
        exported = (boxes[i, :k], scores[i, :k], labels[i, :k])
        assert_same_detections(exported, oracle[i], cuts=(threshold,), where=f"image {i} vs oracle")
        ours = (reference[i].boxes, reference[i].scores, reference[i].labels)
        assert_same_detections(exported, ours, cuts=(threshold,), where=f"image {i} vs PostProcessor")
        # Padding rows are zero.
        assert not boxes[i, k:].any() and not scores[i, k:].any() and not labels[i, k:].any()


def test_pad_per_image_caps_each_image_and_keeps_score_order():
    # 7 detections over 3 images (image 1 has none), sorted by score, cap 2 per image.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    image_index = torch.tensor([2, 0, 2, 0, 0, 2, 2])
    labels = torch.arange(1, 8)
    boxes = torch.arange(28, dtype=torch.float32).reshape(7, 4)
    out_boxes, out_scores, out_labels, counts = pad_per_image(boxes, scores, labels, image_index, torch.arange(3), 2)
    assert counts.tolist() == [2, 0, 2]
    assert torch.equal(out_scores, torch.tensor([[0.8, 0.6], [0.0, 0.0], [0.9, 0.7]]))
    assert out_labels.tolist() == [[2, 4], [0, 0], [1, 3]]
    assert torch.equal(out_boxes[2], boxes[[0, 2]])


def test_format_from_suffix():
    assert format_from_suffix("a/b.onnx") == "onnx"
    assert format_from_suffix("m.pt") == format_from_suffix("m.ts") == "torchscript"
    assert format_from_suffix("m.bin") is None


# ----------------------------------------------------------------------------- file parity


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    # conf_scale spreads scores (no saturated ties) while keeping many detections
    return make_tiny_model(NUM_CLASSES, conf_scale=0.3).eval()


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    transform = EvalTransform()
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    rng = np.random.default_rng(0)
    synthetic = [render_image(rng, SynthConfig(num_classes=5))[0] for _ in range(3)]
    return {"photos": transform.batch(photos), "synthetic": transform.batch(synthetic)}


@pytest.fixture(scope="module")
def network_outputs(model, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return {name: model(images) for name, images in batches.items()}


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("export")
    label_map = LabelMap.generic(NUM_CLASSES)
    onnx_path = export_model(model, label_map, folder / "ssd.onnx", "onnx", score_threshold=SCORE_THRESHOLD)
    legacy_path = export_model(model, label_map, folder / "legacy.onnx", "onnx", exporter="legacy",
                               score_threshold=SCORE_THRESHOLD)
    ts_path = export_model(model, label_map, folder / "ssd.pt", "torchscript", score_threshold=SCORE_THRESHOLD)
    sessions = {name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in (("onnx", onnx_path), ("legacy", legacy_path))}
    scripted = torch.jit.load(str(ts_path))

    def onnx_runner(name: str):
        def run(x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(a) for a in sessions[name].run(None, {"images": x.numpy()})]
        return run

    def run_ts(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(scripted(x))

    return {"onnx": onnx_runner("onnx"), "onnx-legacy": onnx_runner("legacy"), "torchscript": run_ts,
            "onnx_path": onnx_path, "legacy_path": legacy_path}


def _assert_parity(outputs: list[torch.Tensor], reference) -> None:
    boxes, scores, labels, counts = outputs
    assert boxes.shape == (len(reference), 200, 4) and labels.dtype == torch.int64
    for i, det in enumerate(reference):
        k = int(counts[i])
        # The network ran in another runtime: scores agree to ~1e-5, boxes to ~1e-4.
        assert_same_detections((boxes[i, :k], scores[i, :k], labels[i, :k]), (det.boxes, det.scores, det.labels),
                               cuts=(SCORE_THRESHOLD,), score_atol=1e-4, box_atol=1e-3, where=f"image {i}")
        assert ((boxes[i, :k] >= 0) & (boxes[i, :k] <= 1)).all()
        assert not scores[i, k:].any()


@pytest.mark.slow  # exports to every format
@pytest.mark.parametrize("fmt", ["onnx", "onnx-legacy", "torchscript"])
@pytest.mark.parametrize("source", ["photos", "synthetic"])
def test_exported_detector_matches_pytorch_at_batch_1_and_3(network_outputs, batches, exported, fmt, source):
    images = batches[source]
    locs, logits = network_outputs[source]
    reference = PostProcessor(default_boxes_300(), score_threshold=SCORE_THRESHOLD)(locs, logits)
    counts = [len(d) for d in reference]
    assert min(counts) >= 20  # a non-trivial comparison
    _assert_parity(exported[fmt](images), reference)
    _assert_parity(exported[fmt](images[:1]), reference[:1])


@pytest.mark.slow  # exports to every format
@pytest.mark.parametrize("which", ["onnx_path", "legacy_path"])
def test_onnx_file_carries_label_map_and_settings(exported, which):
    import onnx

    proto = onnx.load(str(exported[which]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"])[1] == "class_1"
    assert json.loads(meta["settings"])["score_threshold"] == SCORE_THRESHOLD
    assert meta["exporter"] == ("legacy" if which == "legacy_path" else ("dynamo" if _dynamo_available() else "legacy"))
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_raw_export_returns_the_network_outputs(model, batches, network_outputs, tmp_path, fmt, suffix):
    path = export_model(model, LabelMap.generic(NUM_CLASSES), tmp_path / f"raw.{suffix}", fmt, raw=True,
                        exporter="legacy")
    images = batches["photos"]
    locs, logits = network_outputs["photos"]
    with torch.no_grad():
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]
        else:
            got = list(torch.jit.load(str(path))(images))
    assert got[0].shape == (3, 4, 8732) and got[1].shape == (3, NUM_CLASSES, 8732)
    torch.testing.assert_close(got[0], locs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], logits, atol=1e-4, rtol=1e-4)
