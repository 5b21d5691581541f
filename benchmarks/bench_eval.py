"""COCO evaluation at val2017 scale: rank-0 evaluation time per backend, and gathering detections.

1. A synthetic val2017-sized set (5,000 images, 1-14 boxes each, ~1 % crowd, COCO's category ids)
   with ~70k detections near the ground truth plus false positives:
   ground-truth load and ``evaluate_results`` time per backend (median of ``--repeats``), and
   whether the 12 numbers agree.
2. Gathering 5,000 images x 200 detections from 2 gloo ranks onto rank 0: today's
   ``all_gather_objects`` of (ids, rows) pickles vs ``gather_arrays`` (tensors, to rank 0 only):
   time (median) and rank 0's peak memory above its level before the gather (fresh processes).

    .venv/bin/python benchmarks/bench_eval.py [--images 5000] [--detections 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ssd300.labels import COCO_CATEGORIES

from common import seconds, timed


def make_ground_truth(path: Path, images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = [c for c, _ in COCO_CATEGORIES]
    image_entries, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        image_entries.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        for _ in range(int(rng.integers(1, 15))):
            w = float(rng.uniform(4, width * 0.8)) * float(rng.uniform(0.1, 1))
            h = float(rng.uniform(4, height * 0.8)) * float(rng.uniform(0.1, 1))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice(ids)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.01)})
    data = {"images": image_entries, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in COCO_CATEGORIES]}
    path.write_text(json.dumps(data))
    return data


def make_results(gt: dict, seed: int = 1) -> list[dict]:
    """Per image: a jittered copy of each box and as many random false positives (~70k for 5,000)."""
    rng = np.random.default_rng(seed)
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    ids = [c for c, _ in COCO_CATEGORIES]
    results = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
        results.append({"image_id": ann["image_id"], "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]),
                                                              max(1.0, h + jitter[3])],
                        "score": float(rng.uniform(0.2, 1)), "category_id": ann["category_id"]})
        width, height = sizes[ann["image_id"]]
        fw, fh = float(rng.uniform(8, width / 2)), float(rng.uniform(8, height / 2))
        results.append({"image_id": ann["image_id"], "bbox": [float(rng.uniform(0, width - fw)),
                                                              float(rng.uniform(0, height - fh)), fw, fh],
                        "score": float(rng.uniform(0, 0.6)), "category_id": int(rng.choice(ids))})
    return results


def bench_backends(images: int, repeats: int) -> None:
    from ssd300.coco_eval import (
        EVAL_BACKENDS,
        evaluate_results,
        faster_coco_eval_available,
        load_coco_ground_truth,
    )

    with tempfile.TemporaryDirectory() as tmp:
        gt_path = Path(tmp) / "instances_val.json"
        gt = make_ground_truth(gt_path, images)
        results = make_results(gt)
        print(f"\n{images} images, {len(gt['annotations'])} boxes, {len(results)} detections; median of {repeats}\n")
        print("| backend | load ground truth s | evaluate s | vs pycocotools | AP | AP50 |")
        print("|---|---:|---:|---:|---:|---:|")
        figures = {}
        for backend in EVAL_BACKENDS:
            if backend == "faster-coco-eval" and not faster_coco_eval_available():
                print("| faster-coco-eval | (not installed) | | | | |")
                continue
            loads, evals, metrics = [], [], None
            for _ in range(repeats):
                coco_gt, load_seconds = timed(lambda: load_coco_ground_truth(gt_path, backend=backend))
                metrics, eval_seconds = timed(lambda: evaluate_results(coco_gt, results))
                loads.append(load_seconds)
                evals.append(eval_seconds)
            figures[backend] = (statistics.median(loads), statistics.median(evals), metrics)
        base = figures["pycocotools"][1]
        for backend, (load_s, eval_s, metrics) in figures.items():
            print(f"| {backend} | {load_s:.2f} | {eval_s:.2f} | {base / eval_s:.1f}x | {metrics.ap:.4f} | "
                  f"{metrics.ap50:.4f} |")
        if len(figures) == 2:
            a, b = (figures[k][2].stats for k in EVAL_BACKENDS)
            print(f"\n12 numbers identical within 1e-12: {bool(np.allclose(a, b, rtol=0, atol=1e-12))}")


# ----------------------------------------------------------------------------- gather


def _rank_rows(rank: int, world_size: int, images: int, detections: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(rank)
    image_ids = list(range(rank + 1, images + 1, world_size))
    rows = rng.uniform(0, 500, (len(image_ids) * detections, 7))
    rows[:, 0] = np.repeat(image_ids, detections)
    return image_ids, rows


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := VmRSS


def _gather_worker(rank: int, world_size: int, port: int, variant: str, images: int, detections: int,
                   repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ssd300.coco_eval import merge_rank_rows
    from ssd300.distributed import all_gather_objects, gather_arrays

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    image_ids, rows = _rank_rows(rank, world_size, images, detections)
    cpu = torch.device("cpu")
    _reset_peak_rss()
    before = _status_mb("VmRSS")

    def gather_once() -> object:
        if variant == "all_gather_object":
            gathered = all_gather_objects((image_ids, rows))
            return merge_rank_rows(gathered) if rank == 0 else None
        ids = gather_arrays(np.asarray(image_ids, dtype=np.int64), cpu)
        parts = gather_arrays(rows, cpu)
        return merge_rank_rows(zip(ids, parts)) if rank == 0 else None

    times = []
    for _ in range(repeats):
        dist.barrier()
        times.append(seconds(gather_once))  # the merged rows are dropped before the next repeat
    peak = _status_mb("VmHWM")
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": statistics.median(times), "peak_extra_mb": peak - before,
                                         "rows_mb": rows.nbytes / 2**20}))
    dist.destroy_process_group()


def bench_gather(images: int, detections: int, repeats: int) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    print(f"\nGather of {images} images x {detections} detections from 2 gloo ranks onto rank 0 "
          f"(median of {repeats}; merge of padded duplicates included)\n")
    print("| method | seconds | rank-0 peak above pre-gather RSS |")
    print("|---|---:|---:|")
    for variant in ("all_gather_object", "gather_arrays"):
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = str(Path(tmp) / "out.json")
            mp.spawn(_gather_worker, args=(2, port, variant, images, detections, repeats, out), nprocs=2, join=True)
            result = json.loads(Path(out).read_text())
        print(f"| {variant} | {result['seconds']:.3f} | {result['peak_extra_mb']:.0f} MB "
              f"(one rank's rows: {result['rows_mb']:.0f} MB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=200, help="per image, for the gather")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-backends", action="store_true")
    parser.add_argument("--skip-gather", action="store_true")
    args = parser.parse_args()
    if not args.skip_backends:
        bench_backends(args.images, args.repeats)
    if not args.skip_gather:
        bench_gather(args.images, args.detections, args.repeats)


if __name__ == "__main__":
    main()
