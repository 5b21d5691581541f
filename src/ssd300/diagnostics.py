"""Why a model misses: COCO's matching at IoU 0.5 per detection and per ground-truth box, and what
follows from it: a confusion matrix (classes + background), precision / recall / F1 against the
score threshold per class with each class's F1-best threshold, and the worst images.

Why our own matching: one matching for both backends. pycocotools keeps its per-detection matches
(``evalImgs``), faster-coco-eval does not (they stay in C++: ``evalImgs`` is empty in Python), and
faster-coco-eval's extras (``PreviewResults.compute_confusion_matrix``, ``Curves``) match
class-agnostically, over 1000 detections per image, with interpolated precision, so their counts
differ from the COCO metric's (on the tests' hand-made case ``PreviewResults`` counts 3 true
positives of class "a" where COCO counts 2: a detection inside a crowd box, which COCO ignores);
supervision's ``ConfusionMatrix`` knows no crowd/ignore rule nor the 100-detection cap.
:func:`match_detections` is pycocotools' ``evaluateImg`` at IoU 0.5, area "all", ``max_dets``
detections per image and class (score-sorted greedy matching, crowd boxes as ignore regions that
may absorb several detections, IoU against a crowd box = intersection / detection area), so its
true positives are COCO's: at threshold 0 their count is recall@0.5 x the non-crowd boxes (tests
check it against both backends).

The confusion matrix puts COCO's true positives on the diagonal; a false positive of class p that
overlaps (IoU >= 0.5) a missed box of another class g counts as "g seen as p" (each missed box
taken once, highest score first); the other false positives go to the background row, the other
misses to the background column. Row sums are the classes' boxes, column sums their detections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100      # pycocotools' maxDets[-1]
THRESHOLD_GRID = 101      # the curves' score thresholds 0, 0.01, ..., 1
WORST_IMAGES = 8


@dataclass
class Matches:
    """COCO's matching at IoU 0.5 of every scored detection and every ground-truth box.

    Detections: ``det_*`` (image id, category id, score, xywh box, ``det_gt``: index of the
    matched box or -1, ``det_ignored``: matched to a crowd box, not counted). Boxes: ``gt_*``
    (``gt_ignored``: crowd; ``gt_match_score``: score of the detection that matched it, -inf).
    Detections past the ``max_dets`` best of their image and class are left out, as COCO does.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    det_image: np.ndarray
    det_category: np.ndarray
    det_score: np.ndarray
    det_box: np.ndarray
    det_gt: np.ndarray
    det_ignored: np.ndarray
    gt_image: np.ndarray
    gt_category: np.ndarray
    gt_box: np.ndarray
    gt_ignored: np.ndarray
    gt_match_score: np.ndarray

    @property
    def det_tp(self) -> np.ndarray:
        return (self.det_gt >= 0) & ~self.det_ignored

    @property
    def det_fp(self) -> np.ndarray:
        return self.det_gt < 0


def iou_xywh(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' ``maskUtils.iou`` for boxes: ``[D, G]``; a crowd box's IoU is the
    intersection over the detection's area."""
    return _broadcast_iou(dets.reshape(-1, 1, 4), gts.reshape(1, -1, 4), crowd.reshape(1, -1))


def _broadcast_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """The IoU of xywh boxes ``d[..., :]`` and ``g[..., :]`` broadcast against each other (all pairs or
    row by row, as the caller shapes them); crowd boxes: intersection over the detection's area."""
    w = np.clip(np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0]), 0, None)
    h = np.clip(np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1]), 0, None)
    inter = w * h
    det_area = d[..., 2] * d[..., 3]
    union = np.where(crowd, det_area, det_area + g[..., 2] * g[..., 3] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def ground_truth_arrays(coco_gt: Any, image_ids: Iterable[int], category_ids: Iterable[int]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image id, category id, xywh box, crowd) of the boxes of ``image_ids`` in ``category_ids``,
    from either backend's ground-truth object."""
    ann_ids = coco_gt.getAnnIds(imgIds=list(map(int, image_ids)), catIds=list(map(int, category_ids)))
    anns = coco_gt.loadAnns(ann_ids)
    if not anns:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, bool)
    return (np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)),
            np.fromiter((a["category_id"] for a in anns), np.int64, len(anns)),
            np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
            np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns)))


