"""VOC07 11-point / VOC12 all-point AP (ssd300.voc_eval) against a plain devkit-style implementation
written here, on crafted cases (ties, difficult, no detections, a class without ground truth), and
against the published ``mean_average_precision`` package where it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ssd300.errors import UserInputError
from ssd300.train_config import TrainConfig
from ssd300.voc_eval import GroundTruth, average_precision, evaluate_voc, ground_truth_from_coco


# ----------------------------------------------------------------------------- the plain implementation

def plain_voc_ap(gt: list[tuple[int, list[float], int, bool]], dets: list[tuple[int, list[float], float, int]],
                 cls: int, use_07: bool, plus: float = 1.0) -> float:
    """py-faster-rcnn's voc_eval.py, loop by loop (ltrb boxes, >= 0.5, stable order for ties)."""
    recs: dict[int, list[tuple[list[float], bool]]] = {}
    for image, box, c, difficult in gt:
        if c == cls:
            recs.setdefault(image, []).append((box, difficult))
    npos = sum(not d for boxes in recs.values() for _, d in boxes)
    used = {image: [False] * len(boxes) for image, boxes in recs.items()}
    mine = sorted([d for d in dets if d[3] == cls], key=lambda d: -d[2])   # sorted() is stable
    tp, fp = [], []
    for image, bb, _, _ in mine:
        best, jmax = -1.0, -1
        for j, (g, _) in enumerate(recs.get(image, [])):
            iw = max(min(bb[2], g[2]) - max(bb[0], g[0]) + plus, 0.0)
            ih = max(min(bb[3], g[3]) - max(bb[1], g[1]) + plus, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + plus) * (bb[3] - bb[1] + plus) + (g[2] - g[0] + plus) * (g[3] - g[1] + plus)
                     - inter)
            if inter / union > best:
                best, jmax = inter / union, j
        if best >= 0.5:
            if recs[image][jmax][1]:
                continue
            if not used[image][jmax]:
                used[image][jmax] = True
                tp.append(1.0)
                fp.append(0.0)
            else:
                tp.append(0.0)
                fp.append(1.0)
        else:
            tp.append(0.0)
            fp.append(1.0)
    if npos == 0:
        return -1.0
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else float(np.max(prec[rec >= t]))
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def to_inputs(gt: list[tuple[int, list[float], int, bool]], dets: list[tuple[int, list[float], float, int]]
              ) -> tuple[GroundTruth, np.ndarray]:
    truth = GroundTruth(np.array([g[0] for g in gt], dtype=np.int64), np.array([g[1] for g in gt], dtype=np.float64),
                        np.array([g[2] for g in gt], dtype=np.int64), np.array([g[3] for g in gt], dtype=bool))
    rows = np.array([[d[0], d[1][0], d[1][1], d[1][2] - d[1][0], d[1][3] - d[1][1], d[2], d[3]] for d in dets],
                    dtype=np.float64).reshape(-1, 7)
    return truth, rows


# class 1: two images, a difficult box, a duplicate detection, a miss; class 2: ties in score;
# class 3: ground truth but no detection; class 4: detections but no ground truth.
GT = [
    (1, [10, 10, 50, 50], 1, False), (1, [60, 60, 100, 100], 1, False), (1, [200, 10, 240, 60], 1, True),
    (2, [0, 0, 30, 30], 1, False), (2, [100, 100, 140, 150], 2, False), (3, [5, 5, 45, 45], 2, False),
    (3, [50, 50, 90, 90], 2, False), (2, [20, 20, 60, 60], 3, False),
]
DETS = [
    (1, [11, 11, 50, 49], 0.9, 1), (1, [12, 10, 52, 50], 0.8, 1),    # duplicate of the same box: FP
    (1, [201, 12, 240, 60], 0.85, 1),                                  # matches the difficult box: ignored
    (2, [1, 1, 29, 31], 0.4, 1), (1, [300, 300, 340, 340], 0.7, 1),   # TP, FP
    (2, [100, 100, 140, 150], 0.6, 2), (3, [120, 120, 160, 160], 0.6, 2), (3, [50, 50, 90, 90], 0.6, 2),
    (3, [5, 5, 45, 45], 0.3, 2),
    (2, [10, 10, 40, 40], 0.9, 4),
]


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
@pytest.mark.parametrize("inclusive", [True, False])
def test_matches_the_plain_implementation(metric: str, inclusive: bool) -> None:
    truth, rows = to_inputs(GT, DETS)
    result = evaluate_voc(truth, rows, metric, category_ids=[1, 2, 3, 4], inclusive_pixels=inclusive)
    plus = 1.0 if inclusive else 0.0
    expected = {c: plain_voc_ap(GT, DETS, c, metric == "voc07", plus) for c in (1, 2, 3, 4)}
    for c in (1, 2, 3, 4):
        assert result.per_class[c]["AP"] == pytest.approx(expected[c], abs=1e-12), c
    assert expected[3] == 0.0 and expected[4] == -1.0          # no detections: 0; no ground truth: undefined
    assert result.ap == pytest.approx(np.mean([expected[1], expected[2], expected[3]]), abs=1e-12)
    assert result.ap50 == result.ap and result.backend == metric


