"""``ssd300 synth``: write the built-in synthetic COCO-format dataset."""

from __future__ import annotations

import argparse
import time

from ssd300.data.synth import MAX_CLASSES, SynthConfig, generate_synthetic_dataset

_DEFAULTS = SynthConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (becomes --data for train/evaluate)")
    parser.add_argument("--train", type=int, default=2000,
                        help="number of training images, >= 0 (default 2000; 0 writes an empty train split: "
                             "the dataset is then for evaluate only)")
    parser.add_argument("--val", type=int, default=200,
                        help="number of validation images, >= 0 (default 200; 0 writes an empty val split: train "
                             "it with --evaluation and no epochs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same dataset")
    parser.add_argument("--classes", type=int, default=_DEFAULTS.num_classes,
                        help=f"number of shape classes, 1..{MAX_CLASSES} (default {_DEFAULTS.num_classes})")
    parser.add_argument("--min-objects", type=int, default=_DEFAULTS.min_objects, help="objects per image, at least")
    parser.add_argument("--max-objects", type=int, default=_DEFAULTS.max_objects, help="objects per image, at most")
    parser.add_argument("--min-size", type=float, default=_DEFAULTS.min_size,
                        help="smallest object, fraction of the image's shorter side")
    parser.add_argument("--max-size", type=float, default=_DEFAULTS.max_size,
                        help="largest object, fraction of the image's shorter side")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out (replacing its annotations/instances_{train,val}.json "
                             "and same-named images); a split identical to the requested one is kept either way")


def usage_hint(out: object, args: argparse.Namespace) -> str:
    """What the written dataset is good for: an empty split cannot be trained (train) or evaluated (val) on."""
    if args.train == 0 and args.val == 0:
        return "both splits are empty (no images to train or evaluate on)"
    if args.train == 0:
        return f"the train split is empty: evaluate with --data {out}"
    if args.val == 0:
        return f"the val split is empty: train with --data {out} --evaluation (no epochs: no evaluation)"
    return f"train with --data {out}"


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = generate_synthetic_dataset(
        args.out, args.train, args.val, args.seed, overwrite=args.overwrite,
        num_classes=args.classes, min_objects=args.min_objects, max_objects=args.max_objects,
        min_size=args.min_size, max_size=args.max_size)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.train} train + {args.val} val images to {out} in {elapsed:.1f} s; {usage_hint(out, args)}")
    return 0
