"""Transfer learning to other classes: fine-tuning from a model trained on other classes vs from scratch.

Pretrains a ResNet-18 SSD300 on synthetic dataset A (disc, rectangle, triangle), then fine-tunes on
dataset B (disc, cross, ring: one class shared with A, two new) for the same number of epochs twice,
from scratch and with ``init_from`` = A's model (``ssd300.transfer``: trunk, extra layers and box
heads kept, the ``disc`` classifier rows mapped, ``cross``/``ring`` new). Prints B's validation AP50
of both and the mean training loss of their first epoch. Both B runs see the same images in the same
order (same seed); no ImageNet weights (offline, and the comparison is about the detector).

    .venv/bin/python benchmarks/bench_transfer.py                       # the recorded sizes (CPU)
    .venv/bin/python benchmarks/bench_transfer.py --train 16 --val 8 --pretrain-epochs 1 --epochs 1  # smoke

Dataset B is synth's 5-shape dataset keeping the images whose objects are all disc, cross or ring
(the others are dropped, so no unlabelled shape remains), with categories renumbered 1..3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

SHARED_AND_NEW = ("disc", "cross", "ring")


def keep_categories(annotations: Path, names: Iterable[str], out: Path) -> tuple[Path, int]:
    """A copy of a COCO annotation file with only the images whose every object is of ``names``
    (categories renumbered 1..n in that order); returns (file, images kept)."""
    data = json.loads(annotations.read_text())
    wanted = list(names)
    by_id = {c["id"]: c["name"] for c in data["categories"]}
    new_id = {cid: wanted.index(name) + 1 for cid, name in by_id.items() if name in wanted}
    dropped = {a["image_id"] for a in data["annotations"] if a["category_id"] not in new_id}
    images = [im for im in data["images"] if im["id"] not in dropped]
    kept = {im["id"] for im in images}
    anns = [{**a, "category_id": new_id[a["category_id"]]} for a in data["annotations"] if a["image_id"] in kept]
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(wanted)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**data, "images": images, "annotations": anns, "categories": categories}))
    return out, len(images)


def make_datasets(root: Path, train: int, val: int, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """Dataset A (folder) and dataset B (explicit image folders + filtered annotation files)."""
    from ssd300.data.synth import generate_synthetic_dataset

    knobs: dict[str, Any] = dict(max_objects=2, min_size=0.3, max_size=0.7, random_color_prob=0.0)
    a = generate_synthetic_dataset(root / "a", train, val, seed=seed, num_classes=3, **knobs)
    # About half of synth-5's images with <= 2 objects are disc/cross/ring only: generate enough.
    full = generate_synthetic_dataset(root / "b_full", 3 * train, 3 * val, seed=seed + 1, num_classes=5, **knobs)
    b: dict[str, Path] = {}
    for split in ("train", "val"):
        ann, _ = keep_categories(full / "annotations" / f"instances_{split}.json", SHARED_AND_NEW,
                                 root / "b" / f"instances_{split}.json")
        b[f"{split}_images"], b[f"{split}_annotations"] = full / split, ann
    return a, b


def common_settings(batch_size: int, seed: int) -> dict[str, Any]:
    return dict(backbone="resnet18", backbone_weights="none", batch_size=batch_size, eval_batch_size=batch_size,
                learning_rate=0.05, warmup=0, iou_crop=False, seed=seed, num_workers=0, device="cpu", amp=False,
                progress=False, bn_recalibration=2)


def run_transfer(root: Path, *, train: int, val: int, pretrain_epochs: int, epochs: int, batch_size: int = 4,
                 seed: int = 0, evaluate: bool = True) -> dict[str, Any]:
    """Pretrain on A, fine-tune on B from scratch and from A's model; the figures of both (AP50 None
    without ``evaluate``)."""
    from ssd300.train_config import TrainConfig
    from ssd300.training import train as train_run

    a, b = make_datasets(root, train, val, seed)
    settings = common_settings(batch_size, seed)
    pre = train_run(TrainConfig(data=a, epochs=pretrain_epochs, evaluation=(), save=root / "pretrain",
                                multistep=(), **settings))
    assert pre.checkpoint is not None
    figures: dict[str, Any] = {}
    for name, init in (("scratch", None), ("from A", pre.checkpoint)):
        start = time.perf_counter()
        result = train_run(TrainConfig(**b, epochs=epochs, evaluation=(epochs - 1,) if evaluate else (),
                                       save=root / name.replace(" ", "_"), multistep=(), init_from=init, **settings))
        per_epoch = len(result.loss_history) // epochs
        figures[name] = {"AP50": result.last_metrics["AP50"] if evaluate else None,
                         "first_epoch_loss": statistics.fmean(v for _, v in result.loss_history[:per_epoch]),
                         "losses": [v for _, v in result.loss_history], "seconds": time.perf_counter() - start}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_transfer"))
    parser.add_argument("--train", type=int, default=200, help="synthetic training images per dataset")
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (both runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    figures = run_transfer(args.out, train=args.train, val=args.val, pretrain_epochs=args.pretrain_epochs,
                           epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    print(f"fine-tuning on disc/cross/ring for {args.epochs} epochs after {args.pretrain_epochs} on "
          f"disc/rectangle/triangle (ResNet-18, {args.train} images per dataset, batch {args.batch_size}):")
    for name, f in figures.items():
        print(f"  {name:<8} AP50 {f['AP50']:.3f}  first-epoch mean loss {f['first_epoch_loss']:.2f}  "
              f"({f['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
