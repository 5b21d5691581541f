"""Training-data throughput: 640x480 JPEG -> augmented 300x300 samples (SPEC §6 augmentation).

Compares in one run: our pipeline (one process, and a DataLoader with 2 workers), a plain
per-sample PIL + torchvision-transforms implementation of the same augmentation (the baseline,
also one process and 2 workers), and DALI's CPU pipeline (2 threads) fed two ways: by our
Python ``external_source`` (what ``--dali`` uses) and by DALI's own ``fn.readers.coco`` (the
reference's reader; same augmentation graph, no per-image Python). Images/s are medians over
repeats after a warm-up. Box encoding is *excluded* from every figure (it runs batched on the
training device in our design); its cost on the CPU is printed separately.

    .venv/bin/python benchmarks/bench_data.py [--images 256] [--repeats 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_train_loader
from ssd300.data.transforms import MEAN, STD, sample_iou_crop, crop_boxes, flip_boxes

from common import PHOTOS, interleaved, photo_crop, photos, time_call


def make_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """640x480 JPEGs cut from scikit-image's photographs (real JPEG statistics), 2-6 boxes each."""
    sources = photos(PHOTOS + ("hubble_deep_field", "immunohistochemistry", "retina"))
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(count):
        image = photo_crop(sources[i % len(sources)], rng, zoom=(1.3, 2.0))  # draws from rng before the boxes
        name = f"{i:06d}.jpg"
        image.save(root / "train" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        for _ in range(int(rng.integers(2, 7))):
            w, h = rng.uniform(40, 400), rng.uniform(40, 300)
            bx, by = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [bx, by, w, h], "area": w * h, "iscrowd": 0})
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return root


class BaselineDataset(torch.utils.data.Dataset):
    """The plain way: full-resolution PIL decode, crop, torchvision Resize/ColorJitter/ToTensor/
    Normalize per sample (the reference's PyTorch data path), same crop sampler and parameters."""

    def __init__(self, dataset: CocoDetection, seed: int = 0) -> None:
        import torchvision.transforms as T

        self.dataset = dataset
        self.seed = seed
        self.resize = T.Resize((300, 300))
        self.jitter = T.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        record = self.dataset.records[index]
        rng = np.random.default_rng((self.seed, index))
        image = Image.open(self.dataset.path_of(index)).convert("RGB")
        boxes = record.boxes / np.array([record.width, record.height] * 2, dtype=np.float32)
        decision = sample_iou_crop(boxes.astype(np.float64), rng)
        l, t, r, b = decision.crop
        image = image.crop((l * image.width, t * image.height, r * image.width, b * image.height))
        boxes = crop_boxes(boxes[decision.keep], decision.crop)
        image = self.resize(image)
        image = self.jitter(image)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = flip_boxes(boxes)
        labels = torch.from_numpy(record.labels[decision.keep])
        return self.to_tensor(image), torch.from_numpy(boxes.astype(np.float32)), labels


def baseline_collate(samples):
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples], [s[2] for s in samples]


