"""Diagnostics (ssd300.diagnostics): COCO's matching at IoU 0.5 checked against a plain greedy
implementation written here and against both COCO backends' recall; the confusion matrix's counts;
the F1-best threshold on a hand-made case; per-class thresholds applied after post-processing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ssd300.coco_eval import evaluate_results, faster_coco_eval_available, load_coco_ground_truth, rows_to_results
from ssd300.diagnostics import (
    Matches,
    confusion_matrix,
    diagnose,
    match_detections,
    threshold_curves,
    worst_images,
)

CATEGORIES = [1, 2, 3]  # a, b, c


def _ann(i: int, image: int, cat: int, box: list[float], crowd: int = 0) -> dict[str, Any]:
    return {"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}


GROUND_TRUTH = {
    "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3, 4)],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    "annotations": [
        _ann(1, 1, 1, [10, 10, 20, 20]), _ann(2, 1, 1, [12, 12, 20, 20]),  # two overlapping a's
        _ann(3, 1, 2, [50, 50, 20, 20]),
        _ann(4, 2, 1, [0, 0, 50, 50], crowd=1), _ann(5, 2, 2, [60, 60, 30, 30]),
        _ann(6, 3, 3, [0, 0, 30, 30]),
    ],
}

# [image, x, y, w, h, score, category]
ROWS = np.array([
    [1, 10, 10, 20, 20, 0.9, 1],    # TP a
    [1, 11, 11, 20, 20, 0.8, 1],    # TP: the second, overlapping a
    [1, 10, 10, 20, 20, 0.3, 1],    # FP: a duplicate
    [1, 50, 50, 20, 20, 0.7, 3],    # FP c on the b: "b seen as c"
    [1, 80, 80, 10, 10, 0.6, 1],    # FP on background
    [2, 5, 5, 10, 10, 0.95, 1],     # inside the crowd box: ignored
    [2, 10, 10, 10, 10, 0.5, 1],    # ignored too (the crowd box takes several)
    [2, 61, 61, 30, 30, 0.4, 2],    # TP b
    [4, 0, 0, 10, 10, 0.85, 2],     # FP on an image without boxes
], dtype=np.float64)


def _iou(d: list[float], g: list[float], crowd: bool) -> float:
    w = max(0.0, min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0]))
    h = max(0.0, min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1]))
    inter = w * h
    union = d[2] * d[3] if crowd else d[2] * d[3] + g[2] * g[3] - inter
    return inter / union if union > 0 else 0.0


def plain_coco_matching(gt: dict[str, Any], rows: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """pycocotools' evaluateImg at IoU 0.5, area all, 100 detections, written out loop by loop."""
    dets_out, gts_out = [], []
    for image in sorted({im["id"] for im in gt["images"]}):
        for cat in CATEGORIES:
            gts = [a for a in gt["annotations"] if a["image_id"] == image and a["category_id"] == cat]
            gts = sorted(gts, key=lambda a: a["iscrowd"])  # stable: regular boxes first
            dts = [r for r in rows.tolist() if r[0] == image and r[6] == cat]
            dts = sorted(dts, key=lambda r: -r[5])[:100]
            taken = [False] * len(gts)
            matched_score = [None] * len(gts)
            for d in dts:
                best, m = 0.5, -1
                for gi, g in enumerate(gts):
                    if taken[gi] and not g["iscrowd"]:
                        continue
                    if m > -1 and not gts[m]["iscrowd"] and g["iscrowd"]:
                        break
                    iou = _iou(d[1:5], g["bbox"], bool(g["iscrowd"]))
                    if iou < best:
                        continue
                    best, m = iou, gi
                ignored = m > -1 and bool(gts[m]["iscrowd"])
                if m > -1 and not ignored:
                    taken[m] = True
                    matched_score[m] = d[5]
                dets_out.append({"image": image, "cat": cat, "score": d[5], "box": d[1:5], "tp": m > -1 and not ignored,
                                 "ignored": ignored})
            for g, s in zip(gts, matched_score):
                gts_out.append({"image": image, "cat": cat, "box": g["bbox"], "crowd": bool(g["iscrowd"]),
                                "matched_score": s})
    return dets_out, gts_out


