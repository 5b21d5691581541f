"""Detections -> COCO results json -> the COCO bbox summary (faster-coco-eval or pycocotools).

Detections are kept as one float64 array of rows ``[image_id, x, y, w, h, score, category_id]``
(pixels of the original image), which is cheap to gather across ranks and to de-duplicate when a
distributed sampler padded its shard by repeating images.

Backends: faster-coco-eval (a C++ port of pycocotools' algorithm with the same 12 numbers, ~7x
faster on 5,000 images) when installed (extra ``eval``), pycocotools otherwise; choose one with
``backend=`` (the field ``eval_backend`` of the training and evaluation configs).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ssd300.data.annotations import read_ground_truth, read_json
from ssd300.errors import UserInputError
from ssd300.files import PathLike, write_json
from ssd300.optional import available, install_hint
from ssd300.postprocess import boxes_to_pixels, clip_boxes

if TYPE_CHECKING:
    from ssd300.diagnostics import Diagnostics

EVAL_BACKENDS: tuple[str, ...] = ("faster-coco-eval", "pycocotools")

STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)

ROW_WIDTH = 7


RECALL_POINTS = 101  # pycocotools' recall thresholds 0, 0.01, ..., 1


@dataclass
class CocoMetrics:
    """The 12 COCO bbox statistics (-1 where undefined), the printed summary, and per-class AP.

    ``per_class`` maps each evaluated category id to ``{"AP": ..., "AP50": ...}`` (area all,
    100 detections; -1 for a category without ground truth in the evaluated images), taken from
    the accumulated precision array as pycocotools' summary does for all classes together.
    ``pr_curves`` holds each category's interpolated precision at IoU 0.5 at the 101 recall
    points 0..1 (categories with ground truth only). ``diagnostics``: the evaluation's confusion
    matrix, threshold curves and worst images when they were asked for (:mod:`ssd300.diagnostics`).
    """

    stats: list[float] = field(default_factory=lambda: [0.0] * len(STAT_NAMES))
    summary: str = ""
    num_images: int = 0
    num_detections: int = 0
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)
    backend: str = ""
    pr_curves: dict[int, list[float]] = field(default_factory=dict)
    diagnostics: Optional["Diagnostics"] = None

    @property
    def ap(self) -> float:
        return self.stats[0]

    @property
    def ap50(self) -> float:
        return self.stats[1]

    def as_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(STAT_NAMES, self.stats)}

    def per_class_records(self, names: dict[int, str]) -> list[dict[str, Any]]:
        """``[{"category_id", "name", "AP", "AP50"}]`` in category order (for JSON files)."""
        return [{"category_id": cid, "name": names.get(cid, str(cid)), "AP": round(v["AP"], 5),
                 "AP50": round(v["AP50"], 5)} for cid, v in self.per_class.items()]

    def per_class_table(self, names: dict[int, str]) -> str:
        """The per-class AP and AP50 as a text table ("-" where a class has no ground truth)."""
        if not self.per_class:
            return ""
        width = max(8, *(len(names.get(cid, str(cid))) for cid in self.per_class))
        lines = [f" {'class':<{width}}  {'id':>5}  {'AP':>6}  {'AP50':>6}"]
        for cid, values in self.per_class.items():
            cells = [f"{values[k]:6.3f}" if values[k] >= 0 else f"{'-':>6}" for k in ("AP", "AP50")]
            lines.append(f" {names.get(cid, str(cid)):<{width}}  {cid:>5}  {cells[0]}  {cells[1]}")
        return "\n".join(lines)


def detections_to_rows(boxes_ltrb: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                       labels: Sequence[torch.Tensor], image_ids: Sequence[int],
                       image_sizes: Sequence[Sequence[float]] | torch.Tensor,
                       category_ids: Sequence[int]) -> np.ndarray:
    """Per-image normalised ltrb boxes -> result rows in original pixels (clipped to the image, as on
    every path: :func:`ssd300.postprocess.clip_boxes`) with dataset category ids.

    ``image_sizes`` holds (width, height) per image; ``category_ids[label]`` maps contiguous
    labels back to the dataset's ids.
    """
    lut = np.asarray(category_ids, dtype=np.float64)
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64).reshape(-1, 2)
    chunks: list[np.ndarray] = []
    for i, image_id in enumerate(image_ids):
        boxes = boxes_ltrb[i].detach().to("cpu", torch.float64).reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        pixels = boxes_to_pixels(clip_boxes(boxes), sizes[i]).numpy()  # ltrb inside the image
        rows = np.empty((boxes.shape[0], ROW_WIDTH), dtype=np.float64)
        rows[:, 0] = float(image_id)
        rows[:, 1:3] = pixels[:, :2]
        rows[:, 3:5] = pixels[:, 2:] - pixels[:, :2]
        rows[:, 5] = scores[i].detach().to("cpu", torch.float64).numpy()
        rows[:, 6] = lut[labels[i].detach().cpu().numpy().astype(np.int64)]
        chunks.append(rows)
    return np.concatenate(chunks) if chunks else np.zeros((0, ROW_WIDTH))


def merge_rank_rows(per_rank: Iterable[tuple[Sequence[int] | np.ndarray, np.ndarray]]) -> tuple[list[int], np.ndarray]:
    """Merge (image ids, rows) from every rank, counting each image once.

    A ``DistributedSampler`` pads the last shard by repeating images; the first rank that saw an
    image contributes its detections, later copies are dropped.
    """
    seen: set[int] = set()
    ids_out: list[int] = []
    chunks: list[np.ndarray] = []
    for image_ids, rows in per_rank:
        new_ids = [int(i) for i in dict.fromkeys(int(i) for i in image_ids) if int(i) not in seen]
        seen.update(new_ids)
        ids_out.extend(new_ids)
        if len(rows):
            keep = np.isin(rows[:, 0].astype(np.int64), np.asarray(new_ids, dtype=np.int64))
            chunks.append(rows if keep.all() else rows[keep])  # no copy of a rank without duplicates
    merged = np.concatenate(chunks) if chunks else np.zeros((0, ROW_WIDTH))
    return ids_out, merged


RESULT_KEYS: tuple[str, ...] = ("image_id", "category_id", "bbox", "score")  # as `ssd300 detect` writes them


def rows_to_results(rows: np.ndarray) -> list[dict[str, Any]]:
    """COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
    return [
        {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [round(float(v), 3) for v in r[1:5]],
         "score": round(float(r[5]), 5)}
        for r in rows
    ]