def match_detections(coco_gt: Any, rows: np.ndarray, image_ids: Sequence[int], category_ids: Sequence[int],
                     max_dets: int = MAX_DETECTIONS) -> Matches:
    """COCO's matching at IoU 0.5 (module docstring) of result ``rows`` (``[image_id, x, y, w, h, score,
    category_id]``, :mod:`ssd300.coco_eval`) against ``coco_gt``, over ``image_ids`` x ``category_ids``.

    Boxes and scores are rounded as the results file has them (3 and 5 decimals), so the matching
    is the one the evaluator saw.
    """
    images = np.unique(np.asarray(image_ids, dtype=np.int64))
    categories = np.unique(np.asarray(category_ids, dtype=np.int64))
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    rows = rows[np.isin(rows[:, 0].astype(np.int64), images) & np.isin(rows[:, 6].astype(np.int64), categories)]
    det_image = rows[:, 0].astype(np.int64)
    det_category = rows[:, 6].astype(np.int64)
    det_score = np.round(rows[:, 5], 5)
    det_box = np.round(rows[:, 1:5], 3)
    gt_image, gt_category, gt_box, gt_crowd = ground_truth_arrays(coco_gt, images, categories)

    # Detections: per (image, category), best score first (stable, as COCO's mergesort), the first max_dets.
    order = np.lexsort((np.arange(len(det_score)), -det_score, det_category, det_image))
    det_image, det_category = det_image[order], det_category[order]
    det_score, det_box = det_score[order], det_box[order]
    group_start = np.r_[True, (det_image[1:] != det_image[:-1]) | (det_category[1:] != det_category[:-1])] \
        if len(order) else np.zeros(0, bool)
    starts = np.flatnonzero(group_start)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    kept = rank < max_dets
    det_image, det_category, det_score, det_box = det_image[kept], det_category[kept], det_score[kept], det_box[kept]

    # Ground truth: per (image, category), non-crowd first (stable), as COCO's gtind.
    g_order = np.lexsort((np.arange(len(gt_image)), gt_crowd, gt_category, gt_image))
    gt_image, gt_category = gt_image[g_order], gt_category[g_order]
    gt_box, gt_crowd = gt_box[g_order], gt_crowd[g_order]

    det_gt = np.full(len(det_image), -1, dtype=np.int64)
    det_ignored = np.zeros(len(det_image), dtype=bool)
    gt_match_score = np.full(len(gt_image), -np.inf)
    stride = int(categories.max(initial=0)) + 1
    det_keys = det_image * stride + det_category
    gt_keys = gt_image * stride + gt_category
    # Every (detection, box of its image and class) pair's IoU at once; a detection's pairs are contiguous.
    first_gt = np.searchsorted(gt_keys, det_keys, side="left")
    pairs_per_det = np.searchsorted(gt_keys, det_keys, side="right") - first_gt
    pair_start = np.r_[0, np.cumsum(pairs_per_det)]
    pair_det = np.repeat(np.arange(len(det_keys)), pairs_per_det)
    pair_gt = np.repeat(first_gt, pairs_per_det) + np.arange(pair_start[-1]) - np.repeat(pair_start[:-1], pairs_per_det)
    pair_iou = _paired_iou(det_box[pair_det], gt_box[pair_gt], gt_crowd[pair_gt])
    hit = pair_iou >= min(IOU_THRESHOLD, 1 - 1e-10)

    # Groups with one box (most of them): the first detection (best score) that overlaps it takes
    # it, or, for a crowd box, every detection that overlaps it is ignored.
    single = pairs_per_det == 1
    single_pair = pair_start[:-1][single]
    single_hit = np.flatnonzero(single)[hit[single_pair]]
    crowd_hit = single_hit[gt_crowd[first_gt[single_hit]]]
    det_gt[crowd_hit] = first_gt[crowd_hit]
    det_ignored[crowd_hit] = True
    regular_hit = single_hit[~gt_crowd[first_gt[single_hit]]]
    _, first_of_group = np.unique(det_keys[regular_hit], return_index=True)
    winners = regular_hit[first_of_group]
    det_gt[winners] = first_gt[winners]
    gt_match_score[first_gt[winners]] = det_score[winners]

    # Groups with several boxes: COCO's greedy loop.
    several = np.flatnonzero(pairs_per_det > 1)
    if len(several):
        starts = several[np.r_[True, det_keys[several][1:] != det_keys[several][:-1]]]
        for d0 in starts.tolist():
            key, g0, n = det_keys[d0], int(first_gt[d0]), int(pairs_per_det[d0])
            d1 = int(np.searchsorted(det_keys, key, side="right"))
            ious = pair_iou[pair_start[d0]:pair_start[d1]].reshape(d1 - d0, n)
            crowd = gt_crowd[g0:g0 + n]
            taken = np.zeros(n, dtype=bool)
            for d in range(d1 - d0):
                # Best IoU >= 0.5 among boxes not yet taken (crowd boxes may be taken again); a
                # non-crowd box wins over any crowd box (COCO stops at the first crowd box once it
                # has one); of equal IoUs the last box wins (COCO replaces its match unless lower).
                candidates = (ious[d] >= min(IOU_THRESHOLD, 1 - 1e-10)) & (~taken | crowd)
                if not candidates.any():
                    continue
                regular = candidates & ~crowd
                pool = np.where(regular if regular.any() else candidates, ious[d], -1.0)
                m = n - 1 - int(np.argmax(pool[::-1]))
                det_gt[d0 + d] = g0 + m
                det_ignored[d0 + d] = bool(crowd[m])
                if not crowd[m]:
                    taken[m] = True
                    gt_match_score[g0 + m] = det_score[d0 + d]
    return Matches(images, categories, det_image, det_category, det_score, det_box, det_gt, det_ignored,
                   gt_image, gt_category, gt_box, gt_crowd, gt_match_score)


