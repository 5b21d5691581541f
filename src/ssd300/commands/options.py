"""Flag groups shared by several commands; their defaults come from the library's configs."""

from __future__ import annotations

import argparse

from ssd300.postprocess import PostprocessConfig


def add_postprocess_arguments(parser: argparse.ArgumentParser, defaults: PostprocessConfig = PostprocessConfig(),
                              baked: bool = False) -> None:
    """``--score-threshold``, ``--iou-threshold``, ``--topk-per-class``, ``--max-detections``."""
    what = "baked-in " if baked else ""
    parser.add_argument("--score-threshold", type=float, default=defaults.score_threshold,
                        help=f"{what}keep class scores above this (default {defaults.score_threshold})")
    parser.add_argument("--iou-threshold", type=float, default=defaults.iou_threshold,
                        help=f"{what}NMS IoU threshold (default {defaults.iou_threshold})")
    parser.add_argument("--topk-per-class", type=int, default=defaults.topk_per_class,
                        help=f"{what}best candidates per class entering NMS (default {defaults.topk_per_class})")
    parser.add_argument("--max-detections", type=int, default=defaults.max_detections,
                        help=f"{what}detections kept per image (default {defaults.max_detections})")


def postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    """The validated config of the flags added by :func:`add_postprocess_arguments`."""
    return PostprocessConfig(score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                             topk_per_class=args.topk_per_class, max_detections=args.max_detections)