def write_results_json(results: list[dict[str, Any]], path: PathLike) -> Path:
    """Atomically write the results list, one result per line (:func:`ssd300.files.write_json`).

    The dicts are written as they are: :func:`evaluate_results` leaves them so (the evaluators add
    ``segmentation``, ``area``, ``id``, ``iscrowd`` to what they are given: they get copies)."""
    return write_json(path, results)


def faster_coco_eval_available() -> bool:
    return available("faster_coco_eval")


def resolve_eval_backend(backend: Optional[str] = None) -> str:
    """``None``/"auto": faster-coco-eval when installed, else pycocotools; a named one must be there."""
    if backend in (None, "auto"):
        return "faster-coco-eval" if faster_coco_eval_available() else "pycocotools"
    if backend not in EVAL_BACKENDS:
        raise UserInputError(f"eval_backend {backend}: choose one of auto, {', '.join(EVAL_BACKENDS)}",
                             fields=("eval_backend",))
    if backend == "faster-coco-eval" and not faster_coco_eval_available():
        raise UserInputError(f"eval_backend faster-coco-eval: not installed ({install_hint('faster_coco_eval')})",
                             fields=("eval_backend",))
    return backend


def load_coco_ground_truth(annotation_file: Union[PathLike, Mapping[str, Any]], backend: Optional[str] = None) -> Any:
    """The backend's ``COCO`` ground-truth object (see :func:`resolve_eval_backend`), quietly.

    ``annotation_file`` (or a COCO instances dict) is read and validated as everywhere else
    (:func:`ssd300.data.annotations.read_ground_truth`: the same reader, BOM and all); the evaluator
    gets its own copy with annotation ids renumbered 1..n, so ids from 0, repeated or missing ids
    score as they should. The file and the caller's dict are left as they are.
    """
    backend = resolve_eval_backend(backend)
    dataset = read_ground_truth(annotation_file)
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO as FasterCOCO

        return FasterCOCO(dataset, print_function=lambda *_: None)
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def backend_of(coco_gt: Any) -> str:
    """Which backend a ground-truth object from :func:`load_coco_ground_truth` belongs to."""
    return "faster-coco-eval" if type(coco_gt).__module__.startswith("faster_coco_eval") else "pycocotools"


