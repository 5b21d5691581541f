"""Metrics that are right for every valid annotation file (issue 18 items 1-2): annotation ids from
0, repeated, sparse or missing; a UTF-8 BOM; results files in the COCO results format; the typed
(msgspec) parse of the dataset index equal to the standard one."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ssd300.cli import main
from ssd300.coco_eval import RESULT_KEYS, evaluate_results, load_coco_ground_truth, write_results_json
from ssd300.data import annotations
from ssd300.data.annotations import load_annotations, read_annotation_file, read_ground_truth
from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_eval_loader
from ssd300.distributed import DistributedContext
from ssd300.errors import UserInputError
from ssd300.evaluation import evaluate_model
from ssd300.runtime import Runtime

BACKENDS = ("pycocotools", pytest.param("faster-coco-eval", marks=pytest.mark.skipif(
    not __import__("ssd300.coco_eval").coco_eval.faster_coco_eval_available(), reason="faster-coco-eval missing")))


def _ids(scheme: str, n: int) -> list:
    if scheme == "from 0":          # labelme's exporter
        return list(range(n))
    if scheme == "repeated":        # two labelling batches concatenated
        return [i % max(1, n // 2) + 1 for i in range(n)]
    if scheme == "sparse":
        return [1000 * i + 7 for i in range(n)]
    return [None] * n               # "missing"


def _ground_truth(scheme: str, seed: int = 0) -> dict:
    """Images from id 0, several boxes per image of three categories (small to large), a crowd box."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(8):
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for _ in range(int(rng.integers(2, 6))):
            w, h = float(rng.uniform(5, width / 2)), float(rng.uniform(5, height / 2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            anns.append({"image_id": image_id, "category_id": int(rng.choice([1, 2, 5])), "bbox": [x, y, w, h],
                         "area": w * h * 0.8, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h]]})
    anns[3]["iscrowd"] = 1
    for ann, ident in zip(anns, _ids(scheme, len(anns))):
        if ident is not None:
            ann["id"] = ident
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]}


def _as_detections(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0 - 0.001 * i} for i, a in enumerate(gt["annotations"]) if not a["iscrowd"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["from 0", "repeated", "sparse", "missing"])
def test_ground_truth_as_detections_scores_exactly_one(tmp_path, backend, scheme):
    gt = _ground_truth(scheme)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    on_disk = path.read_bytes()
    metrics = evaluate_results(load_coco_ground_truth(path, backend=backend), _as_detections(gt))
    assert metrics.backend == backend
    assert metrics.ap == 1.0 and metrics.ap50 == 1.0 and metrics.stats[2] == 1.0
    assert {cid: v["AP"] for cid, v in metrics.per_class.items()} == {1: 1.0, 2: 1.0, 5: 1.0}
    assert path.read_bytes() == on_disk                                   # the user's file untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_callers_dict_and_results_are_left_as_they_are(backend):
    gt = _ground_truth("from 0")
    before = copy.deepcopy(gt)
    results = _as_detections(gt)
    results_before = copy.deepcopy(results)
    metrics = evaluate_results(load_coco_ground_truth(gt, backend=backend), results)
    assert metrics.ap == 1.0
    assert gt == before                                                   # ids still from 0, nothing added
    assert results == results_before                                      # no segmentation/area/id/iscrowd