def test_hand_computed_values() -> None:
    # class 1: scores 0.9 TP, 0.85 ignored (difficult), 0.8 FP (duplicate), 0.7 FP, 0.4 TP; 3 positives
    # recall 1/3, 1/3, 1/3, 2/3 with precision 1, 1/2, 1/3, 1/2
    truth, rows = to_inputs(GT, DETS)
    voc12 = evaluate_voc(truth, rows, "voc12", category_ids=[1])
    assert voc12.per_class[1]["AP"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5)
    voc07 = evaluate_voc(truth, rows, "voc07", category_ids=[1])
    assert voc07.per_class[1]["AP"] == pytest.approx((4 * 1 + 3 * 0.5 + 4 * 0) / 11)


def test_ties_keep_input_order_and_difficult_only_class() -> None:
    # Two detections with one score on one box: the first listed is the TP, the second a duplicate.
    gt = [(1, [0, 0, 10, 10], 1, False), (1, [50, 50, 60, 60], 2, True)]
    dets = [(1, [0, 0, 10, 10], 0.5, 1), (1, [0, 0, 10, 10], 0.5, 1), (1, [50, 50, 60, 60], 0.9, 2)]
    truth, rows = to_inputs(gt, dets)
    result = evaluate_voc(truth, rows, "voc12", category_ids=[1, 2])
    assert result.per_class[1]["AP"] == pytest.approx(1.0)   # recall 1 reached at precision 1
    assert result.per_class[2]["AP"] == -1.0                  # only difficult boxes: no positives
    assert result.ap == pytest.approx(1.0)


def test_empty_detections_and_restricted_images() -> None:
    truth, rows = to_inputs(GT, DETS)
    empty = evaluate_voc(truth, np.zeros((0, 7)), "voc07", category_ids=[1, 2])
    assert empty.per_class == {1: {"AP": 0.0, "AP50": 0.0}, 2: {"AP": 0.0, "AP50": 0.0}} and empty.ap == 0.0
    only_3 = evaluate_voc(truth, rows, "voc12", image_ids=[3], category_ids=[2])  # image 3: 2 boxes of class 2
    assert only_3.per_class[2]["AP"] == pytest.approx(plain_voc_ap([g for g in GT if g[0] == 3],
                                                                   [d for d in DETS if d[0] == 3], 2, False))
    assert only_3.num_images == 1


def test_average_precision_curves() -> None:
    recall, precision = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert average_precision(recall, precision, "voc12") == pytest.approx(0.75)
    assert average_precision(recall, precision, "voc07") == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)


def test_ground_truth_from_coco_marks_difficult_and_crowd() -> None:
    class Fake:
        anns = {1: {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 5},
                2: {"image_id": 7, "bbox": [0, 0, 1, 1], "category_id": 5, "iscrowd": 1},
                3: {"image_id": 8, "bbox": [0, 0, 2, 2], "category_id": 6, "difficult": 1}}
    truth = ground_truth_from_coco(Fake())
    np.testing.assert_array_equal(truth.boxes[0], [1, 2, 4, 6])
    assert truth.difficult.tolist() == [False, True, True] and truth.image_ids.tolist() == [7, 7, 8]