def evaluate_results(coco_gt: Any, results: list[dict[str, Any]] | PathLike,
                     image_ids: Sequence[int] | None = None,
                     category_ids: Sequence[int] | None = None) -> CocoMetrics:
    """COCO bbox evaluation with ``coco_gt``'s backend; ``results`` is a list of result dicts or a
    json path (read by :func:`ssd300.data.annotations.read_json`). A list is left as it is: the
    evaluator, which adds ``segmentation``, ``area``, ``id`` and ``iscrowd`` to each result it is
    given, gets shallow copies (cheaper than a second list from the rows, and the results file can
    still be written after the figures are out).

    ``image_ids`` restricts the evaluation to the images that were actually run (default: all
    images of the ground truth, as pycocotools does); ``category_ids`` to the model's object
    classes (default: every category of the ground truth), so that a background category of the
    file (labelme's ``_background_``) is not scored as a class the model missed.
    """
    backend = backend_of(coco_gt)
    if isinstance(results, list):
        results = [dict(r) for r in results]
    else:
        path = results
        results = read_json(path)
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise UserInputError(f"{path}: a COCO results file is a list of objects "
                                 "{\"image_id\", \"category_id\", \"bbox\", \"score\"}")
    evaluated = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    gt_categories = [int(c) for c in coco_gt.getCatIds()]
    categories = gt_categories if category_ids is None else [c for c in gt_categories if c in set(category_ids)]
    if not results:  # pycocotools cannot load an empty result list; every metric is then 0
        per_class = {c: {"AP": 0.0, "AP50": 0.0} if coco_gt.getAnnIds(imgIds=evaluated, catIds=[c], iscrowd=False)
                     else {"AP": -1.0, "AP50": -1.0} for c in categories}
        return CocoMetrics(summary=_empty_summary(), num_images=len(evaluated), num_detections=0, backend=backend,
                           per_class=per_class)
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCOeval_faster

        lines: list[str] = []
        evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="bbox", print_function=lines.append)
        evaluator.params.imgIds = evaluated
        evaluator.params.catIds = categories
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        # the same 12 lines as pycocotools (it adds AR@0.5 and AR@0.75, and progress lines)
        summary = "\n".join([line for line in lines if line.lstrip().startswith("Average")][:len(STAT_NAMES)])
    else:
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
            evaluator.params.imgIds = evaluated
            evaluator.params.catIds = categories
            evaluator.evaluate()
            evaluator.accumulate()
        summary_buffer = io.StringIO()
        with contextlib.redirect_stdout(summary_buffer):
            evaluator.summarize()
        summary = summary_buffer.getvalue().rstrip()
    return CocoMetrics(stats=[float(s) for s in evaluator.stats[:len(STAT_NAMES)]], summary=summary,
                       num_images=len(evaluated), num_detections=len(results),
                       per_class=per_class_ap(evaluator.eval["precision"], evaluator.params.catIds,
                                              evaluator.params.iouThrs),
                       backend=backend,
                       pr_curves=pr_curves_at_50(evaluator.eval["precision"], evaluator.params.catIds,
                                                 evaluator.params.iouThrs))


def per_class_ap(precision: np.ndarray, category_ids: Sequence[int], iou_thresholds: Sequence[float]
                 ) -> dict[int, dict[str, float]]:
    """AP (IoU 0.50:0.95) and AP50 per category from the accumulated precision array
    ``[T, R, K, A, M]`` (area "all" = 0, most detections = last), averaging the defined (> -1)
    entries as pycocotools' summary does; -1 where none is defined."""
    at_50 = int(np.argmin(np.abs(np.asarray(iou_thresholds) - 0.5)))

    def mean_defined(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else -1.0

    return {int(cid): {"AP": mean_defined(precision[:, :, k, 0, -1]),
                       "AP50": mean_defined(precision[at_50, :, k, 0, -1])}
            for k, cid in enumerate(category_ids)}


def pr_curves_at_50(precision: np.ndarray, category_ids: Sequence[int], iou_thresholds: Sequence[float]
                    ) -> dict[int, list[float]]:
    """Interpolated precision at IoU 0.5 per category at the 101 recall points (categories with
    ground truth only); recall levels a class never reaches have precision 0."""
    at_50 = int(np.argmin(np.abs(np.asarray(iou_thresholds) - 0.5)))
    curves = {}
    for k, cid in enumerate(category_ids):
        curve = precision[at_50, :, k, 0, -1]
        if (curve > -1).any():
            curves[int(cid)] = [round(float(v), 5) for v in np.clip(curve, 0, None)]
    return curves


def _empty_summary() -> str:
    return "\n".join(f" {name:<10} = 0.000  (no detections)" for name in STAT_NAMES)