def test_ground_truth_copy_is_renumbered_and_area_filled():
    gt = _ground_truth("repeated")
    del gt["annotations"][0]["area"]
    truth = read_ground_truth(gt)
    assert [a["id"] for a in truth["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    first = gt["annotations"][0]["bbox"]
    assert truth["annotations"][0]["area"] == first[2] * first[3]
    assert truth["annotations"][1]["area"] == gt["annotations"][1]["area"]
    assert "segmentation" not in truth["annotations"][0] and truth["annotations"][3]["iscrowd"] == 1
    with pytest.raises(UserInputError, match="^ground truth: annotations\\[0\\].*unknown image_id 99"):
        read_ground_truth({**gt, "annotations": [{**gt["annotations"][0], "image_id": 99}]})


def test_repeated_ids_are_a_warning_naming_the_file_and_count(tmp_path, caplog, monkeypatch):
    gt = _ground_truth("repeated")
    repeated = len(gt["annotations"]) - len({a["id"] for a in gt["annotations"]})
    assert repeated > 0
    path = tmp_path / "repeated.json"
    path.write_text(json.dumps(gt))
    monkeypatch.setattr(annotations, "CACHE_MIN_BYTES", 0)
    for _ in range(2):                                                   # parsed, then from the index cache
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            parsed = load_annotations(path, cache_dir=tmp_path / "cache")
        assert parsed.repeated_ids == repeated
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: {repeated} annotations repeat an annotation id used earlier in the file; every box is kept "
            "(the evaluation numbers annotations itself), but other COCO tools keep one box per id"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_annotation_file(path)
        path.write_text(json.dumps(_ground_truth("from 0")))
        read_annotation_file(path)
    assert len(caplog.records) == 1 and f"{repeated} annotations repeat" in caplog.records[0].getMessage()


@pytest.fixture(params=["typed", "standard"])
def parser(request, monkeypatch):
    """Both ways of parsing the dataset's index: msgspec's typed decoding and json (its fallback)."""
    if request.param == "typed":
        pytest.importorskip("msgspec")
    else:
        monkeypatch.setattr(annotations, "_typed_decoder", lambda: None)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
def test_bom_file_loads_for_training_and_evaluates(tmp_path, synthetic_dataset, parser, backend):
    root = synthetic_dataset(4, 6, copy_to=tmp_path / "data")
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train = CocoDetection.from_root(root, "train", cache_dir=None)       # train-style load
    assert len(train) == 4 and train[0] is not None
    val_file = root / "annotations" / "instances_val.json"
    read_annotation_file(val_file)                                        # validation
    gt = json.loads(val_file.read_text(encoding="utf-8-sig"))
    metrics = evaluate_results(load_coco_ground_truth(val_file, backend=backend), _as_detections(gt))
    assert metrics.ap == 1.0
    results = tmp_path / "results.json"                                   # a results file with a BOM too
    results.write_bytes(b"\xef\xbb\xbf" + json.dumps(_as_detections(gt)).encode())
    assert evaluate_results(load_coco_ground_truth(val_file, backend=backend), results).ap == 1.0


def test_one_line_errors_name_the_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_bytes(b'\xef\xbb\xbf{"images": [],\n "annotations": [,]}')
    for load in (read_annotation_file, load_coco_ground_truth, lambda p: load_annotations(p, cache_dir=None)):
        with pytest.raises(UserInputError, match=f"^{path}: not a readable JSON file .*line 2 column 18"):
            load(path)
    results = tmp_path / "results.json"
    results.write_text('{"image_id": 1}')
    with pytest.raises(UserInputError, match=f"^{results}: a COCO results file is a list of objects"):
        evaluate_results(load_coco_ground_truth(_ground_truth("sparse")), results)


# ----------------------------------------------------------------------------- the typed parse


def _index_of(path: Path, monkeypatch, typed: bool):
    with monkeypatch.context() as m:
        if not typed:
            m.setattr(annotations, "_typed_decoder", lambda: None)
        return load_annotations(path, cache_dir=None)


def _variants() -> dict[str, bytes]:
    gt = _ground_truth("sparse")
    gt["images"][1]["width"] = 640.5                                      # floats and ints in sizes
    gt["annotations"][0]["iscrowd"] = True
    gt["annotations"][1]["id"] = "a-string"
    del gt["annotations"][2]["id"]
    del gt["annotations"][4]["iscrowd"]
    gt["info"] = {"nested": [{"a": [1, {"b": None}]}]}
    text = json.dumps(gt)
    return {"mixed": text.encode(), "bom": b"\xef\xbb\xbf" + text.encode(), "utf16": text.encode("utf-16"),
            "repeated": json.dumps(_ground_truth("repeated")).encode()}


@pytest.mark.parametrize("variant", list(_variants()))
def test_typed_parse_gives_the_standard_index(tmp_path, monkeypatch, variant):
    pytest.importorskip("msgspec")
    path = tmp_path / "gt.json"
    path.write_bytes(_variants()[variant])
    typed, standard = _index_of(path, monkeypatch, True), _index_of(path, monkeypatch, False)
    for name in annotations.ParsedAnnotations.__dataclass_fields__:
        a, b = getattr(typed, name), getattr(standard, name)
        assert np.array_equal(a, b) and (a.dtype == b.dtype if isinstance(a, np.ndarray) else True), name
    if variant != "utf16":
        assert annotations._typed_columns(annotations._decode_typed(path.read_bytes()), path) is not None


@pytest.mark.parametrize("damage", [
    lambda gt: gt["images"].append(dict(gt["images"][0])),                       # duplicate image id
    lambda gt: gt["annotations"][2]["bbox"].pop(),                               # 3 numbers
    lambda gt: gt["annotations"][2].__setitem__("category_id", 77),              # unknown category
    lambda gt: gt["images"][1].__setitem__("width", "640"),                      # a string size
    lambda gt: gt["images"][1].__setitem__("height", 0),                         # not positive
    lambda gt: gt["annotations"][5].pop("bbox"),                                 # no box
    lambda gt: gt["categories"].append({"id": 1, "name": "again"}),              # duplicate category
    lambda gt: gt["annotations"][1]["bbox"].__setitem__(2, -3.0),                # negative width
])
def test_typed_parse_refuses_as_the_standard_path_does(tmp_path, monkeypatch, damage):
    pytest.importorskip("msgspec")
    gt = _ground_truth("sparse")
    damage(gt)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(gt))
    messages = []
    for typed in (True, False):
        with pytest.raises(UserInputError) as caught:
            _index_of(path, monkeypatch, typed)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and messages[0].startswith(f"{path}: ")


# ----------------------------------------------------------------------------- results files


@pytest.mark.slow
def test_evaluation_results_file_has_exactly_the_coco_results_keys(tmp_path, synthetic_dataset, tiny_model):
    """The writer of training's results.json and `evaluate --results` (evaluate_model)."""
    root = synthetic_dataset(2, 4)
    dataset = CocoDetection.from_root(root, "val", cache_dir=None)
    results_path = tmp_path / "results.json"
    lines: list[str] = []
    evaluate_model(tiny_model, build_eval_loader(dataset, 2, num_workers=0),
                   load_coco_ground_truth(dataset.annotation_file, backend="pycocotools"), dataset.label_map,
                   ctx=DistributedContext(), runtime=Runtime.resolve("cpu", amp=False), channels_last=False,
                   results_path=results_path, log=lines.append)
    results = json.loads(results_path.read_text())
    assert results and all(tuple(r) == RESULT_KEYS for r in results)
    assert any("Average Precision" in line for line in lines)


def test_write_results_json_writes_what_it_is_given(tmp_path):
    results = [{"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    written = json.loads(write_results_json(results, tmp_path / "r.json").read_text())
    assert written == results and tuple(written[0]) == RESULT_KEYS


@pytest.mark.slow
def test_evaluate_command_results_have_exactly_the_coco_results_keys(tmp_path, synthetic_dataset, tiny_checkpoint):
    root = synthetic_dataset(2, 4, num_classes=2)                         # the tiny checkpoint's classes
    out = tmp_path / "results.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(root), "--device", "cpu",
                 "--num-workers", "0", "--results", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results and all(tuple(r) == RESULT_KEYS for r in results)
    assert {r["image_id"] for r in results} <= {img["id"] for img in json.loads(
        (root / "annotations" / "instances_val.json").read_text())["images"]}