def plain_confusion(dets: list[dict[str, Any]], gts: list[dict[str, Any]], threshold: float) -> np.ndarray:
    k = len(CATEGORIES)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)
    missed = [g for g in gts if not g["crowd"] and (g["matched_score"] is None or g["matched_score"] < threshold)]
    fps = sorted([d for d in dets if not d["ignored"] and not d["tp"] and d["score"] >= threshold],
                 key=lambda d: -d["score"])
    for d in dets:
        if d["tp"] and d["score"] >= threshold:
            counts[d["cat"] - 1, d["cat"] - 1] += 1
    used: set[int] = set()
    for d in fps:
        best, pick = 0.0, None
        for gi, g in enumerate(missed):
            if gi in used or g["image"] != d["image"] or g["cat"] == d["cat"]:
                continue
            iou = _iou(d["box"], g["box"], False)
            if iou > best:
                best, pick = iou, gi
        if pick is not None and best >= 0.5:
            used.add(pick)
            counts[missed[pick]["cat"] - 1, d["cat"] - 1] += 1
        else:
            counts[k, d["cat"] - 1] += 1
    for gi, g in enumerate(missed):
        if gi not in used:
            counts[g["cat"] - 1, k] += 1
    return counts


BACKENDS = ["pycocotools"] + (["faster-coco-eval"] if faster_coco_eval_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_matching_agrees_with_plain_coco_and_the_backends_recall(backend: str) -> None:
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend=backend)
    matches = match_detections(coco_gt, ROWS, [1, 2, 3, 4], CATEGORIES)
    dets, gts = plain_coco_matching(GROUND_TRUTH, ROWS)
    key = lambda d: (d["image"], d["cat"], -d["score"])  # noqa: E731
    dets = sorted(dets, key=key)
    assert len(dets) == len(matches.det_score) == 9
    ours = sorted(zip(matches.det_image.tolist(), matches.det_category.tolist(), (-matches.det_score).tolist(),
                      matches.det_tp.tolist(), matches.det_ignored.tolist()))
    assert ours == [(d["image"], d["cat"], -d["score"], d["tp"], d["ignored"]) for d in dets]
    assert int(matches.det_tp.sum()) == 3 and int(matches.det_ignored.sum()) == 2

    # COCO's own numbers: TP at threshold 0 = recall@0.5 x non-crowd boxes, per class
    metrics_tp = _coco_recall_tp(coco_gt)
    for cat in CATEGORIES:
        assert int((matches.det_tp & (matches.det_category == cat)).sum()) == metrics_tp[cat]

    for threshold in (0.0, 0.35, 0.65, 0.88):
        cm = confusion_matrix(matches, threshold)
        np.testing.assert_array_equal(cm.counts, plain_confusion(dets, gts, threshold))
    cm = confusion_matrix(matches, 0.0)
    assert cm.counts.tolist() == [[2, 0, 0, 0],   # a: both found
                                  [0, 1, 1, 0],   # b: one found, one seen as c
                                  [0, 0, 0, 1],   # c: missed
                                  [2, 1, 0, 0]]   # background: duplicate a + stray a, b on image 4
    # row sums: the classes' non-crowd boxes; column sums: their counted detections
    assert cm.counts[:3].sum(axis=1).tolist() == [2, 2, 1]
    assert cm.counts.sum(axis=0)[:3].tolist() == [4, 2, 1]


