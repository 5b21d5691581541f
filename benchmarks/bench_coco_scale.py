"""COCO at train2017 scale: annotation load time and peak memory, loader workers' private memory.

Builds (once, deterministically, in a cache folder) an instances json shaped like COCO's
train2017: 118,287 images, ~866k boxes with COCO's category ids, polygon segmentations, ~1 %
crowd boxes and ~1 % images without boxes (~245 MB). Every image is a hard link to one of a few
640x480 JPEGs, so the folder costs almost no disk. Then it prints:

* ``CocoDetection(...)`` load time and peak RSS, each in a fresh process (nothing else loaded
  there that could hide or inflate the figure): parsing without the index cache (with msgspec's
  typed decoding, and with the standard json path it falls back to), the first load with a cache
  (parse + write) and a later one (read the cached index); and pycocotools' ``COCO()`` on the
  same file in the same run, with the ratio of our uncached load to it (issue 21's goal: <= 0.5);
* a training loader with ``--workers`` workers: each worker's private memory (USS from
  ``/proc/PID/smaps``, less the shared-memory batches in flight) after its first batch and after
  ``--samples`` samples, and img/s.

    .venv/bin/python benchmarks/bench_coco_scale.py [--images 118287] [--samples 3000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import make_jpegs, timed

TRAIN2017_IMAGES = 118_287
BOXES_PER_IMAGE = 7.33       # train2017: 860,001 boxes / 117,266 non-empty images
EMPTY_FRACTION = 0.0086      # train2017: 1,021 images without annotations
CROWD_FRACTION = 0.0105      # train2017: ~9k crowd annotations
FORMAT = "v1"                # bump when the generated content changes


def default_root(images: int) -> Path:
    return Path(tempfile.gettempdir()) / f"ssd300-bench-coco-scale-{FORMAT}-{images}"


def build_dataset(root: Path, images: int = TRAIN2017_IMAGES, seed: int = 0) -> Path:
    """The train2017-shaped set under ``root`` (``train2017/`` + ``annotations/``); reused when built."""
    stamp = root / "COMPLETE"
    if stamp.is_file() and stamp.read_text() == f"{FORMAT} {images} {seed}":
        return root
    if root.exists():
        shutil.rmtree(root)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    from ssd300.labels import COCO_CATEGORIES

    rng = np.random.default_rng(seed)
    sources = make_jpegs(root, 4, zoom=None, pattern="source_{}.jpg")  # scikit-image's photographs, resized
    width, height = 640, 480
    counts = np.where(rng.random(images) < EMPTY_FRACTION, 0,
                      1 + rng.poisson(BOXES_PER_IMAGE - 1, images))
    total = int(counts.sum())
    image_of = np.repeat(np.arange(images), counts)
    w = rng.uniform(2, width, total) * rng.uniform(0.05, 1.0, total)
    h = rng.uniform(2, height, total) * rng.uniform(0.05, 1.0, total)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    tiny = rng.random(total) < 0.002            # a few boxes under 1 px, as in COCO
    w[tiny] *= 0.01
    category = np.array([c for c, _ in COCO_CATEGORIES])[rng.integers(0, len(COCO_CATEGORIES), total)]
    crowd = rng.random(total) < CROWD_FRACTION
    image_entries = []
    for i in range(images):
        name = f"{i + 1:012d}.jpg"
        os.link(sources[i % len(sources)], root / "train2017" / name)
        image_entries.append({"license": 3, "file_name": name,
                              "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                              "height": height, "width": width, "date_captured": "2013-11-14 11:18:45",
                              "flickr_url": f"http://farm4.staticflickr.com/3153/{i + 1}_0123456789_z.jpg",
                              "id": i + 1})
    annotations = []
    for j in range(total):
        bx, by, bw, bh = (round(float(v), 2) for v in (x[j], y[j], w[j], h[j]))
        if crowd[j]:
            segmentation: object = {"counts": [int(v) for v in rng.integers(0, 400, 24)], "size": [height, width]}
        else:
            segmentation = [[bx, by, round(bx + bw / 2, 2), by, bx + bw, by, bx + bw, round(by + bh / 2, 2),
                             bx + bw, by + bh, bx, by + bh, bx, round(by + bh / 2, 2)]]
        annotations.append({"segmentation": segmentation, "area": round(bw * bh, 4), "iscrowd": int(crowd[j]),
                            "image_id": int(image_of[j]) + 1, "bbox": [bx, by, bw, bh],
                            "category_id": int(category[j]), "id": j + 1})
    data = {"info": {"description": "synthetic train2017-shaped set"}, "licenses": [],
            "images": image_entries, "annotations": annotations,
            "categories": [{"supercategory": "thing", "id": c, "name": n} for c, n in COCO_CATEGORIES]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data, separators=(",", ":")))
    stamp.write_text(f"{FORMAT} {images} {seed}")
    return root


# ----------------------------------------------------------------------------- measurements


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def uss_mb(pid: int) -> tuple[float, float]:
    """(private memory of a process (USS: Private_Clean + Private_Dirty), the part of it in shared
    memory segments): the latter are batches in flight to the main process, not growth."""
    total = in_flight = 0
    shm = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):     # a mapping's header line
                path = fields[5] if len(fields) > 5 else ""
                shm = path.startswith("/dev/shm") or "torch_" in path
            elif fields and fields[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(fields[1])
                in_flight += int(fields[1]) if shm else 0
    return total / 1024, in_flight / 1024


PYCOCOTOOLS = "pycocotools"       # --cache-dir values of the measuring process that are not folders
STANDARD_JSON = "off-json"


def measure_load(root: Path, cache_dir: str) -> dict[str, float]:
    """In this (fresh) process: import, then time CocoDetection (or pycocotools' COCO) on the big json."""
    import contextlib
    import io

    from ssd300.data import annotations, coco  # imports torch etc. before the baseline RSS is read

    if cache_dir == PYCOCOTOOLS:
        from pycocotools.coco import COCO

        before = _rss_mb()
        with contextlib.redirect_stdout(io.StringIO()):
            gt, seconds = timed(lambda: COCO(str(root / "annotations" / "instances_train2017.json")))
        return {"seconds": seconds, "rss_before_mb": before, "rss_after_mb": _rss_mb(),
                "peak_rss_mb": _peak_rss_mb(), "images": len(gt.imgs)}
    if cache_dir == STANDARD_JSON:
        annotations._typed_decoder = lambda: None  # type: ignore[assignment]  # the fallback path alone
    elif annotations._typed_decoder() is None:
        print("note: msgspec is not installed; the uncached load uses json", file=sys.stderr)
    before = _rss_mb()
    dataset, seconds = timed(lambda: coco.CocoDetection.from_root(
        root, "train", cache_dir=None if cache_dir in ("off", STANDARD_JSON) else Path(cache_dir)))
    return {"seconds": seconds, "rss_before_mb": before, "rss_after_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb(),
            "images": len(dataset)}


def load_in_subprocess(root: Path, cache_dir: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure-load", str(root), "--cache-dir", cache_dir]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_workers(root: Path, samples: int, workers: int, batch_size: int) -> dict[str, object]:
    import torch

    from ssd300.data.coco import CocoDetection
    from ssd300.data.loaders import build_train_loader

    torch.set_num_threads(1)
    dataset = CocoDetection.from_root(root, "train", cache_dir=None)
    loader = build_train_loader(dataset, batch_size, num_workers=workers, seed=0, persistent_workers=True)
    loader.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    pids = [w.pid for w in iterator._workers]  # private attribute: the benchmark inspects the workers
    at_start = [uss_mb(p) for p in pids]
    seen = 0
    start = time.perf_counter()
    while seen < samples:
        seen += len(next(iterator))
    rate = seen / (time.perf_counter() - start)
    after = [uss_mb(p) for p in pids]
    del iterator, loader
    return {"uss_start": at_start, "uss_after": after, "samples": seen, "img_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=TRAIN2017_IMAGES)
    parser.add_argument("--root", type=Path, default=None, help="where to build/reuse the set (default: temp dir)")
    parser.add_argument("--samples", type=int, default=3000, help="samples read before the second USS reading")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="load-time repeats (median)")
    parser.add_argument("--measure-load", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load is not None:
        print(json.dumps(measure_load(args.measure_load, args.cache_dir)))
        return

    root = args.root or default_root(args.images)
    start = time.perf_counter()
    build_dataset(root, args.images)
    json_path = root / "annotations" / "instances_train2017.json"
    print(f"set: {root} ({args.images} images, {json_path.stat().st_size / 1e6:.0f} MB json; "
          f"ready in {time.perf_counter() - start:.0f} s)")

    print(f"\n| CocoDetection(train) load, fresh process | seconds (median of {args.repeats}) | RSS before "
          "(torch imported) | RSS after | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        variants = {"no index cache (parse)": "off", "no index cache, json parser (msgspec's fallback)": STANDARD_JSON,
                    "cache, first load (parse + write)": cache, "cache, later loads": cache,
                    "pycocotools COCO() on the same file": PYCOCOTOOLS}
        for name, cache_dir in variants.items():
            runs = []
            for _ in range(1 if "first" in name else args.repeats):
                if "first" in name:
                    shutil.rmtree(cache, ignore_errors=True)
                runs.append(load_in_subprocess(root, cache_dir))
            mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            medians[cache_dir if cache_dir != cache else name] = mid["seconds"]
            print(f"| {name} | {mid['seconds']:.2f} | {mid['rss_before_mb']:.0f} MB | {mid['rss_after_mb']:.0f} MB | "
                  f"{max(r['peak_rss_mb'] for r in runs):.0f} MB |")
    print(f"\nuncached load / pycocotools COCO(): {medians['off'] / medians[PYCOCOTOOLS]:.2f} "
          f"(json parser: {medians[STANDARD_JSON] / medians[PYCOCOTOOLS]:.2f}; issue 21's goal: <= 0.5)")

    result = measure_workers(root, args.samples, args.workers, args.batch_size)
    print(f"\nTraining loader, {args.workers} workers, batch {args.batch_size}: {result['img_s']:.0f} img/s over "
          f"{result['samples']} samples")
    print("USS = private memory (smaps Private_Clean + Private_Dirty), less the shared-memory batches in flight")
    print("| worker | USS after first batch | USS after the samples | growth | batches in flight (not counted) |")
    print("|---|---:|---:|---:|---:|")
    for i, ((a, a_shm), (b, b_shm)) in enumerate(zip(result["uss_start"], result["uss_after"])):
        print(f"| {i} | {a - a_shm:.0f} MB | {b - b_shm:.0f} MB | {(b - b_shm) - (a - a_shm):+.0f} MB | "
              f"{a_shm:.0f} / {b_shm:.0f} MB |")


if __name__ == "__main__":
    main()
