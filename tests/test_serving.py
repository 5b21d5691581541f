"""ssd300.serving, the engine-neutral part of ``ssd300 serve``: upload checks (type, size, header,
pixels), decoding as ``detect`` decodes files, and per-upload answers from one batch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MakeTinyCheckpoint, MakeTinyModel
from ssd300.inference import Detector
from ssd300.serving import (
    DetectionService,
    RequestError,
    ServeConfig,
    ServeLimits,
    check_body_size,
    check_content_type,
    claim_worker_cores,
    check_image_header,
    decode_upload,
    result_from_json,
    result_to_json,
)


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def service(make_tiny_checkpoint: MakeTinyCheckpoint, make_tiny_model: MakeTinyModel,
            tmp_path_factory: pytest.TempPathFactory) -> DetectionService:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("serving") / "ssd.pt",
                                model=make_tiny_model(3, conf_scale=0.3))
    return DetectionService.from_config(ServeConfig(model=str(path), max_batch_size=4))


def test_content_type_accepts_images_and_octet_stream_only() -> None:
    limits = ServeLimits()
    for ok in ("image/jpeg", "image/png; charset=binary", "application/octet-stream", "", None):
        check_content_type(ok, limits)
    for bad in ("text/plain", "application/json", "image/svg+xml"):
        with pytest.raises(RequestError) as caught:
            check_content_type(bad, limits)
        assert caught.value.status == 415 and bad.split(";")[0] in str(caught.value)


def test_body_size_empty_and_over_limit() -> None:
    limits = ServeLimits(max_body_bytes=1000)
    check_body_size(1000, limits)
    with pytest.raises(RequestError) as empty:
        check_body_size(0, limits)
    assert empty.value.status == 400 and "empty" in str(empty.value)
    with pytest.raises(RequestError) as big:
        check_body_size(1001, limits)
    assert big.value.status == 413 and "1001 bytes" in str(big.value)


def test_header_check_refuses_non_images_other_formats_and_too_many_pixels() -> None:
    limits = ServeLimits(max_pixels=1_000_000)
    assert check_image_header(encoded(photo(1000, 1000)), limits) == ("PNG", 1000, 1000)
    with pytest.raises(RequestError) as text:
        check_image_header(b"this is not an image", limits)
    assert text.value.status == 400 and "not an image file" in str(text.value)
    assert "BytesIO" not in str(text.value)  # the in-memory file is not named
    with pytest.raises(RequestError) as pixels:
        check_image_header(encoded(Image.new("1", (1001, 1000))), limits)
    assert pixels.value.status == 413 and "1001x1000" in str(pixels.value)
    with pytest.raises(RequestError) as fmt:
        check_image_header(encoded(photo(64, 64), "PNG"), ServeLimits(formats=("JPEG",)))
    assert fmt.value.status == 400 and "PNG" in str(fmt.value)


def test_hundred_megapixel_image_refused_from_its_header() -> None:
    body = encoded(Image.new("1", (10_000, 10_000)))  # 100 megapixels in a few kB
    with pytest.raises(RequestError) as caught:
        check_image_header(body, ServeLimits())
    assert caught.value.status == 413 and "100.0 megapixels" in str(caught.value)


def test_truncated_image_fails_at_decoding() -> None:
    body = encoded(photo(), "JPEG", quality=90)
    check_image_header(body[: len(body) // 2], ServeLimits())  # the header alone looks fine
    with pytest.raises(RequestError) as caught:
        decode_upload(body[: len(body) // 2], ServeLimits())
    assert caught.value.status == 400 and "truncated" in str(caught.value)


def test_decode_upload_equals_detect_decoding_of_the_file(tmp_path: Path) -> None:
    from ssd300.inference import load_rgb

    body = encoded(photo(1600, 1200), "JPEG", quality=90)  # big enough for the reduced-scale decode
    (tmp_path / "a.jpg").write_bytes(body)
    from_file = load_rgb(tmp_path / "a.jpg", draft=True)
    upload = decode_upload(body, ServeLimits(), draft=True)
    assert upload.size == from_file.size and upload.size[0] < 1600  # decoded at a reduced scale
    assert upload.info["original_size"] == (1600, 1200)
    assert np.array_equal(np.asarray(upload), np.asarray(from_file))


def test_service_answers_each_upload_and_bad_ones_alone(service: DetectionService) -> None:
    good = [encoded(photo(seed=1)), encoded(photo(320, 240, seed=2), "JPEG")]
    answers = service.detect([good[0], b"junk", good[1]], names=["a.png", "junk.bin", None])
    assert isinstance(answers[1], RequestError) and answers[1].status == 400
    direct = service.detector([decode_upload(body, ServeLimits()) for body in good])
    for answer, expected, name in zip([answers[0], answers[2]], direct, ["a.png", None]):
        assert isinstance(answer, dict)
        assert answer["image"] == name and (answer["width"], answer["height"]) == expected.image_size
        assert len(answer["detections"]) == len(expected) > 0
        boxes = np.array([d["box"] for d in answer["detections"]])
        assert np.allclose(boxes, expected.boxes.numpy(), atol=0.02)
        assert [d["class_name"] for d in answer["detections"]] == expected.class_names


def test_result_json_round_trip() -> None:
    record = {"image": None, "width": 3, "height": 2, "detections": []}
    assert result_from_json(result_to_json(record)) == record
    error = result_from_json(result_to_json(RequestError(413, "too big")))
    assert isinstance(error, RequestError) and (error.status, str(error)) == (413, "too big")
    assert "\n" not in result_to_json(RequestError(400, "x")) and json.loads(result_to_json(record)) == record


def test_service_detector_is_the_one_detect_builds(service: DetectionService) -> None:
    assert isinstance(service.detector, Detector)
    assert service.detector.batch_size == 4 and service.detector.draft
    assert service.class_names == ["disc", "rectangle"]


def test_serve_command_refuses_bad_flags_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     make_tiny_checkpoint: MakeTinyCheckpoint) -> None:
    from ssd300.cli import main

    checkpoint = make_tiny_checkpoint(tmp_path / "ssd.pt")
    cases = [
        (["serve"], "no model"),
        (["serve", "--checkpoint", str(checkpoint), "--workers", "0"], "--workers must be >= 1"),
        (["serve", "--checkpoint", str(checkpoint), "--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["serve", "--checkpoint", str(tmp_path / "missing.pt")], "no such file"),
        (["serve", "--checkpoint", str(tmp_path)], "is a folder"),
        (["serve", "--checkpoint", str(checkpoint), "--runtime", "openvino"], "--runtime applies to exported files"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ssd300 serve: error:") and words in lines[0], (argv, lines)


def test_each_worker_claims_its_own_cores_in_turn(tmp_path, monkeypatch):
    """Slots are taken in order from the shared file; a restarted worker wraps round; a CPU set too
    small to split leaves the affinity alone."""
    os = pytest.importorskip("os")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    given: list[list[int]] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 6, 7})
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: given.append(sorted(cores)))
    slots = str(tmp_path / "slots")
    assert claim_worker_cores(slots, workers=2, threads=2) == [3, 5]
    assert claim_worker_cores(slots, workers=2, threads=2) == [6, 7]
    assert claim_worker_cores(slots, workers=2, threads=2) == [3, 5]  # a third start: slot 0 again
    assert given == [[3, 5], [6, 7], [3, 5]]
    assert claim_worker_cores(str(tmp_path / "other"), workers=3, threads=2) is None  # 6 cores wanted, 4 there
    assert len(given) == 3
