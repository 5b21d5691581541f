"""Pascal VOC detection metric: per-class AP at IoU 0.5 and their mean (mAP), VOC2007's 11-point
interpolation (``voc07``) or VOC2010+'s all-point area (``voc12``).

Follows the VOC devkit (``VOCevaldet.m``) and its Python port (py-faster-rcnn ``voc_eval.py``):

- detections of a class are taken by descending score (a stable sort: equal scores keep their
  input order) and each is matched greedily to the ground-truth box of its image it overlaps most;
- IoU >= 0.5 (the devkit's ``ovmax >= minoverlap``) with an unmatched box: true positive; with an
  already matched box, or below 0.5: false positive;
- a detection whose best box is ``difficult`` is neither (ignored), and difficult boxes are not
  positives. COCO ``iscrowd`` / ``ignore`` boxes count as difficult here;
- IoU convention: by default the devkit's inclusive pixels (``+1`` on widths and heights, for
  VOC's integer pixel boxes), as the published ``mean_average_precision`` package also computes
  (the test compares against it); ``inclusive_pixels=False`` uses continuous boxes (torchvision,
  COCO).

A class without positives in the evaluated images has AP -1 (undefined; the devkit divides by
zero) and does not enter the mean. Results come back as :class:`~ssd300.coco_eval.CocoMetrics`
(``stats[0]`` and ``stats[1]`` = the mAP, the COCO-only statistics -1), so training, its records
and figures use them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ssd300.coco_eval import RECALL_POINTS, STAT_NAMES, CocoMetrics

VOC_METRICS: tuple[str, ...] = ("voc07", "voc12")
METRICS: tuple[str, ...] = ("coco", *VOC_METRICS)   # the values of the ``metric`` field
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class GroundTruth:
    """Every ground-truth box of the evaluated set, flat: ltrb pixels, its image and category,
    and whether it is difficult (ignored)."""

    image_ids: np.ndarray      # (B,) int64
    boxes: np.ndarray          # (B, 4) float64 ltrb
    category_ids: np.ndarray   # (B,) int64
    difficult: np.ndarray      # (B,) bool


def ground_truth_from_coco(coco_gt: Any) -> GroundTruth:
    """The boxes of a pycocotools / faster-coco-eval ``COCO`` object; ``difficult``, ``iscrowd``
    or ``ignore`` set means difficult."""
    anns = list(coco_gt.anns.values()) if hasattr(coco_gt, "anns") else list(coco_gt.dataset["annotations"])
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    difficult = np.array([bool(a.get("difficult", 0) or a.get("iscrowd", 0) or a.get("ignore", 0)) for a in anns],
                         dtype=bool)
    return GroundTruth(np.array([a["image_id"] for a in anns], dtype=np.int64), boxes,
                       np.array([a["category_id"] for a in anns], dtype=np.int64), difficult)


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str) -> float:
    """AP from the cumulative recall/precision of score-sorted detections: ``voc07`` the mean of the
    best precision at recall >= 0, 0.1, ..., 1; ``voc12`` the area under the precision envelope."""
    if metric == "voc07":
        points = [float(precision[recall >= t].max()) if (recall >= t).any() else 0.0
                  for t in np.linspace(0.0, 1.0, 11)]
        return float(np.mean(points))
    if metric != "voc12":
        raise ValueError(f"metric must be one of {', '.join(VOC_METRICS)}, got {metric!r}")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _iou(box: np.ndarray, others: np.ndarray, plus: float) -> np.ndarray:
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]) + plus
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]) + plus
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (box[2] - box[0] + plus) * (box[3] - box[1] + plus)
    areas = (others[:, 2] - others[:, 0] + plus) * (others[:, 3] - others[:, 1] + plus)
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_class(gt_image_ids: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                det_image_ids: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, *,
                iou_threshold: float = IOU_THRESHOLD, inclusive_pixels: bool = True
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """One class: (tp, fp) per detection in descending score order, and the number of positives."""
    plus = 1.0 if inclusive_pixels else 0.0
    npos = int((~gt_difficult).sum())
    order = np.argsort(-det_scores, kind="stable")
    gt_order = np.argsort(gt_image_ids, kind="stable")
    sorted_ids = gt_image_ids[gt_order]
    matched = np.zeros(len(gt_image_ids), dtype=bool)
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, i in enumerate(order):
        image = det_image_ids[i]
        lo, hi = np.searchsorted(sorted_ids, image, "left"), np.searchsorted(sorted_ids, image, "right")
        if lo == hi:
            fp[d] = 1
            continue
        candidates = gt_order[lo:hi]
        overlaps = _iou(det_boxes[i], gt_boxes[candidates], plus)
        best = int(np.argmax(overlaps))
        j = candidates[best]
        if overlaps[best] >= iou_threshold:
            if gt_difficult[j]:
                continue
            if not matched[j]:
                tp[d], matched[j] = 1, True
            else:
                fp[d] = 1
        else:
            fp[d] = 1
    return tp, fp, npos


def evaluate_voc(ground_truth: GroundTruth, rows: np.ndarray, metric: str = "voc07", *,
                 image_ids: Optional[Sequence[int]] = None, category_ids: Optional[Sequence[int]] = None,
                 iou_threshold: float = IOU_THRESHOLD, inclusive_pixels: bool = True) -> CocoMetrics:
    """VOC AP of detection ``rows`` (``[image_id, x, y, w, h, score, category_id]``, as
    :func:`ssd300.coco_eval.detections_to_rows` makes them) against ``ground_truth``.

    ``image_ids``: the evaluated images (default: those of the ground truth); ``category_ids``: the
    classes scored (default: those in the ground truth).
    """
    if metric not in VOC_METRICS:
        raise ValueError(f"metric must be one of {', '.join(VOC_METRICS)}, got {metric!r}")
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    gt = ground_truth
    evaluated = np.unique(np.asarray(image_ids if image_ids is not None else gt.image_ids, dtype=np.int64))
    gt_in = np.isin(gt.image_ids, evaluated)
    det_ids = rows[:, 0].astype(np.int64)
    det_in = np.isin(det_ids, evaluated)
    classes = [int(c) for c in (category_ids if category_ids is not None else np.unique(gt.category_ids))]
    det_boxes = np.concatenate([rows[:, 1:3], rows[:, 1:3] + rows[:, 3:5]], axis=1)
    per_class: dict[int, dict[str, float]] = {}
    curves: dict[int, list[float]] = {}
    for cid in classes:
        g = gt_in & (gt.category_ids == cid)
        d = det_in & (rows[:, 6].astype(np.int64) == cid)
        tp, fp, npos = match_class(gt.image_ids[g], gt.boxes[g], gt.difficult[g], det_ids[d], det_boxes[d],
                                   rows[d, 5], iou_threshold=iou_threshold, inclusive_pixels=inclusive_pixels)
        if npos == 0:
            per_class[cid] = {"AP": -1.0, "AP50": -1.0}
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap = average_precision(recall, precision, metric)
        per_class[cid] = {"AP": ap, "AP50": ap}
        curves[cid] = [round(float(precision[recall >= r].max()) if (recall >= r).any() else 0.0, 5)
                       for r in np.linspace(0.0, 1.0, RECALL_POINTS)]
    defined = [v["AP"] for v in per_class.values() if v["AP"] >= 0]
    mean_ap = float(np.mean(defined)) if defined else -1.0
    stats = [mean_ap, mean_ap] + [-1.0] * (len(STAT_NAMES) - 2)
    name = "VOC2007 11-point" if metric == "voc07" else "VOC2012 all-point"
    summary = (f" {name} mAP @ IoU {iou_threshold:.2f} = {mean_ap:.4f}  ({len(defined)} classes with ground truth, "
               f"{int(det_in.sum())} detections, difficult ignored)")
    return CocoMetrics(stats=stats, summary=summary, num_images=len(evaluated), num_detections=int(det_in.sum()),
                       per_class=per_class, backend=metric, pr_curves=curves)
