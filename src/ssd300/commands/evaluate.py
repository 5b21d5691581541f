"""``ssd300 evaluate``: COCO evaluation of a checkpoint (same as ``ssd300 train --mode evaluation``).

Its defaults are :class:`~ssd300.train_config.TrainConfig`'s, the one config of training and
evaluation; this module only turns flags into one. ``--out DIR`` is the config's ``save`` folder:
the log, results, metrics.json (with the per-class F1-best thresholds) and the evaluation's report
(``report.html`` and its figures, :mod:`ssd300.report`), after the run folder's evaluation-output
policy (:meth:`ssd300.run_folder.RunFolder.prepare_evaluation`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssd300.data.layouts import DATA_FORMATS
from ssd300.backbone import BACKBONES
from ssd300.coco_eval import EVAL_BACKENDS
from ssd300.files import check_output_path
from ssd300.run_folder import RunFolder
from ssd300.train_config import TrainConfig
from ssd300.voc_eval import METRICS
from ssd300.training import run as run_config

DEFAULTS = TrainConfig()  # the one source of every default below


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="our or the reference's training checkpoint (not an exported ONNX, pt2 or TorchScript "
                             "file); or a published name / http(s) URL (ssd300 weights)")
    parser.add_argument("--data", "-d", type=Path, default=DEFAULTS.data,
                        help="dataset folder (its val split is used)")
    parser.add_argument("--val-images", type=Path, default=DEFAULTS.val_images,
                        help="validation image folder (instead of --data)")
    parser.add_argument("--val-annotations", type=Path, default=DEFAULTS.val_annotations,
                        help="validation COCO json, VOC ImageSets/Main list or YOLO labels folder (instead of --data)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default=DEFAULTS.data_format,
                        help="the layout of --data (auto: detected; VOC difficult boxes are ignored regions)")
    parser.add_argument("--eval-batch-size", "--ebs", type=int, default=DEFAULTS.eval_batch_size)
    parser.add_argument("--eval-backend", choices=("auto", *EVAL_BACKENDS), default=DEFAULTS.eval_backend,
                        help="COCO evaluation library (auto: faster-coco-eval when installed, else pycocotools)")
    parser.add_argument("--metric", choices=METRICS, default=DEFAULTS.metric,
                        help="coco: AP@[.5:.95]; voc07 / voc12: VOC 11-point / all-point mAP at IoU 0.5, "
                             "difficult ignored")
    parser.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers)
    parser.add_argument("--strict-images", action="store_true", default=DEFAULTS.strict_images,
                        help="stop at the first missing or undecodable image (default: log it, skip it, count it), "
                             "as train's --strict-images")
    parser.add_argument("--device", default=DEFAULTS.device, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--backbone", choices=BACKBONES, default=DEFAULTS.backbone,
                        help="must match the checkpoint (default: read from it)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=DEFAULTS.amp)
    parser.add_argument("--data-layout", choices=("channels_first", "channels_last"), default=None,
                        help="memory layout (default: the runtime policy; see ssd300.runtime)")
    parser.add_argument("--results", type=Path, default=DEFAULTS.results, help="write the COCO results json here")
    parser.add_argument("--json-summary", type=Path, default=DEFAULTS.json_summary,
                        help="write AP, AP50, ... as JSON here")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the evaluation's files here: report.html (summary, per-class table, confusion "
                             "matrix, P/R/F1 vs score threshold, worst images) and its figures, metrics.json, "
                             "results.json, log.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation's files in --out")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    layout = None if args.data_layout is None else args.data_layout == "channels_last"
    return TrainConfig(
        mode="evaluation", checkpoint=args.checkpoint, data=args.data, data_format=args.data_format,
        val_images=args.val_images,
        val_annotations=args.val_annotations, eval_batch_size=args.eval_batch_size, eval_backend=args.eval_backend,
        metric=args.metric, num_workers=args.num_workers, strict_images=args.strict_images, device=args.device,
        backbone=args.backbone, amp=args.amp, channels_last=layout, results=args.results,
        json_summary=args.json_summary, save=args.out)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.out is not None:  # checked before the model and the data are read
        check_output_path(args.out, "out", folder=True)
        RunFolder(args.out).prepare_evaluation(overwrite=args.overwrite)
    run_config(config)
    return 0