def _paired_iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """:func:`iou_xywh` of row i of ``dets`` with row i of ``gts`` (``[P]``)."""
    return _broadcast_iou(dets, gts, crowd)


# ---------------------------------------------------------------- precision / recall / F1 vs score


@dataclass
class ThresholdCurves:
    """Per class (``category_ids``): precision, recall and F1 of the detections scoring at least
    each of ``thresholds``; ``best_threshold`` / ``best_f1`` / its precision and recall: the
    score threshold with the highest F1 (a detection's score, so ``score >= threshold`` keeps it;
    None for a class without boxes or without a true positive)."""

    thresholds: np.ndarray
    category_ids: list[int]
    precision: np.ndarray     # [K, len(thresholds)]
    recall: np.ndarray
    f1: np.ndarray
    num_boxes: list[int]
    best_threshold: list[Optional[float]]
    best_f1: list[float]
    best_precision: list[float]
    best_recall: list[float]

    def records(self) -> dict[int, dict[str, Any]]:
        """``{category id: {"threshold", "F1", "precision", "recall"}}`` for the metrics record."""
        return {cid: {"threshold": t, "F1": round(f, 5), "precision": round(p, 5), "recall": round(r, 5)}
                for cid, t, f, p, r in zip(self.category_ids, self.best_threshold, self.best_f1,
                                           self.best_precision, self.best_recall)}


