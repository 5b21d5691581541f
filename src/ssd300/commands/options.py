"""Flag groups shared by several commands (their defaults come from the library's configs), and
the one table from the library's argument/field names to the CLI's flags."""

from __future__ import annotations

import argparse
import re
from typing import Mapping, Optional, Sequence

from ssd300.errors import UserInputError

from ssd300.postprocess import PostprocessConfig


BEST = "best"  # --score-threshold best: the checkpoint's per-class F1-best thresholds (ssd300.diagnostics)


def _score_threshold_or_best(text: str) -> float | str:
    return BEST if text == BEST else float(text)


def add_postprocess_arguments(parser: argparse.ArgumentParser, defaults: PostprocessConfig = PostprocessConfig(),
                              baked: bool = False, best: bool = False) -> None:
    """``--score-threshold``, ``--iou-threshold``, ``--topk-per-class``, ``--max-detections``;
    ``best``: ``--score-threshold`` also takes ``best`` (the command applies it)."""
    what = "baked-in " if baked else ""
    also = (f"; {BEST}: each class's F1-best threshold stored with the checkpoint's evaluation, applied after "
            "post-processing") if best else ""
    parser.add_argument("--score-threshold", type=_score_threshold_or_best if best else float,
                        default=defaults.score_threshold,
                        help=f"{what}keep class scores above this (default {defaults.score_threshold}){also}")
    parser.add_argument("--iou-threshold", type=float, default=defaults.iou_threshold,
                        help=f"{what}NMS IoU threshold (default {defaults.iou_threshold})")
    parser.add_argument("--topk-per-class", type=int, default=defaults.topk_per_class,
                        help=f"{what}best candidates per class entering NMS (default {defaults.topk_per_class})")
    parser.add_argument("--max-detections", type=int, default=defaults.max_detections,
                        help=f"{what}detections kept per image (default {defaults.max_detections})")


def postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    """The validated config of the flags added by :func:`add_postprocess_arguments`."""
    score = PostprocessConfig.score_threshold if args.score_threshold == BEST else args.score_threshold
    return PostprocessConfig(score_threshold=score, iou_threshold=args.iou_threshold,
                             topk_per_class=args.topk_per_class, max_detections=args.max_detections)


# Library names whose flag is not ``--`` + the name with dashes. Everything else maps by rule.
FLAG_OF_FIELD: dict[str, str] = {
    "iou_crop": "--no-iou-crop",
    "channels_last": "--data-layout",
    "fmt": "--format",  # ssd300.export.export_model's argument
    "num_classes": "--classes",     # ssd300 synth / demo
    "out_dir": "--out",
    "num_train": "--train",         # ssd300 synth's image counts
    "num_val": "--val",
}


def flag_of(field: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """A library argument or config field as its command-line flag: ``batch_size`` -> ``--batch-size``.

    ``overrides``: one command's own spellings (a command module's ``FIELD_FLAGS``, e.g. demo's
    ``num_train`` is ``--num-train-images`` where synth's is ``--train``), checked first."""
    if overrides and field in overrides:
        return overrides[field]
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def cli_message(error: UserInputError, overrides: Optional[Mapping[str, str]] = None) -> str:
    """The error's message as the CLI shows it: each field it names (``error.fields``) written
    as its flag, at its first whole-word occurrence."""
    return with_flags(str(error), error.fields, overrides)


def with_flags(message: str, fields: Sequence[str], overrides: Optional[Mapping[str, str]] = None) -> str:
    """``message`` with each of ``fields`` written as its flag at its first whole-word occurrence
    (also for messages that are not a UserInputError's, e.g. an interrupted training's)."""
    for field in fields:
        message = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", flag_of(field, overrides), message, count=1)
    return message
