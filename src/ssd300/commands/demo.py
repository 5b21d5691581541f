"""``ssd300 demo``: synthetic dataset -> train -> COCO evaluation -> curves and drawn predictions.

Sized to finish within 10 minutes on 2 AVX2-only CPU cores (fp32) and within 5 with native bf16,
while reaching a detector that works (AP50 >= 0.8 on its held-out images): a ResNet-18 SSD300
on a few hundred synthetic images of large shapes, trained with AdamW and a cosine decay (the
reference's SGD + multistep needs far more steps than 2,000 image presentations; BENCHMARKS.md
has the comparison), bf16 where the CPU has it natively, else fp32. Everything lands in ``--out``: the dataset, the run
folder's files (checkpoints, summary, log, curves; :mod:`ssd300.run_folder`) and ``predictions/*.jpg``.
Settings the demo does not choose are :class:`~ssd300.train_config.TrainConfig`'s defaults.
The demo never downloads: it starts from torchvision's ImageNet weights when they are already in
torch's cache (``ssd300 weights``), else from scratch, and says which.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ssd300.backbone import BACKBONES
from ssd300.optim import OPTIMIZERS, SCHEDULES
from ssd300.run_folder import RunFolder
from ssd300.train_config import TrainConfig
from ssd300.training import train

# Measured on a loaded 2-core CPU; see BENCHMARKS.md ("Training and evaluation").
DEMO_DEFAULTS: dict[str, Any] = dict(
    train_images=200, val_images=50, epochs=10, batch_size=4, lr=0.004, warmup=40,
    optimizer="adamw", schedule="cosine",
    classes=3, min_size=0.3, max_size=0.7, max_objects=3, random_color_prob=0.0, bn_recalibration=5,
)

# The synthetic generator's fields as demo's flags (synth spells them --train/--val).
FIELD_FLAGS = {"num_train": "--num-train-images", "num_val": "--num-val-images"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEMO_DEFAULTS
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous demo run (and a differing dataset) in --out")
    parser.add_argument("--num-train-images", type=int, default=d["train_images"], metavar="N",
                        help="synthetic training images to generate")
    parser.add_argument("--num-val-images", type=int, default=d["val_images"], metavar="N",
                        help="synthetic validation images to generate")
    # The old spellings, which read like train's --train-images FOLDER: still accepted (README documents
    # them), not shown.
    for old, new in (("--train-images", "num_train_images"), ("--val-images", "num_val_images")):
        parser.add_argument(old, type=int, dest=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            action=_Deprecated)
    parser.add_argument("--classes", type=int, default=d["classes"], help="shape classes in the synthetic data")
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument("--batch-size", "--bs", type=int, default=d["batch_size"])
    parser.add_argument("--learning-rate", "--lr", type=float, default=d["lr"],
                        help="rate for a batch of 32 (scaled by batch/32 as in the reference)")
    parser.add_argument("--warmup", type=int, default=d["warmup"])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                        help="adamw converges in the demo's few steps; sgd is the reference's")
    parser.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                        help="cosine: decays to 0 over the run; multistep: x0.1 after 3/4 of the epochs")
    parser.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iou-crop", action=argparse.BooleanOptionalAction, default=False,
                        help="the SSD random IoU crop (off by default: the demo's few steps learn faster without)")
    parser.add_argument("--bn-recalibration", type=int, default=DEMO_DEFAULTS["bn_recalibration"], metavar="BATCHES",
                        help="recompute BatchNorm statistics before each evaluation (short runs need it)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


class _Deprecated(argparse.Action):
    """A hidden old flag spelling: stores the value and says which flag replaces it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"ssd300 demo: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def run(args: argparse.Namespace) -> int:
    from ssd300.data.synth import generate_synthetic_dataset

    start = time.perf_counter()
    out: Path = args.out
    data_dir = generate_synthetic_dataset(out / "data", num_train=args.num_train_images, num_val=args.num_val_images,
                                          seed=args.seed, num_classes=args.classes, min_size=DEMO_DEFAULTS["min_size"],
                                          max_size=DEMO_DEFAULTS["max_size"],
                                          max_objects=DEMO_DEFAULTS["max_objects"],
                                          random_color_prob=DEMO_DEFAULTS["random_color_prob"],
                                          overwrite=args.overwrite)
    print(f"synthetic dataset: {data_dir} ({args.num_train_images} train / {args.num_val_images} val images, "
          f"{args.classes} classes) in {time.perf_counter() - start:.0f} s", flush=True)
    epochs = max(1, args.epochs)
    # Three evaluations for the mAP curve (each costs about as much as 1/4 epoch); the last one always.
    evaluation = sorted({min(1, epochs - 1), epochs // 2, epochs - 1})
    from ssd300.backbone import cached_imagenet_weights

    imagenet = cached_imagenet_weights(args.backbone)
    used = f"ImageNet ({imagenet})" if imagenet else "none, from scratch (ImageNet weights not cached: ssd300 weights)"
    print(f"backbone weights: {used}", flush=True)
    config = TrainConfig(
        data=data_dir, backbone=args.backbone, backbone_path=imagenet, backbone_weights="none",
        epochs=epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup=args.warmup, optimizer=args.optimizer, schedule=args.schedule,
        multistep=(int(epochs * 0.75),), evaluation=tuple(evaluation), save=out, seed=args.seed,
        device=args.device, num_workers=args.num_workers, amp=args.amp, log_interval=10,
        progress=args.progress, bn_recalibration=args.bn_recalibration, iou_crop=args.iou_crop,
        overwrite=args.overwrite,
    )
    result = train(config)  # the run folder gets the summary, log, curves and per-evaluation figures
    folder = RunFolder(out)
    drawn = draw_predictions(result.checkpoint, data_dir, out / "predictions", count=8)
    metrics = result.last_metrics
    elapsed = time.perf_counter() - start
    print(f"\ndemo finished in {elapsed / 60:.1f} min: AP {metrics.get('AP', 0):.3f}, "
          f"AP50 {metrics.get('AP50', 0):.3f} on {args.num_val_images} synthetic validation images")
    print(f"  checkpoint:  {result.checkpoint}\n  metrics:     {folder.metrics_file}\n"
          f"  curves:      {folder.curves_file}\n"
          f"  report:      {folder.report_file} (confusion matrix, P/R/F1 vs threshold, worst images; "
          f"open it in a browser)\n"
          f"  predictions: {drawn[0].parent if drawn else '-'} ({len(drawn)} images, each class drawn above "
          f"its F1-best score threshold)")
    return 0


def draw_predictions(checkpoint: Path | None, data_dir: Path, out_dir: Path, count: int = 8,
                     score_threshold: float = 0.3) -> list[Path]:
    """Run the trained checkpoint on the first validation images and draw its detections.

    Each class is drawn above the F1-best score threshold its last evaluation found (stored in the
    checkpoint, :func:`ssd300.diagnostics.best_thresholds_of`): one box per shape where the model is
    sure, rather than every candidate above one fixed score. A checkpoint without them (nothing
    matched yet) is drawn above ``score_threshold``.
    """
    if checkpoint is None:
        return []
    from ssd300.data.coco import resolve_split
    from ssd300.data.images import open_image
    from ssd300.inference import Detector
    from ssd300.visualize import draw_detection_result, save_image

    image_dir, _ = resolve_split(data_dir, "val")
    paths = sorted(image_dir.glob("*.jpg"))[:count]
    from ssd300.checkpoint import load_model
    from ssd300.diagnostics import best_thresholds_of

    model, label_map, saved = load_model(checkpoint)  # read once: the weights and the stored thresholds
    best = best_thresholds_of(saved)
    # fp32: drawing 8 images needs no speed
    detector = Detector(model, label_map, device="cpu", class_score_thresholds=best)
    floor = 0.0 if best else score_threshold
    written = []
    for path, result in zip(paths, detector(paths)):
        canvas = draw_detection_result(open_image(path).convert("RGB"), result, score_threshold=floor)
        target = out_dir / path.name
        save_image(canvas, target)
        written.append(target)
    return written