def threshold_curves(matches: Matches, grid: int = THRESHOLD_GRID) -> ThresholdCurves:
    """Precision / recall / F1 against the score threshold per class, and the F1-best threshold."""
    thresholds = np.linspace(0.0, 1.0, grid)
    cats = [int(c) for c in matches.category_ids]
    shape = (len(cats), grid)
    precision, recall, f1 = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    num_boxes: list[int] = []
    best: list[Optional[float]] = []
    best_f1: list[float] = []
    best_p: list[float] = []
    best_r: list[float] = []
    counted = ~matches.det_ignored
    for k, cid in enumerate(cats):
        boxes = int(np.count_nonzero((matches.gt_category == cid) & ~matches.gt_ignored))
        num_boxes.append(boxes)
        mine = counted & (matches.det_category == cid)
        scores = matches.det_score[mine]
        tp_flags = matches.det_gt[mine] >= 0
        order = np.argsort(-scores, kind="mergesort")
        scores, tp_flags = scores[order], tp_flags[order]
        tp = np.cumsum(tp_flags)
        fp = np.cumsum(~tp_flags)
        # counts of the detections with score >= t: the sorted-descending prefix up to the last score >= t
        kept = np.searchsorted(-scores, -thresholds, side="right")
        tp_t = np.where(kept > 0, tp[np.maximum(kept - 1, 0)] if len(tp) else 0, 0)
        fp_t = np.where(kept > 0, fp[np.maximum(kept - 1, 0)] if len(fp) else 0, 0)
        precision[k] = np.divide(tp_t, tp_t + fp_t, out=np.zeros(grid), where=(tp_t + fp_t) > 0)
        recall[k] = tp_t / boxes if boxes else 0.0
        f1[k] = _f1(precision[k], recall[k])
        if boxes == 0 or not tp_flags.any():
            best.append(None)
            best_f1.append(0.0)
            best_p.append(0.0)
            best_r.append(0.0)
            continue
        # exact: at each distinct score (the last detection of a tie group counts them all)
        last_of_tie = np.r_[scores[1:] != scores[:-1], True]
        p_s = tp / (tp + fp)
        r_s = tp / boxes
        f_s = np.where(last_of_tie, _f1(p_s, r_s), -1.0)
        i = int(np.argmax(f_s))
        best.append(float(scores[i]))
        best_f1.append(float(f_s[i]))
        best_p.append(float(p_s[i]))
        best_r.append(float(r_s[i]))
    return ThresholdCurves(thresholds, cats, precision, recall, f1, num_boxes, best, best_f1, best_p, best_r)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)


def pooled_best_threshold(matches: Matches) -> float:
    """The score threshold with the best F1 over all classes together (micro), 0.5 when nothing
    matched: the stated threshold of the confusion matrix and the worst images."""
    counted = ~matches.det_ignored
    scores = matches.det_score[counted]
    tp_flags = matches.det_gt[counted] >= 0
    boxes = int(np.count_nonzero(~matches.gt_ignored))
    if boxes == 0 or not tp_flags.any():
        return 0.5
    order = np.argsort(-scores, kind="mergesort")
    scores, tp_flags = scores[order], tp_flags[order]
    tp = np.cumsum(tp_flags)
    fp = np.cumsum(~tp_flags)
    f = np.where(np.r_[scores[1:] != scores[:-1], True], _f1(tp / (tp + fp), tp / boxes), -1.0)
    return float(scores[int(np.argmax(f))])


# ---------------------------------------------------------------- confusion matrix


@dataclass
class ConfusionMatrix:
    """``counts[true, predicted]`` over ``category_ids`` + background (last row and column) at
    IoU 0.5 and ``score_threshold`` (module docstring): row ``g`` = class g's boxes (crowd ones left
    out), column ``p`` = class p's detections scoring at least the threshold."""

    category_ids: list[int]
    counts: np.ndarray
    score_threshold: float

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.counts)[:-1]


