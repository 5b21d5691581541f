"""Detections -> COCO results json -> pycocotools' bbox summary.

Detections are kept as one float64 array of rows ``[image_id, x, y, w, h, score, category_id]``
(pixels of the original image), which is cheap to gather across ranks and to de-duplicate when a
distributed sampler padded its shard by repeating images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ssd300.files import write_json
from ssd300.postprocess import boxes_to_pixels, clip_boxes

STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)

ROW_WIDTH = 7


@dataclass
class CocoMetrics:
    """pycocotools' 12 bbox statistics (-1 where undefined) and its printed summary."""

    stats: list[float] = field(default_factory=lambda: [0.0] * len(STAT_NAMES))
    summary: str = ""
    num_images: int = 0
    num_detections: int = 0

    @property
    def ap(self) -> float:
        return self.stats[0]

    @property
    def ap50(self) -> float:
        return self.stats[1]

    def as_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(STAT_NAMES, self.stats)}


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


def merge_rank_rows(per_rank: Iterable[tuple[Sequence[int], np.ndarray]]) -> tuple[list[int], np.ndarray]:
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
            chunks.append(rows[np.isin(rows[:, 0].astype(np.int64), np.asarray(new_ids, dtype=np.int64))])
    merged = np.concatenate(chunks) if chunks else np.zeros((0, ROW_WIDTH))
    return ids_out, merged


def rows_to_results(rows: np.ndarray) -> list[dict[str, Any]]:
    """COCO results format: ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"}``."""
    return [
        {"image_id": int(r[0]), "bbox": [round(float(v), 3) for v in r[1:5]],
         "score": round(float(r[5]), 5), "category_id": int(r[6])}
        for r in rows
    ]


def write_results_json(results: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Atomically write the results list, one result per line (:func:`ssd300.files.write_json`)."""
    return write_json(path, results)


def load_coco_ground_truth(annotation_file: str | os.PathLike[str]) -> Any:
    """pycocotools ``COCO`` object, without its "loading annotations" chatter."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def evaluate_results(coco_gt: Any, results: list[dict[str, Any]] | str | os.PathLike[str],
                     image_ids: Sequence[int] | None = None) -> CocoMetrics:
    """Run pycocotools' bbox evaluation; ``results`` is a list of result dicts or a json path.

    ``image_ids`` restricts the evaluation to the images that were actually run (default: all
    images of the ground truth, as pycocotools does).
    """
    from pycocotools.cocoeval import COCOeval

    if not isinstance(results, list):
        with open(results) as f:
            results = json.load(f)
    evaluated = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    if not results:  # pycocotools cannot load an empty result list; every metric is then 0
        return CocoMetrics(summary=_empty_summary(), num_images=len(evaluated), num_detections=0)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = evaluated
        evaluator.evaluate()
        evaluator.accumulate()
    summary_buffer = io.StringIO()
    with contextlib.redirect_stdout(summary_buffer):
        evaluator.summarize()
    return CocoMetrics(stats=[float(s) for s in evaluator.stats], summary=summary_buffer.getvalue().rstrip(),
                       num_images=len(evaluated), num_detections=len(results))


def _empty_summary() -> str:
    return "\n".join(f" {name:<10} = 0.000  (no detections)" for name in STAT_NAMES)