def test_metric_is_a_validated_config_field() -> None:
    assert TrainConfig().metric == "coco" and TrainConfig(metric="voc07").metric == "voc07"
    with pytest.raises(UserInputError, match="metric") as info:
        TrainConfig(metric="voc2007")
    assert info.value.fields == ("metric",)


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_matches_published_mean_average_precision(metric: str) -> None:
    """bes-dev's mean_average_precision (VOC-style, +1 pixels, IoU > 0.5, difficult boxes counted as
    positives): compared on a random set without difficult boxes, where its convention is the devkit's."""
    pytest.importorskip("pandas")
    mapkg = pytest.importorskip("mean_average_precision")
    rng = np.random.default_rng(3)
    num_classes, gt, dets = 3, [], []
    for image in range(30):
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 200, 2).round()
            w, h = rng.uniform(10, 80, 2).round()
            c = int(rng.integers(0, num_classes))
            gt.append((image, [x, y, x + w, y + h], c, False))
            for _ in range(rng.integers(0, 3)):   # jittered detections: some above, some below 0.5
                jitter = rng.normal(0, 0.25 * min(w, h), 4).round()
                box = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
                dets.append((image, box, float(rng.uniform()), c if rng.uniform() < 0.8 else (c + 1) % num_classes))
    truth, rows = ToInputs.cat_shift(*to_inputs(gt, dets))
    ours = evaluate_voc(truth, rows, metric, category_ids=[1, 2, 3])
    evaluator = mapkg.MetricBuilder.build_evaluation_metric("map_2d", async_mode=False, num_classes=num_classes)
    for image in range(30):
        g = np.array([[*b, c, 0, 0] for i, b, c, _ in gt if i == image], dtype=np.float64).reshape(-1, 7)
        p = np.array([[*b, c, s] for i, b, s, c in dets if i == image], dtype=np.float64).reshape(-1, 6)
        evaluator.add(p, g)
    kwargs = {"recall_thresholds": np.arange(0.0, 1.1, 0.1)} if metric == "voc07" else {}
    theirs = evaluator.value(iou_thresholds=0.5, **kwargs)
    for c in range(num_classes):
        assert ours.per_class[c + 1]["AP"] == pytest.approx(float(theirs[0.5][c]["ap"]), abs=1e-6), c
    assert ours.ap == pytest.approx(float(theirs["mAP"]), abs=1e-6)


class ToInputs:
    @staticmethod
    def cat_shift(truth: GroundTruth, rows: np.ndarray) -> tuple[GroundTruth, np.ndarray]:
        """Class c -> category id c + 1 (the package counts classes from 0)."""
        rows = rows.copy()
        rows[:, 6] += 1
        return GroundTruth(truth.image_ids, truth.boxes, truth.category_ids + 1, truth.difficult), rows


@pytest.mark.slow
def test_evaluate_command_with_the_voc_metric(synthetic_dataset: Any, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``--metric voc07`` through the whole evaluation: the figures are evaluate_voc's on the
    written results (AP and AP50 both the mAP), per class for the model's categories."""
    from ssd300.cli import main
    from ssd300.coco_eval import load_coco_ground_truth

    root = synthetic_dataset(2, 3, num_classes=2, max_objects=2, min_width=240, max_width=260, min_height=200,
                             max_height=220)
    summary, results = tmp_path / "summary.json", tmp_path / "results.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(root), "--device", "cpu",
                 "--num-workers", "0", "--metric", "voc07", "--json-summary", str(summary),
                 "--results", str(results)]) == 0
    written = json.loads(summary.read_text())
    rows = np.array([[r["image_id"], *r["bbox"], r["score"], r["category_id"]]
                     for r in json.loads(results.read_text())], dtype=np.float64).reshape(-1, 7)
    gt = load_coco_ground_truth(root / "annotations" / "instances_val.json", backend="pycocotools")
    expected = evaluate_voc(ground_truth_from_coco(gt), rows, "voc07", category_ids=[1, 2])
    assert len(rows) > 0 and written["AP"] == pytest.approx(expected.ap, abs=1e-3)
    last = written["evaluations"][-1]
    assert last["AP50"] == last["AP"] and last["AP75"] == -1            # the COCO path gives AP75 >= 0
    assert [c["category_id"] for c in last["per_class"]] == [1, 2]


def test_voc_layout_difficult_boxes_are_ignored(tmp_path: Path) -> None:
    """A VOC folder's ground truth (layouts.load_ground_truth: difficult -> iscrowd) under the VOC
    metric: a detection on the difficult box changes nothing, and missing it costs nothing."""
    from test_data_voc import IMAGES, make_voc

    from ssd300.data.layouts import find_split, load_ground_truth

    root = make_voc(tmp_path / "voc", IMAGES)
    truth = ground_truth_from_coco(load_ground_truth(find_split(root, "train").annotations, backend="pycocotools"))
    assert truth.difficult.tolist() == [False, True, False]
    hits = [[1, 10, 5, 30.5, 25, 0.9, 2], [2, 5, 6, 40, 53, 0.8, 1]]
    on_difficult = [1, 0, 0, 20, 20, 0.95, 1]
    for metric in ("voc07", "voc12"):
        base = evaluate_voc(truth, np.array(hits), metric)
        assert base.ap == pytest.approx(1.0) and base.per_class == {1: {"AP": 1.0, "AP50": 1.0},
                                                                    2: {"AP": 1.0, "AP50": 1.0}}
        assert evaluate_voc(truth, np.array([*hits, on_difficult]), metric).per_class == base.per_class
