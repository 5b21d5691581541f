"""Per-class results: AP/AP50 per category (vs pycocotools run on that category alone), the table,
metrics.json / log.jsonl, the figures a training run writes, and progress output."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from ssd300.coco_eval import RECALL_POINTS, evaluate_results, load_coco_ground_truth
from ssd300.logging_utils import Progress


def _ground_truth(tmp_path: Path, seed: int = 0) -> tuple[Path, dict]:
    """Images with boxes of categories 3 and 7, and one box of a background category (id 0)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "width": 300, "height": 200, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(1, 4))):
            w, h = float(rng.uniform(20, 120)), float(rng.uniform(20, 90))
            x, y = float(rng.uniform(0, 300 - w)), float(rng.uniform(0, 200 - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice([3, 7])), "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 0, "bbox": [0, 0, 300, 200],
                        "area": 60000.0, "iscrowd": 0})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 0, "name": "_background_"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path, gt


def _results(gt: dict, seed: int = 1) -> list[dict]:
    """Jittered copies of the object boxes with random scores, plus false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        if ann["category_id"] == 0:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + jitter[0], y + jitter[1], abs(w + jitter[2]), abs(h + jitter[3])],
                        "score": float(rng.uniform(0.2, 1.0))})
    for image_id in range(1, 7):
        results.append({"image_id": image_id, "category_id": int(rng.choice([3, 7])), "bbox": [5, 5, 40, 40],
                        "score": float(rng.uniform(0.0, 0.6))})
    return results


def _pycocotools_single_category(path: Path, results: list[dict], category: int) -> tuple[float, float]:
    """Oracle: pycocotools evaluated on one category alone."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def test_per_class_ap_matches_pycocotools_on_each_category_alone(tmp_path):
    path, gt = _ground_truth(tmp_path)
    results = _results(gt)
    metrics = evaluate_results(load_coco_ground_truth(path), results, category_ids=[3, 7])
    assert list(metrics.per_class) == [3, 7]
    for category in (3, 7):
        ap, ap50 = _pycocotools_single_category(path, results, category)
        assert metrics.per_class[category]["AP"] == pytest.approx(ap, abs=1e-9)
        assert metrics.per_class[category]["AP50"] == pytest.approx(ap50, abs=1e-9)
        assert 0 < ap50 < 1
    # the overall AP is the mean over the model's classes: the background box is not a missed object
    mean = np.mean([metrics.per_class[c]["AP"] for c in (3, 7)])
    assert metrics.ap == pytest.approx(mean, abs=1e-9)
    with_background = evaluate_results(load_coco_ground_truth(path), results)
    assert with_background.per_class[0]["AP"] == 0.0 and with_background.ap < metrics.ap


def test_pr_curves_at_iou_50_are_monotone_and_average_to_ap50(tmp_path):
    path, gt = _ground_truth(tmp_path)
    metrics = evaluate_results(load_coco_ground_truth(path), _results(gt), category_ids=[3, 7])
    assert set(metrics.pr_curves) == {3, 7}
    for category, curve in metrics.pr_curves.items():
        assert len(curve) == RECALL_POINTS
        assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))  # interpolated precision
        assert np.mean(curve) == pytest.approx(metrics.per_class[category]["AP50"], abs=1e-4)


def test_per_class_table_and_records():
    from ssd300.coco_eval import CocoMetrics

    metrics = CocoMetrics(per_class={3: {"AP": 0.25, "AP50": 0.5}, 7: {"AP": -1.0, "AP50": -1.0}})
    table = metrics.per_class_table({3: "three", 7: "seven"}).splitlines()
    assert table[0].split() == ["class", "id", "AP", "AP50"]
    assert table[1].split() == ["three", "3", "0.250", "0.500"]
    assert table[2].split() == ["seven", "7", "-", "-"]
    assert metrics.per_class_records({3: "three"})[0] == {"category_id": 3, "name": "three", "AP": 0.25, "AP50": 0.5}


def test_no_detections_still_lists_every_class(tmp_path):
    path, _ = _ground_truth(tmp_path)
    metrics = evaluate_results(load_coco_ground_truth(path), [], category_ids=[3, 7])
    assert metrics.per_class == {3: {"AP": 0.0, "AP50": 0.0}, 7: {"AP": 0.0, "AP50": 0.0}}


def test_training_run_writes_per_class_results_curves_and_evaluation_figure(tmp_path, capsys):
    from PIL import Image

    from ssd300 import TrainConfig, train
    from ssd300.data.synth import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, seed=0, num_classes=2,
                                      max_objects=2, min_width=240, max_width=260, min_height=200, max_height=220)
    run = tmp_path / "run"
    result = train(TrainConfig(data=data, backbone="resnet18", epochs=1, batch_size=2, learning_rate=0.01,
                               evaluation=(0,), seed=0, num_workers=0, save=run, progress=False, device="cpu"))
    names = [c["name"] for c in json.loads((data / "annotations" / "instances_val.json").read_text())["categories"]]
    printed = capsys.readouterr().err
    header = [line for line in printed.splitlines() if line.split()[:4] == ["class", "id", "AP", "AP50"]]
    assert header, printed
    for name in names:
        assert any(line.split()[:1] == [name] for line in printed.splitlines())
    evaluation = result.evaluations[-1]
    assert [c["name"] for c in evaluation["per_class"]] == names
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["evaluations"][-1]["per_class"] == evaluation["per_class"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and evals[-1]["per_class"] == evaluation["per_class"]
    for figure in (run / "curves.png", run / "evaluation_epoch_0.png"):
        with Image.open(figure) as image:
            assert image.format == "PNG" and image.width > 500


# ------------------------------------------------------------------ progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_prints_plain_lines():
    stream = io.StringIO()
    with Progress(4, "evaluation", stream=stream, interval=0.0) as progress:
        for _ in range(4):
            progress.update(1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("evaluation: 1/4 images (25%),") and "images/s, eta" in lines[0]
    assert lines[-1].startswith("evaluation: 4/4 images (100%)")
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_bar_and_logging_goes_above_it(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # an application's console logging
    root.addHandler(handler)
    try:
        with Progress(3, "detect") as progress:
            progress.update(1)
            # tqdm's logging redirection replaces console handlers while the bar is shown
            assert handler not in root.handlers
            logging.getLogger("ssd300.data.coco").warning("skipping image x.jpg: broken")
            progress.update(2)
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "skipping image x.jpg: broken\n" in text and "detect" in text and "\r" in text


def test_silent_progress_prints_nothing():
    stream = _Terminal()
    with Progress(3, "x", stream=stream, silent=True) as progress:
        progress.update(3)
    assert stream.getvalue() == ""
