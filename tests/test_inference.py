"""Detector: every input kind gives the same detections, boxes are the post-processor's scaled to
pixels, batching changes nothing, reference checkpoints load, bad files and checkpoints fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.errors import UserInputError
from ssd300.inference import Detector, ImageDetections
from ssd300.runtime import Runtime, resolve_device
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.postprocess import PostProcessor

LABEL_MAP = LabelMap.from_categories([(3, "cat"), (8, "dog"), (11, "bird")])


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    return make_tiny_model(4, conf_scale=0.3).eval()  # spread scores, no saturated ties


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory, make_tiny_checkpoint):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ssd.pt", LABEL_MAP, model=model, epoch=1)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # Smooth random images of different sizes (noise alone would be resized into mush).
    out = []
    for width, height in ((320, 240), (200, 310), (450, 300)):
        small = rng.integers(0, 256, size=(height // 20, width // 20, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def detector(checkpoint) -> Detector:
    return Detector.from_checkpoint(checkpoint, device="cpu", score_threshold=0.1, batch_size=2)


def _same(a: ImageDetections, b: ImageDetections, atol: float = 1e-3) -> None:
    assert a.labels.tolist() == b.labels.tolist()
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_boxes_are_postprocessor_output_scaled_to_pixels(detector, model, images):
    image = images[0]
    x = EvalTransform().batch([image])
    with torch.no_grad():
        locs, logits = model(x)  # plain model: no BN folding, no channels-last
    expected = PostProcessor(default_boxes_300(), score_threshold=0.1)(locs, logits)[0]
    result = detector(image)
    height, width = image.shape[:2]
    assert result.image_size == (width, height) and len(result) == len(expected) > 10
    assert result.labels.tolist() == expected.labels.tolist()
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    pixels = expected.boxes * scale
    pixels[:, 0::2] = pixels[:, 0::2].clamp(0, width)
    pixels[:, 1::2] = pixels[:, 1::2].clamp(0, height)
    torch.testing.assert_close(result.boxes, pixels, atol=1e-2, rtol=0)
    torch.testing.assert_close(result.scores, expected.scores, atol=1e-5, rtol=0)
    assert (result.scores > 0.1).all() and (result.scores[:-1] >= result.scores[1:]).all()
    # Names and dataset ids follow the label map.
    assert result.class_names == [LABEL_MAP.names[i] for i in result.labels.tolist()]
    assert result.category_ids.tolist() == [LABEL_MAP.category_ids[i] for i in result.labels.tolist()]


def test_every_input_kind_gives_the_same_detections(detector, images, tmp_path):
    array = images[1]
    path = tmp_path / "img.png"  # lossless, so the file decodes to the same pixels
    Image.fromarray(array).save(path)
    reference = detector(array)
    chw = torch.from_numpy(array).permute(2, 0, 1)
    for other in (Image.fromarray(array), chw, chw.float() / 255, array.astype(np.float32) / 255, path, str(path)):
        result = detector(other)
        _same(result, reference)
        assert result.image_size == reference.image_size
    assert detector(path).source == str(path) and reference.source is None


def test_batched_call_equals_one_by_one(detector, images):
    together = detector(images)  # batch_size 2: batches of 2 and 1
    assert isinstance(together, list) and len(together) == 3
    for image, result in zip(images, together):
        _same(result, detector(image))
    stacked = np.stack([images[0], images[0]])
    assert len(detector(stacked)) == 2  # a 4-D array is a batch


def test_reference_checkpoint_with_module_prefix_loads(model, tmp_path, images):
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "reference.pt"
    torch.save({"model": state, "epoch": 64, "iteration": 100,
                "label_map": {0: "background", 1: "cat", 2: "dog", 3: "bird"}}, path)
    reference = Detector.from_checkpoint(path, device="cpu", score_threshold=0.1)
    assert reference.label_map.names == LABEL_MAP.names
    # Without category_ids, COCO class names map to their COCO category ids.
    assert reference.label_map.category_ids == (0, 17, 18, 16)
    ours = Detector(model, LABEL_MAP, device="cpu", score_threshold=0.1)
    _same(reference(images[2]), ours(images[2]))


def test_not_an_ssd300_checkpoint_is_a_clear_error(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "classifier.pt"
    torch.save({"model": resnet18().state_dict()}, path)
    with pytest.raises(UserInputError, match="classifier.pt"):
        Detector.from_checkpoint(path)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserInputError, match="notes.pt"):
        Detector.from_checkpoint(text)


def test_unreadable_file_raises_or_is_skipped(detector, images, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(images[0]).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    with pytest.raises(UserInputError, match="broken.jpg"):
        detector([good, bad])
    results = list(detector.detect_files([bad, good, bad]))
    assert [p for p, _ in results] == [str(bad), str(good), str(bad)]
    assert isinstance(results[0][1], UserInputError) and isinstance(results[2][1], UserInputError)
    _same(results[1][1], detector(images[0]))


def test_draft_decoding_reports_the_original_pixel_grid(detector, tmp_path):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(small).resize((1600, 1200), Image.BILINEAR).save(path, quality=95)
    fast = detector(path)
    # Oracle: decode at the reduced JPEG scale by hand (1/4: 400x300, still >= 300 px).
    with Image.open(path) as image:
        image.draft("RGB", (400, 300))
        reduced = np.asarray(image.convert("RGB"))
    assert reduced.shape[:2] == (300, 400)
    on_reduced = detector(reduced)
    assert fast.image_size == (1600, 1200)
    assert fast.labels.tolist() == on_reduced.labels.tolist()
    torch.testing.assert_close(fast.boxes_normalized, on_reduced.boxes_normalized)
    scale = torch.tensor([1600.0, 1200.0, 1600.0, 1200.0])
    torch.testing.assert_close(fast.boxes, (fast.boxes_normalized * scale).clamp(min=0).minimum(scale))


def test_thresholds_and_max_detections(checkpoint, images):
    capped = Detector.from_checkpoint(checkpoint, score_threshold=0.3, max_detections=7)(images[0])
    assert len(capped) <= 7 and (capped.scores > 0.3).all()
    loose = Detector.from_checkpoint(checkpoint, score_threshold=0.05, iou_threshold=0.3)(images[0])
    assert len(loose) >= len(capped)
    with pytest.raises(UserInputError, match="score_threshold"):
        Detector.from_checkpoint(checkpoint, score_threshold=1.5)


def test_to_dict_and_to_coco():
    det = ImageDetections(boxes=torch.tensor([[10.0, 20.0, 50.0, 80.0]]), scores=torch.tensor([0.75]),
                          labels=torch.tensor([2]), class_names=["dog"], category_ids=torch.tensor([8]),
                          image_size=(100, 90), source="a.jpg")
    assert det.to_coco(7) == [{"image_id": 7, "category_id": 8, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75}]
    record = det.to_dict()
    assert record["width"] == 100 and record["detections"][0]["class_name"] == "dog"
    assert record["detections"][0]["box"] == [10.0, 20.0, 50.0, 80.0]
    assert len(det.filter(0.8)) == 0 and len(det.filter(0.5)) == 1


def test_bf16_channels_last_path_agrees(checkpoint, images):
    fp32 = Detector.from_checkpoint(checkpoint, score_threshold=0.1)(images[0])
    # The bf16 path forced on (emulated, slower, on CPUs without native bf16), so it is checked on every CPU.
    forced = Runtime.resolve("cpu", amp=True, bf16_available=True)
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.1, runtime=forced)
    assert detector.runner.bf16 and detector.runner.channels_last
    bf16 = detector(images[0])
    # bfloat16 has 8 bits of mantissa: the top detections agree, to a pixel or so.
    assert bf16.labels[:3].tolist() == fp32.labels[:3].tolist()
    torch.testing.assert_close(bf16.boxes[:3], fp32.boxes[:3], atol=3.0, rtol=0)
    torch.testing.assert_close(bf16.scores[:3], fp32.scores[:3], atol=0.03, rtol=0)


def test_amp_without_native_bf16_runs_fp32_with_a_warning(checkpoint, images, monkeypatch, caplog):
    monkeypatch.setattr("ssd300.runtime.native_bf16", lambda: False)
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.1, amp=True)
    assert not detector.runner.bf16 and detector.runtime.dtype is None
    assert "no native bf16" in caplog.text and "fp32" in caplog.text
    fp32 = Detector.from_checkpoint(checkpoint, score_threshold=0.1)(images[0])
    result = detector(images[0])
    torch.testing.assert_close(result.scores, fp32.scores)


def test_bad_device_is_a_user_error():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserInputError, match="^device"):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="CUDA"):
            resolve_device("cuda")


def test_onnxruntime_backend_agrees_with_torch(checkpoint, images):
    pytest.importorskip("onnxruntime")
    torch_result = Detector.from_checkpoint(checkpoint, score_threshold=0.1)(images[2])
    ort = Detector.from_checkpoint(checkpoint, score_threshold=0.1, backend="onnxruntime")
    _same(ort(images[2]), torch_result, atol=1e-2)
    with pytest.raises(UserInputError, match="^backend must be one of torch, onnxruntime"):
        Detector.from_checkpoint(checkpoint, backend="tensorrt")