def time_single(getter, count: int) -> tuple[float, float]:
    """(images/s wall clock, CPU ms per image of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        getter(i)
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1000


def time_loader(loader, finish) -> float:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        finish(batch)
        n += batch[0].shape[0] if isinstance(batch, tuple) else len(batch)
    return n / (time.perf_counter() - start)


def _dali_coco_reader_pipeline(root: Path, batch_size: int, threads: int):
    """The same augmentation graph fed by DALI's COCO reader (shard 0 of 1, shuffled)."""
    import nvidia.dali as dali

    from ssd300.data.dali import ssd_augmentation

    pipe = dali.Pipeline(batch_size=batch_size, num_threads=threads, device_id=None, seed=0, exec_dynamic=True)
    with pipe:
        files, boxes, labels = dali.fn.readers.coco(
            file_root=str(root / "train"), annotations_file=str(root / "annotations" / "instances_train.json"),
            ltrb=True, ratio=True, skip_empty=True, include_iscrowd=False, size_threshold=1.0,
            shard_id=0, num_shards=1, random_shuffle=True, name="reader")
        images, boxes, labels = ssd_augmentation(files, boxes, labels, gpu=False)
        pipe.set_outputs(images, boxes, labels)
    pipe.build()
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-dali", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[str, float, float | None, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp), args.images)
        ours = CocoDetection.from_root(root, "train", seed=0)
        baseline = BaselineDataset(ours)
        n = len(ours)

        singles = interleaved({"base": lambda: time_single(baseline.__getitem__, n),
                               "ours": lambda: time_single(lambda i: ours[(i, 0)], n)}, args.repeats)
        base_single = statistics.median(r[0] for r in singles["base"])
        ours_single = statistics.median(r[0] for r in singles["ours"])
        base_cpu = statistics.median(r[1] for r in singles["base"])
        ours_cpu = statistics.median(r[1] for r in singles["ours"])

        base_loader = torch.utils.data.DataLoader(baseline, batch_size=args.batch_size, shuffle=True,
                                                  num_workers=args.workers, collate_fn=baseline_collate,
                                                  persistent_workers=True, drop_last=True)
        loader = build_train_loader(ours, args.batch_size, num_workers=args.workers, seed=0, persistent_workers=True)
        epochs = iter(range(1000))

        def ours_epoch() -> float:
            loader.set_epoch(next(epochs))
            return time_loader(loader, lambda b: b.to("cpu"))  # includes normalising to float32

        contenders = {"base": lambda: time_loader(base_loader, lambda b: None), "ours": ours_epoch}
        dali_loader = None
        if not args.no_dali:
            from ssd300.data.dali import build_dali_train_loader, dali_available
            if dali_available():
                dali_loader = build_dali_train_loader(ours, args.batch_size, num_threads=args.workers, seed=0)
                dali_epochs = iter(range(1000))

                def dali_run() -> float:
                    dali_loader.set_epoch(next(dali_epochs))
                    return time_loader(dali_loader, lambda b: b.to("cpu"))
                contenders["dali"] = dali_run
                coco_reader = _dali_coco_reader_pipeline(root, args.batch_size, args.workers)
                per_epoch = len(ours) // args.batch_size

                def dali_reader_run() -> float:
                    start = time.perf_counter()
                    for _ in range(per_epoch):
                        images, *_ = coco_reader.run()
                        torch.from_numpy(np.array(images.as_array()))  # same hand-over as our loader
                    return per_epoch * args.batch_size / (time.perf_counter() - start)
                contenders["dali_reader"] = dali_reader_run
        for run in contenders.values():
            run()  # warm-up: start workers, build the pipeline
        loaded = {k: statistics.median(v) for k, v in interleaved(contenders, args.repeats).items()}
        base_loader = loader = None  # drop them: their worker processes stop before the next runs

        rows += [("baseline PIL + torchvision, 1 process", base_single, base_cpu, None),
                 ("ours, 1 process", ours_single, ours_cpu, ours_single / base_single),
                 (f"baseline PIL + torchvision, DataLoader {args.workers} workers", loaded["base"], None, None),
                 (f"ours, DataLoader {args.workers} workers", loaded["ours"], None, loaded["ours"] / loaded["base"])]
        if "dali" in loaded:
            rows.append((f"DALI CPU pipeline, {args.workers} threads (our external_source)", loaded["dali"], None,
                         loaded["dali"] / loaded["base"]))
            rows.append((f"DALI CPU pipeline, {args.workers} threads (fn.readers.coco)", loaded["dali_reader"], None,
                         loaded["dali_reader"] / loaded["base"]))
        elif not args.no_dali:
            rows.append(("DALI CPU pipeline (not importable here)", float("nan"), None, None))

        encode_ms = None
        try:
            from ssd300.box_coder import BoxCoder
            from ssd300.default_boxes import default_boxes_300
            coder = BoxCoder(default_boxes_300())
            batch = next(iter(build_train_loader(ours, args.batch_size, num_workers=0, seed=0)))
            encode_ms = time_call(lambda: coder.encode(batch.boxes, batch.labels, batch.num_boxes), 5).median * 1000
        except ImportError:
            pass

    print(f"\n{args.images} JPEGs 640x480 -> 300x300 training samples (crop, flip, colour, resize, "
          f"normalise; encoding excluded), batch {args.batch_size}, median of {args.repeats}\n")
    print("| pipeline | images/s | CPU ms/image | vs baseline (same mode) |")
    print("|---|---:|---:|---:|")
    for name, rate, cpu, ratio in rows:
        cpu_text = "" if cpu is None else f"{cpu:.1f}"
        ratio_text = "" if ratio is None else f"{ratio:.2f}x"
        print(f"| {name} | {rate:.0f} | {cpu_text} | {ratio_text} |")
    if encode_ms is not None:
        print(f"\nBoxCoder.encode of one {args.batch_size}-image batch on the CPU (1 thread): {encode_ms:.1f} ms "
              f"({args.batch_size / encode_ms * 1000:.0f} images/s if it were done on the CPU)")


if __name__ == "__main__":
    main()