def confusion_matrix(matches: Matches, score_threshold: float) -> ConfusionMatrix:
    cats = [int(c) for c in matches.category_ids]
    index = {cid: i for i, cid in enumerate(cats)}
    k = len(cats)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)
    shown = (matches.det_score >= score_threshold) & ~matches.det_ignored
    det_idx = np.fromiter((index[int(c)] for c in matches.det_category), np.int64, len(matches.det_category))
    gt_idx = np.fromiter((index[int(c)] for c in matches.gt_category), np.int64, len(matches.gt_category))
    tp = shown & (matches.det_gt >= 0)
    np.add.at(counts, (det_idx[tp], det_idx[tp]), 1)
    fp = np.flatnonzero(shown & (matches.det_gt < 0))
    missed = (matches.gt_match_score < score_threshold) & ~matches.gt_ignored
    confused_fp, confused_gt = _confusions(matches, fp, missed)
    np.add.at(counts, (gt_idx[confused_gt], det_idx[confused_fp]), 1)
    background_fp = np.setdiff1d(fp, confused_fp)
    np.add.at(counts, (np.full(len(background_fp), k), det_idx[background_fp]), 1)
    missed[confused_gt] = False
    np.add.at(counts, (gt_idx[missed], np.full(int(missed.sum()), k)), 1)
    return ConfusionMatrix(cats, counts, float(score_threshold))


def _confusions(matches: Matches, fp: np.ndarray, missed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (false positive, missed box of another class) with IoU >= 0.5, greedily by score."""
    missed_idx = np.flatnonzero(missed)
    images = np.intersect1d(matches.det_image[fp], matches.gt_image[missed_idx])
    pairs_fp: list[int] = []
    pairs_gt: list[int] = []
    for image in images:
        dets = fp[matches.det_image[fp] == image]
        dets = dets[np.argsort(-matches.det_score[dets], kind="mergesort")]
        gts = missed_idx[matches.gt_image[missed_idx] == image]
        ious = iou_xywh(matches.det_box[dets], matches.gt_box[gts], np.zeros(len(gts), bool))
        ious[matches.det_category[dets][:, None] == matches.gt_category[gts][None, :]] = -1.0
        taken = np.zeros(len(gts), bool)
        for i, d in enumerate(dets):
            row = np.where(taken, -1.0, ious[i])
            j = int(np.argmax(row))
            if row[j] >= IOU_THRESHOLD:
                taken[j] = True
                pairs_fp.append(int(d))
                pairs_gt.append(int(gts[j]))
    return np.asarray(pairs_fp, dtype=np.int64), np.asarray(pairs_gt, dtype=np.int64)


# ---------------------------------------------------------------- worst images


@dataclass
class ImageErrors:
    """One image's detections at the threshold: true positives, false positives (with the class
    of the box they sit on when they confuse classes) and missed boxes, xywh in original pixels."""

    image_id: int
    true_positives: list[dict[str, Any]] = field(default_factory=list)
    false_positives: list[dict[str, Any]] = field(default_factory=list)
    misses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.false_positives) + len(self.misses)

    def scaled(self, factor: float) -> "ImageErrors":
        """The same boxes in an image resized by ``factor``."""
        def scale(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**item, "bbox": [v * factor for v in item["bbox"]]} for item in items]

        return ImageErrors(self.image_id, scale(self.true_positives), scale(self.false_positives), scale(self.misses))


def worst_images(matches: Matches, score_threshold: float, count: int = WORST_IMAGES) -> list[ImageErrors]:
    """The ``count`` images with the most false positives + misses at ``score_threshold`` (ties:
    lower image id first), images without an error left out; each with its boxes to draw."""
    shown = (matches.det_score >= score_threshold) & ~matches.det_ignored
    fp = shown & (matches.det_gt < 0)
    missed = (matches.gt_match_score < score_threshold) & ~matches.gt_ignored
    images = matches.image_ids
    errors = np.zeros(len(images), dtype=np.int64)
    np.add.at(errors, np.searchsorted(images, matches.det_image[fp]), 1)
    np.add.at(errors, np.searchsorted(images, matches.gt_image[missed]), 1)
    order = np.lexsort((images, -errors))
    chosen = [int(images[i]) for i in order[:count] if errors[i] > 0]
    confused_fp, confused_gt = _confusions(matches, np.flatnonzero(fp), missed)
    confused_as = dict(zip(confused_fp.tolist(), matches.gt_category[confused_gt].tolist()))
    out = []
    for image_id in chosen:
        item = ImageErrors(image_id)
        for d in np.flatnonzero((matches.det_image == image_id) & shown):
            entry = {"category_id": int(matches.det_category[d]), "score": float(matches.det_score[d]),
                     "bbox": [float(v) for v in matches.det_box[d]]}
            if matches.det_gt[d] >= 0:
                item.true_positives.append(entry)
            else:
                if int(d) in confused_as:
                    entry["true_category_id"] = int(confused_as[int(d)])
                item.false_positives.append(entry)
        for g in np.flatnonzero((matches.gt_image == image_id) & missed):
            item.misses.append({"category_id": int(matches.gt_category[g]),
                                "bbox": [float(v) for v in matches.gt_box[g]]})
        out.append(item)
    return out


# ---------------------------------------------------------------- all of it


@dataclass
class Diagnostics:
    """An evaluation's diagnostics (all computed on the main rank from one matching)."""

    curves: ThresholdCurves
    confusion: ConfusionMatrix
    worst: list[ImageErrors]
    score_threshold: float
    threshold_origin: str = "the score threshold with the best F1 over all classes"

    def best_thresholds(self) -> dict[int, float]:
        """``{category id: F1-best score threshold}`` for the classes that have one."""
        return {cid: t for cid, t in zip(self.curves.category_ids, self.curves.best_threshold) if t is not None}

    def record(self, names: Mapping[int, str]) -> dict[str, Any]:
        """The plain-data part stored with the metrics (metrics.json, the checkpoint)."""
        return {
            "score_threshold": round(self.score_threshold, 5),
            "best_thresholds": [{"category_id": cid, "name": names.get(cid, str(cid)), **values}
                                for cid, values in self.curves.records().items()],
            "confusion_matrix": {"category_ids": self.confusion.category_ids, "iou": IOU_THRESHOLD,
                                 "score_threshold": round(self.confusion.score_threshold, 5),
                                 "counts": self.confusion.counts.tolist()},
            "worst_images": [{"image_id": w.image_id, "false_positives": len(w.false_positives),
                              "misses": len(w.misses)} for w in self.worst],
        }


