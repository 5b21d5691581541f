"""COCO evaluation: conversion to pixels/category ids, rank merging, parity with pycocotools."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from ssd300.coco_eval import (detections_to_rows, evaluate_results, load_coco_ground_truth,
                              merge_rank_rows, rows_to_results, write_results_json)
from ssd300.commands.options import cli_message

CATEGORY_IDS = (0, 3, 7)  # label -> dataset category id (non-contiguous ids on purpose)


def _ground_truth(tmp_path, num_images=6, seed=0):
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(100, 400)), int(rng.integers(100, 400))
        images.append({"id": image_id * 10, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(1, 4))):
            w, h = float(rng.uniform(10, width / 2)), float(rng.uniform(10, height / 2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id * 10,
                                "category_id": int(rng.choice([3, 7])), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path, gt


def _detections_near_ground_truth(gt, seed=1, category_ids=CATEGORY_IDS):
    """Per image: jittered copies of the ground truth (normalised ltrb) plus random false positives."""
    rng = np.random.default_rng(seed)
    by_image = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    boxes, scores, labels, ids, sizes = [], [], [], [], []
    for img in gt["images"]:
        w, h = img["width"], img["height"]
        rows = []
        for ann in by_image[img["id"]]:
            x, y, bw, bh = ann["bbox"]
            jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            l, t, r, b = np.array([x, y, x + bw, y + bh]) + jitter
            rows.append(([l / w, t / h, r / w, b / h], rng.uniform(0.3, 1.0), category_ids.index(ann["category_id"])))
        for _ in range(3):
            l, t = rng.uniform(0, 0.7, 2)
            rows.append(([l, t, l + 0.2, t + 0.2], rng.uniform(0.05, 0.6), int(rng.integers(1, len(category_ids)))))
        boxes.append(torch.tensor([r[0] for r in rows], dtype=torch.float32))
        scores.append(torch.tensor([r[1] for r in rows], dtype=torch.float32))
        labels.append(torch.tensor([r[2] for r in rows], dtype=torch.int64))
        ids.append(img["id"])
        sizes.append((w, h))
    return boxes, scores, labels, ids, sizes


def test_rows_are_pixels_xywh_with_category_ids():
    rows = detections_to_rows([torch.tensor([[0.1, 0.2, 0.5, 0.6]])], [torch.tensor([0.9])],
                              [torch.tensor([2])], [42], [(200, 100)], CATEGORY_IDS)
    np.testing.assert_allclose(rows, [[42, 20, 20, 80, 40, 0.9, 7]], rtol=1e-6)
    empty = detections_to_rows([torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0, dtype=torch.int64)],
                               [1], [(10, 10)], CATEGORY_IDS)
    assert empty.shape == (0, 7)


def test_evaluation_equals_pycocotools_on_the_same_json(tmp_path):
    gt_path, gt = _ground_truth(tmp_path)
    rows = detections_to_rows(*_detections_near_ground_truth(gt), CATEGORY_IDS)
    results_path = write_results_json(rows_to_results(rows), tmp_path / "results.json")
    ours = evaluate_results(load_coco_ground_truth(gt_path), results_path)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert ours.stats == pytest.approx(list(evaluator.stats), abs=1e-12)
    assert 0.2 < ours.ap50 <= 1.0  # jittered ground truth is mostly found
    assert len(ours.summary.splitlines()) == 12
    assert ours.summary.splitlines()[1].startswith(" Average Precision  (AP) @[ IoU=0.50 ")


def test_perfect_detections_score_one(tmp_path):
    gt_path, gt = _ground_truth(tmp_path, seed=3)
    results = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
               for a in gt["annotations"]]
    metrics = evaluate_results(load_coco_ground_truth(gt_path), results)
    assert metrics.ap == pytest.approx(1.0) and metrics.ap50 == pytest.approx(1.0)


def test_no_detections_give_zero_metrics(tmp_path):
    gt_path, _ = _ground_truth(tmp_path)
    metrics = evaluate_results(load_coco_ground_truth(gt_path), [])
    assert metrics.ap == 0.0 and metrics.ap50 == 0.0 and len(metrics.summary.splitlines()) == 12


def test_merge_counts_sampler_padding_once():
    # rank 0 ran images 1, 2; rank 1 ran 3 and (padding) 1 again with identical detections
    def row(i: int, s: float) -> list[float]:
        return [i, 0, 0, 5, 5, s, 3]

    rank0 = ([1, 2], np.array([row(1, 0.9), row(2, 0.8)], dtype=np.float64))
    rank1 = ([3, 1], np.array([row(3, 0.7), row(1, 0.9)], dtype=np.float64))
    ids, merged = merge_rank_rows([rank0, rank1])
    assert ids == [1, 2, 3]
    assert sorted(merged[:, 0].tolist()) == [1, 2, 3]


def test_evaluation_restricted_to_run_images(tmp_path):
    gt_path, gt = _ground_truth(tmp_path)
    first = gt["images"][0]["id"]
    results = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
               for a in gt["annotations"] if a["image_id"] == first]
    metrics = evaluate_results(load_coco_ground_truth(gt_path), results, image_ids=[first])
    assert metrics.num_images == 1
    assert metrics.ap50 == pytest.approx(1.0)


# ----------------------------------------------------------------------------- backends


def _crowded_ground_truth(tmp_path, num_images=40, seed=4):
    """Random ground truth with crowd boxes, images without any box, a category without boxes."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        if image_id % 7 == 0:
            continue                                              # an image without ground truth
        for _ in range(int(rng.integers(1, 8))):
            w, h = float(rng.uniform(4, width / 2)), float(rng.uniform(4, height / 2))  # small to large
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice([3, 7])), "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(rng.random() < 0.12)})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}, {"id": 9, "name": "never"}]}
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps(gt))
    return path, gt


