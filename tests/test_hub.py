"""torch.hub entry points from this checkout with local checkpoints and the cached published one (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.errors import UserInputError
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.postprocess import PostProcessor

REPO = str(Path(__file__).resolve().parents[1])


def _hub(entry: str, **kwargs):
    return torch.hub.load(REPO, entry, source="local", trust_repo=True, **kwargs)


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    return make_tiny_model(81).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory, make_tiny_checkpoint) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hub") / "ssd.pt", LabelMap.coco2017(), model=model)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).resize((360, 300)).save(path)
    return path


def test_entry_points_are_defined():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for entry in ("nvidia_ssd", "nvidia_ssd_processing_utils", "ssd300", "detector"):
        assert callable(getattr(hubconf, entry))
    assert "torch" in hubconf.dependencies


def test_nvidia_ssd_loads_the_local_checkpoint(model, checkpoint):
    loaded = _hub("nvidia_ssd", checkpoint=str(checkpoint))
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert _hub("nvidia_ssd", checkpoint=str(checkpoint), model_math="fp16").conf[0].weight.dtype == torch.float16
    assert _hub("ssd300", checkpoint=str(checkpoint)).num_classes == 81


def test_pretrained_loads_nvidias_published_checkpoint_from_the_cache_or_says_where_to_put_it(
        checkpoint, model, tmp_path, monkeypatch):
    import socket

    from ssd300 import weights

    monkeypatch.setenv("SSD300_CACHE_DIR", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed: offline
    url = f"http://127.0.0.1:{port}/nvidia_ssdpyt_amp_200703.pt"
    monkeypatch.setattr(weights, "NVIDIA_SSD300_COCO_URL", url)
    cached = tmp_path / "cache" / "weights" / "nvidia_ssdpyt_amp_200703.pt"
    with pytest.raises(UserInputError) as err:
        _hub("nvidia_ssd")  # pretrained=True, as the reference
    assert str(err.value).startswith(f"could not download {url}") and f"in {cached.parent}" in str(err.value)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(checkpoint.read_bytes())  # what the download leaves in the cache
    loaded = _hub("nvidia_ssd", device="cpu")
    assert torch.equal(loaded.conf[0].weight, model.conf[0].weight)
    assert _hub("detector", device="cpu").label_map.num_classes == 81
    fresh = _hub("ssd300", pretrained=False, backbone="resnet18", num_classes=5)
    assert fresh.num_classes == 5 and fresh.backbone_name == "resnet18"


def test_processing_utils_follow_the_reference_workflow(model, checkpoint, photo):
    utils = _hub("nvidia_ssd_processing_utils")
    prepared = utils.prepare_input(str(photo))
    assert prepared.shape == (300, 300, 3) and prepared.dtype == np.float32
    expected_input = EvalTransform()(Image.open(photo).convert("RGB"))
    np.testing.assert_allclose(prepared, expected_input.permute(1, 2, 0).numpy(), atol=1e-6)
    batch = utils.prepare_tensor([prepared, prepared]).cpu()
    assert batch.shape == (2, 3, 300, 300)
    with torch.no_grad():
        outputs = model(batch)
    results = utils.decode_results(outputs)  # criteria 0.5, max_output 20, as the reference
    expected = PostProcessor(default_boxes_300(), iou_threshold=0.5, max_detections=20)(*outputs)
    assert len(results) == 2
    boxes, classes, confidences = results[0]
    assert boxes.shape == (len(expected[0]), 4) and len(expected[0]) <= 20
    np.testing.assert_allclose(confidences, expected[0].scores.numpy())
    np.testing.assert_array_equal(classes, expected[0].labels.numpy())
    threshold = float(np.median(confidences))
    best = utils.pick_best(results[0], threshold)
    assert (best[2] > threshold).all() and len(best[0]) == int((confidences > threshold).sum())
    names = utils.get_coco_object_dictionary()
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"


def test_detector_entry_point(checkpoint, photo):
    detector = _hub("detector", checkpoint=str(checkpoint), device="cpu", score_threshold=0.02)
    result = detector(str(photo))
    assert result.image_size == (360, 300)
    assert set(result.class_names) <= set(LabelMap.coco2017().names[1:])


def test_processing_utils_name_a_custom_checkpoints_classes(tmp_path, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path / "custom.pt", LabelMap.from_categories([(4, "cat"), (9, "dog")]))
    utils = _hub("nvidia_ssd_processing_utils", checkpoint=str(path), device="cpu")
    assert utils.get_coco_object_dictionary() == ["cat", "dog"]
    model = _hub("nvidia_ssd", checkpoint=str(path), device="cpu")
    plain = _hub("nvidia_ssd_processing_utils", device="cpu")
    assert plain.get_coco_object_dictionary(model) == ["cat", "dog"]          # the model's names
    assert len(plain.get_coco_object_dictionary()) == 80                       # no checkpoint: COCO's


def test_model_and_prepared_tensors_share_one_device(checkpoint, photo, monkeypatch):
    # Both follow one rule (CUDA when available, else the CPU) and one explicit choice: asked for
    # the CPU, the batch stays there even where CUDA "is available" (the old prepare_tensor moved it).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _hub("nvidia_ssd", checkpoint=str(checkpoint), device="cpu")
    utils = _hub("nvidia_ssd_processing_utils", device="cpu")
    batch = utils.prepare_tensor([utils.prepare_input(str(photo))])
    assert batch.device == next(model.parameters()).device == torch.device("cpu")
    with torch.no_grad():
        locs, _ = model(batch)
    assert locs.shape == (1, 4, 8732)
    monkeypatch.undo()
    default_model = _hub("nvidia_ssd", checkpoint=str(checkpoint))
    default_utils = _hub("nvidia_ssd_processing_utils")
    assert next(default_model.parameters()).device.type == default_utils.device.type