def _coco_recall_tp(coco_gt: Any) -> dict[int, int]:
    """True positives per class implied by the backend's recall at IoU 0.5 (area all, 100 dets)."""
    import contextlib
    import io

    results = rows_to_results(ROWS)
    if type(coco_gt).__module__.startswith("faster_coco_eval"):
        from faster_coco_eval import COCOeval_faster as Evaluator

        evaluator = Evaluator(coco_gt, coco_gt.loadRes(results), iouType="bbox", print_function=lambda *_: None)
    else:
        from pycocotools.cocoeval import COCOeval as Evaluator

        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = Evaluator(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.params.catIds = CATEGORIES
        evaluator.evaluate()
        evaluator.accumulate()
    recall = evaluator.eval["recall"][0, :, 0, -1]
    boxes = {1: 2, 2: 2, 3: 1}
    return {cat: int(round(max(0.0, float(recall[k])) * boxes[cat])) for k, cat in enumerate(CATEGORIES)}


def test_recall_and_ap50_agree_with_the_metric() -> None:
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend="pycocotools")
    metrics = evaluate_results(coco_gt, rows_to_results(ROWS))
    curves = threshold_curves(match_detections(coco_gt, ROWS, [1, 2, 3, 4], CATEGORIES))
    # recall at threshold 0 is COCO's final recall; class c (no detection) has none
    assert curves.recall[:, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert metrics.per_class[1]["AP50"] == pytest.approx(1.0, abs=1e-6)   # a: both TPs ahead of the FPs
    # b: an FP (.85) ahead of its one TP (.4): precision .5 up to recall .5, 51 of 101 recall points
    assert metrics.per_class[2]["AP50"] == pytest.approx(51 * 0.5 / 101, abs=1e-6)
    assert curves.precision[1, 0] == pytest.approx(0.5)


def test_f1_best_threshold_on_a_hand_made_case() -> None:
    # one class, 4 boxes; scores .9 TP, .8 TP, .7 FP, .6 TP, .5 FP, .4 FP
    # F1 at .9: P1 R.25 -> .4; .8: P1 R.5 -> .667; .7: P.667 R.5 -> .571; .6: P.75 R.75 -> .75 (best); .5: .667
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(1, 5)],
          "categories": [{"id": 7, "name": "x"}],
          "annotations": [_ann(i, i, 7, [10, 10, 30, 30]) for i in range(1, 5)]}
    rows = np.array([[1, 10, 10, 30, 30, .9, 7], [2, 10, 10, 30, 30, .8, 7], [1, 60, 60, 10, 10, .7, 7],
                     [3, 11, 11, 30, 30, .6, 7], [2, 60, 60, 10, 10, .5, 7], [3, 60, 60, 10, 10, .4, 7]])
    coco_gt = load_coco_ground_truth(gt, backend="pycocotools")
    curves = threshold_curves(match_detections(coco_gt, rows, [1, 2, 3, 4], [7]))
    assert curves.best_threshold == [pytest.approx(0.6)]
    assert curves.best_f1 == [pytest.approx(0.75)]
    assert (curves.best_precision[0], curves.best_recall[0]) == (pytest.approx(0.75), pytest.approx(0.75))
    grid = {round(float(t), 2): i for i, t in enumerate(curves.thresholds)}
    assert curves.precision[0, grid[0.75]] == pytest.approx(1.0)      # .9, .8 kept
    assert curves.recall[0, grid[0.75]] == pytest.approx(0.5)
    assert curves.f1[0, grid[0.45]] == pytest.approx(2 * 0.6 * 0.75 / 1.35)  # 5 kept: P .6, R .75


def test_worst_images_rank_errors_and_keep_the_boxes() -> None:
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend="pycocotools")
    matches = match_detections(coco_gt, ROWS, [1, 2, 3, 4], CATEGORIES)
    worst = worst_images(matches, 0.0, count=3)
    # image 1: 3 FPs (dup, c-on-b, stray) + 1 miss (the b) = 4; then images 3 and 4 (1 each, lower id first)
    assert [(w.image_id, len(w.false_positives), len(w.misses)) for w in worst] == [(1, 3, 1), (3, 0, 1), (4, 1, 0)]
    assert len(worst[0].true_positives) == 2
    confused = [fp for fp in worst[0].false_positives if "true_category_id" in fp]
    assert confused == [{"category_id": 3, "score": 0.7, "bbox": [50.0, 50.0, 20.0, 20.0], "true_category_id": 2}]


def test_diagnose_record_and_threshold() -> None:
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend="pycocotools")
    result = diagnose(coco_gt, ROWS, [1, 2, 3, 4], CATEGORIES)
    # pooled F1: at .8 (TP TP after .95/.5 ignored, .85 FP) P 2/3 R 2/5 ...; best is at .4 (all): P 3/7 R 3/5 = .5
    record = result.record({1: "a", 2: "b", 3: "c"})
    assert record["confusion_matrix"]["counts"] == result.confusion.counts.tolist()
    assert [b["threshold"] for b in record["best_thresholds"]] == [pytest.approx(0.8), pytest.approx(0.4), None]
    assert result.best_thresholds() == {1: pytest.approx(0.8), 2: pytest.approx(0.4)}