def _project_synthetic_ground_truth(tmp_path):
    """The val split that `ssd300 synth` writes (what the demo and the tests train on)."""
    from ssd300.data.synth import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "synth", num_train=1, num_val=24, seed=5)
    path = root / "annotations" / "instances_val.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("make_ground_truth", [_ground_truth, _crowded_ground_truth, _project_synthetic_ground_truth])
def test_backends_agree_on_the_12_numbers_and_per_class_ap(tmp_path, make_ground_truth):
    pytest.importorskip("faster_coco_eval")
    gt_path, gt = make_ground_truth(tmp_path)
    category_ids = (0, *(c["id"] for c in gt["categories"]))
    boxes, scores, labels, ids, sizes = _detections_near_ground_truth(gt, category_ids=category_ids)
    results = rows_to_results(detections_to_rows(boxes, scores, labels, ids, sizes, category_ids))
    evaluated = [img["id"] for img in gt["images"]][1:]           # also: a restricted image set
    for image_ids in (None, evaluated):
        slow = evaluate_results(load_coco_ground_truth(gt_path, backend="pycocotools"), results, image_ids)
        fast = evaluate_results(load_coco_ground_truth(gt_path, backend="faster-coco-eval"), results, image_ids)
        assert (slow.backend, fast.backend) == ("pycocotools", "faster-coco-eval")
        assert fast.stats == pytest.approx(slow.stats, abs=1e-12)
        assert fast.summary == slow.summary
        assert fast.per_class.keys() == slow.per_class.keys() == {c["id"] for c in gt["categories"]}
        for cid in slow.per_class:
            assert fast.per_class[cid] == pytest.approx(slow.per_class[cid], abs=1e-12)
        assert 0.2 < slow.ap50 < 1.0


def test_per_class_ap_averages_to_the_summary_ap(tmp_path):
    gt_path, gt = _crowded_ground_truth(tmp_path)
    category_ids = (0, 3, 7, 9)
    results = rows_to_results(detections_to_rows(*_detections_near_ground_truth(gt, category_ids=category_ids),
                                                 category_ids))
    metrics = evaluate_results(load_coco_ground_truth(gt_path, backend="pycocotools"), results)
    assert metrics.per_class[9] == {"AP": -1.0, "AP50": -1.0}     # no ground truth: undefined
    defined = [metrics.per_class[c] for c in (3, 7)]
    # classes have the same number of (recall, IoU) cells, so the overall AP is their plain mean
    assert metrics.ap == pytest.approx(np.mean([d["AP"] for d in defined]), abs=1e-12)
    assert metrics.ap50 == pytest.approx(np.mean([d["AP50"] for d in defined]), abs=1e-12)
    assert all(0 < d["AP50"] <= 1 and d["AP"] <= d["AP50"] for d in defined)


def test_backend_choice(monkeypatch):
    import ssd300.coco_eval as coco_eval
    from ssd300.errors import UserInputError

    assert coco_eval.resolve_eval_backend("pycocotools") == "pycocotools"
    monkeypatch.setattr(coco_eval, "faster_coco_eval_available", lambda: False)
    assert coco_eval.resolve_eval_backend(None) == "pycocotools"
    with pytest.raises(UserInputError, match="^eval_backend faster-coco-eval: not installed") as caught:
        coco_eval.resolve_eval_backend("faster-coco-eval")
    assert cli_message(caught.value).startswith("--eval-backend faster-coco-eval: not installed")
    with pytest.raises(UserInputError, match="^eval_backend nope: choose one of") as caught:
        coco_eval.resolve_eval_backend("nope")
    assert cli_message(caught.value).startswith("--eval-backend nope: choose one of auto, ")
    monkeypatch.setattr(coco_eval, "faster_coco_eval_available", lambda: True)
    assert coco_eval.resolve_eval_backend("auto") == "faster-coco-eval"