def diagnose(coco_gt: Any, rows: np.ndarray, image_ids: Iterable[int], category_ids: Sequence[int],
             score_threshold: Optional[float] = None, worst_count: int = WORST_IMAGES) -> Diagnostics:
    """Everything above from one matching; ``score_threshold`` None: the pooled F1-best one."""
    matches = match_detections(coco_gt, rows, list(image_ids), category_ids)
    threshold = pooled_best_threshold(matches) if score_threshold is None else float(score_threshold)
    origin = Diagnostics.threshold_origin if score_threshold is None else "as given"
    return Diagnostics(threshold_curves(matches), confusion_matrix(matches, threshold),
                       worst_images(matches, threshold, worst_count), threshold, origin)


def best_thresholds_of(checkpoint: Mapping[str, Any]) -> Optional[dict[int, float]]:
    """``{category id: F1-best score threshold}`` of the evaluation a training checkpoint belongs to
    (its ``metrics`` entry names the epoch; the run's ``evaluations`` hold each evaluation's
    ``diagnostics`` record); None when the checkpoint holds none."""
    metrics = checkpoint.get("metrics")
    evaluations = checkpoint.get("evaluations")
    if not isinstance(metrics, Mapping) or not isinstance(evaluations, (list, tuple)):
        return None
    for entry in reversed(evaluations):
        if isinstance(entry, Mapping) and entry.get("epoch") == metrics.get("epoch"):
            record = entry.get("diagnostics")
            if not isinstance(record, Mapping):
                return None
            found = {int(b["category_id"]): float(b["threshold"]) for b in record.get("best_thresholds", ())
                     if isinstance(b, Mapping) and b.get("threshold") is not None}
            return found or None
    return None