def test_empty_matches_do_not_fail() -> None:
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend="pycocotools")
    result = diagnose(coco_gt, np.zeros((0, 7)), [1, 2, 3, 4], CATEGORIES)
    assert result.confusion.counts[:3, 3].tolist() == [2, 2, 1]
    assert result.best_thresholds() == {}
    assert isinstance(match_detections(coco_gt, np.zeros((0, 7)), [1], CATEGORIES), Matches)


def test_per_class_thresholds_filter_detections() -> None:
    from ssd300.postprocess import Detections, filter_by_class_thresholds

    det = Detections(boxes=torch.tensor([[0, 0, .1, .1], [0, 0, .2, .2], [0, 0, .3, .3], [0, 0, .4, .4]]),
                     scores=torch.tensor([.9, .5, .5, .2]), labels=torch.tensor([1, 1, 2, 2]))
    kept = filter_by_class_thresholds([det], {1: 0.6, 2: 0.2})[0]
    assert kept.scores.tolist() == pytest.approx([.9, .5, .2])
    assert kept.labels.tolist() == [1, 2, 2]
    # a label without a threshold keeps everything
    assert filter_by_class_thresholds([det], {1: 0.95})[0].labels.tolist() == [2, 2]


def _random_case(seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Crowded random images: several boxes per class, crowd boxes, jittered and stray detections."""
    rng = np.random.default_rng(seed)
    annotations, rows = [], []
    for image in range(1, 31):
        for _ in range(int(rng.integers(0, 7))):
            w, h = rng.uniform(10, 40, 2)
            x, y = rng.uniform(0, 60, 2)
            cat = int(rng.integers(1, 4))
            annotations.append(_ann(len(annotations) + 1, image, cat, [float(x), float(y), float(w), float(h)],
                                    crowd=int(rng.random() < 0.15)))
            for _ in range(int(rng.integers(0, 3))):  # near-duplicates, sometimes of another class
                rows.append([image, x + rng.normal(0, 4), y + rng.normal(0, 4), w * rng.uniform(0.8, 1.2),
                             h * rng.uniform(0.8, 1.2), rng.uniform(0.05, 1), cat if rng.random() < 0.8 else
                             int(rng.integers(1, 4))])
        for _ in range(int(rng.integers(0, 5))):
            rows.append([image, *rng.uniform(0, 60, 2), *rng.uniform(5, 40, 2), rng.uniform(0.05, 1),
                         int(rng.integers(1, 4))])
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(1, 31)],
          "categories": GROUND_TRUTH["categories"], "annotations": annotations}
    rows_array = np.asarray(rows, dtype=np.float64)
    rows_array[:, 1:5] = np.round(rows_array[:, 1:5], 3)  # as the results file has them
    rows_array[:, 5] = np.round(rows_array[:, 5], 5)
    return gt, rows_array


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_agrees_with_pycocotools_per_detection_on_crowded_random_images(seed: int) -> None:
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    gt, rows = _random_case(seed)
    coco_gt = load_coco_ground_truth(gt, backend="pycocotools")
    matches = match_detections(coco_gt, rows, range(1, 31), CATEGORIES)
    # pycocotools' own per-detection matching (evalImgs: area "all", IoU 0.5)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(rows_to_results(rows)), iouType="bbox")
        evaluator.evaluate()
    theirs = {}
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != [0, 1e10]:
            continue
        for det_id, matched, ignored in zip(entry["dtIds"], entry["dtMatches"][0], entry["dtIgnore"][0]):
            row = rows[det_id - 1]  # loadRes numbers the results 1, 2, ... in order
            theirs[(int(row[0]), int(row[6]), float(row[5]))] = (bool(matched) and not ignored, bool(ignored))
    ours = {(int(i), int(c), float(s)): (bool(tp), bool(ig)) for i, c, s, tp, ig in
            zip(matches.det_image, matches.det_category, matches.det_score, matches.det_tp, matches.det_ignored)}
    assert len(ours) == len(theirs) == len(rows) and ours == theirs
    assert matches.det_tp.sum() >= 20 and matches.det_ignored.sum() >= 2 and matches.det_fp.sum() >= 20
    # and the plain greedy matcher written above gives the same confusion counts at any threshold
    dets, gts = plain_coco_matching(gt, rows)
    for threshold in (0.0, 0.3, 0.6):
        np.testing.assert_array_equal(confusion_matrix(matches, threshold).counts,
                                      plain_confusion(dets, gts, threshold))
