"""What the evaluation diagnostics cost next to the COCO evaluation they follow.

A synthetic set (``--images`` images, ``--classes`` classes, 1-11 boxes each, ~2 % crowd) with 100
detections per image (~70 % of the boxes found, jittered, 10 % with a wrong class, the rest stray):
the median of ``--repeats`` runs of results + ``evaluate_results`` and of
:func:`ssd300.diagnostics.diagnose` (matching, confusion matrix, curves, worst images), per backend.

    .venv/bin/python benchmarks/bench_diagnostics.py [--images 5000] [--classes 80] [--repeats 3]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from common import time_call

from ssd300.coco_eval import evaluate_results, faster_coco_eval_available, load_coco_ground_truth, rows_to_results
from ssd300.diagnostics import diagnose


def synthetic_set(images: int, classes: int, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    rng = np.random.default_rng(seed)
    annotations: list[dict[str, Any]] = []
    rows: list[list[float]] = []
    for image in range(1, images + 1):
        count = int(rng.integers(1, 12))
        for _ in range(count):
            w, h = (float(v) for v in rng.uniform(10, 300, 2))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            cat = int(rng.integers(1, classes + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.02)})
            if rng.random() < 0.7:
                label = cat if rng.random() < 0.9 else int(rng.integers(1, classes + 1))
                rows.append([image, x + rng.normal(0, 5), y + rng.normal(0, 5), w, h, rng.uniform(0.3, 1), label])
        for _ in range(100 - count):
            w, h = rng.uniform(10, 200, 2)
            rows.append([image, rng.uniform(0, 500), rng.uniform(0, 400), w, h, rng.uniform(0.05, 0.6),
                         int(rng.integers(1, classes + 1))])
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, images + 1)],
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, classes + 1)], "annotations": annotations}
    return gt, np.asarray(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gt, rows = synthetic_set(args.images, args.classes)
    print(f"{args.images} images, {args.classes} classes, {len(gt['annotations'])} boxes, {len(rows)} detections")
    backends = (["faster-coco-eval"] if faster_coco_eval_available() else []) + ["pycocotools"]
    for backend in backends:
        coco_gt = load_coco_ground_truth(gt, backend=backend)
        evaluation = time_call(lambda: evaluate_results(coco_gt, rows_to_results(rows)), args.repeats, warmup=0)
        diagnostics = time_call(lambda: diagnose(coco_gt, rows, range(1, args.images + 1),
                                                 list(range(1, args.classes + 1))), args.repeats, warmup=0)
        print(f"{backend}: results + COCO evaluation {evaluation.median:.2f} s, diagnostics {diagnostics.median:.2f} s "
              f"(+{100 * diagnostics.median / evaluation.median:.0f} %)")


if __name__ == "__main__":
    main()
