"""``ssd300 train``: training, evaluation and benchmarks with the reference's flags (SPEC §7).

``--mode training`` (default) trains and evaluates at the ``--evaluation`` epochs,
``--mode evaluation`` evaluates ``--checkpoint``, ``--mode benchmark-training`` and
``--mode benchmark-inference`` report images/s. Launch under ``torchrun`` for several processes.
Every flag problem is reported in one line before any work starts. The work is
:func:`ssd300.training.run`; this module only turns flags into a :class:`~ssd300.train_config.TrainConfig`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssd300.backbone import BACKBONES
from ssd300.coco_eval import EVAL_BACKENDS
from ssd300.commands.options import with_flags
from ssd300.data.layouts import DATA_FORMATS
from ssd300.errors import UserInputError
from ssd300.optim import OPTIMIZERS, SCHEDULES
from ssd300.run_folder import (
    BEST,
    EPOCH_NAME_PATTERN,
    INTERRUPTED,
    LAST,
    LOG_NAME,
    METRICS_NAME,
    RESULTS_NAME,
)
from ssd300.trainer import TrainingInterrupted
from ssd300.train_config import BACKBONE_WEIGHTS, MODES, TrainConfig
from ssd300.training import run as run_config
from ssd300.voc_eval import METRICS

DEFAULTS = TrainConfig()  # the one source of every default below
FIELD_FLAGS = {"freeze_backbone_epochs": "--freeze-backbone"}  # (ssd300.cli: cli_message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", "-d", type=Path, default=None,
                      help="dataset folder: COCO 2017 layout (train2017/, val2017/, annotations/), "
                           "train/, val/, annotations/instances_{train,val}.json, VOC or YOLO (README: Your data)")
    data.add_argument("--data-format", choices=DATA_FORMATS, default=DEFAULTS.data_format,
                      help="the layout of --data (auto: detected from its files)")
    data.add_argument("--keep-difficult", action="store_true",
                      help="train on VOC's difficult boxes too (default: left out; evaluation always ignores them)")
    data.add_argument("--train-images", type=Path, help="training image folder (instead of --data)")
    data.add_argument("--train-annotations", type=Path,
                      help="training COCO json, VOC ImageSets/Main list or YOLO labels folder (instead of --data)")
    data.add_argument("--val-images", type=Path, help="validation image folder (instead of --data)")
    data.add_argument("--val-annotations", type=Path,
                      help="validation COCO json, VOC ImageSets/Main list or YOLO labels folder (instead of --data)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="data loading processes per rank (default: min(8, CPU count))")
    data.add_argument("--dali", action="store_true", help="use the DALI training pipeline (needs nvidia-dali)")
    data.add_argument("--strict-images", action="store_true",
                      help="stop at the first missing or undecodable image (default: log it, skip it, count it)")
    data.add_argument("--no-iou-crop", action="store_true",
                      help="train without the SSD random IoU crop (flip and colour only): learns faster "
                           "from few steps, generalises less; the reference always crops")

    run = parser.add_argument_group("run")
    run.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    run.add_argument("--epochs", "-e", type=int, default=DEFAULTS.epochs)
    run.add_argument("--batch-size", "--bs", type=int, default=DEFAULTS.batch_size, help="images per process and step")
    run.add_argument("--eval-batch-size", "--ebs", type=int, default=DEFAULTS.eval_batch_size)
    run.add_argument("--eval-backend", choices=("auto", *EVAL_BACKENDS), default=DEFAULTS.eval_backend,
                     help="COCO evaluation library (auto: faster-coco-eval when installed, else pycocotools)")
    run.add_argument("--metric", choices=METRICS, default=DEFAULTS.metric,
                     help="coco: AP@[.5:.95]; voc07 / voc12: VOC 11-point / all-point mAP at IoU 0.5, "
                          "difficult ignored")
    run.add_argument("--seed", "-s", type=int, default=None, help="base seed (rank r uses seed + r); random if unset")
    run.add_argument("--checkpoint", default=None,
                     help="resume from (our checkpoints) or start from (reference/weights-only) this file; "
                          "the model to evaluate/benchmark; also a published name (nvidia-ssd300-coco, see "
                          "`ssd300 weights`) or an http(s) URL, downloaded once")
    run.add_argument("--save", type=Path, nargs="?", const=Path("./models"), default=None,
                     help=f"the run folder: {EPOCH_NAME_PATTERN}, {LAST}, {BEST}, {LOG_NAME} (bare --save: ./models); "
                          "one run per folder")
    run.add_argument("--resume", action="store_true",
                     help=f"continue the run in --save from its newest checkpoint ({LAST}); appends to its log")
    run.add_argument("--overwrite", "--exist-ok", action="store_true",
                     help="let a fresh run replace another run's files in --save (they are deleted first)")
    run.add_argument("--keep-last", type=int, default=DEFAULTS.keep_last, metavar="N",
                     help=f"keep only the N newest {EPOCH_NAME_PATTERN} ({LAST}, {BEST}, {INTERRUPTED} stay); 0: all")
    run.add_argument("--evaluation", nargs="*", type=int, default=list(DEFAULTS.evaluation),
                     help="epochs (0-based) after which to evaluate; the final epoch always is, unless "
                          "--evaluation is given with no epochs (and no --eval-every)")
    run.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, metavar="N",
                     help="also evaluate after every N-th epoch (0: off)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--no-cuda", action="store_true", help="same as --device cpu (reference flag)")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--learning-rate", "--lr", type=float, default=DEFAULTS.learning_rate,
                        help="learning rate for a global batch of 32; scaled by world size x batch / 32")
    recipe.add_argument("--momentum", "-m", type=float, default=DEFAULTS.momentum)
    recipe.add_argument("--weight-decay", "--wd", type=float, default=DEFAULTS.weight_decay)
    recipe.add_argument("--warmup", type=int, default=DEFAULTS.warmup,
                        help="linear warmup iterations (published runs: 300)")
    recipe.add_argument("--multistep", nargs="*", type=int, default=list(DEFAULTS.multistep),
                        help="epochs at which the learning rate is multiplied by 0.1")
    recipe.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer,
                        help="sgd: the reference's; adamw: converges in fewer steps on small data (--momentum is "
                             "its first beta)")
    recipe.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                        help="multistep: the reference's x0.1 drops at --multistep; cosine: decays to 0 over the run")
    recipe.add_argument("--bn-recalibration", type=int, default=DEFAULTS.bn_recalibration, metavar="BATCHES",
                        help="before each evaluation, recompute BatchNorm statistics over this many training "
                             "batches (helps short runs; 0 = off, as the reference)")
    recipe.add_argument("--freeze-bn", action="store_true",
                        help="BatchNorm uses running statistics (small batches, fine-tuning)")

    model = parser.add_argument_group("model and precision")
    model.add_argument("--backbone", choices=BACKBONES, default=None,
                       help="default: the checkpoint's, else resnet50")
    model.add_argument("--backbone-path", type=Path, default=None,
                       help="ImageNet weights for the backbone (torchvision state-dict file); wins over "
                            "--backbone-weights")
    model.add_argument("--backbone-weights", choices=BACKBONE_WEIGHTS, default=None,
                       help="imagenet: torchvision's ImageNet weights, downloaded once into torch's cache; none: "
                            "from scratch (default: imagenet, or $SSD300_BACKBONE_WEIGHTS)")
    model.add_argument("--init-from", default=None, metavar="CHECKPOINT_OR_NAME",
                       help="transfer learning: start a fresh run from this checkpoint (file, published name or URL) "
                            "trained on other classes; classes with the same name keep their classifier rows")
    model.add_argument("--freeze-backbone", type=int, default=DEFAULTS.freeze_backbone_epochs, metavar="N",
                       help="freeze the backbone (no gradients, BatchNorm statistics kept) for the first N epochs")
    model.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="mixed precision: fp16 + gradient scaling on CUDA, bf16 on a CPU with native bf16, "
                            "else fp32 (default on; see ssd300.runtime)")
    model.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--data-layout", choices=("channels_first", "channels_last"), default=None,
                       help="memory layout (default: channels_last, except fp32 training on a CPU; see ssd300.runtime)")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark-iterations", type=int, default=DEFAULTS.benchmark_iterations)
    bench.add_argument("--benchmark-warmup", type=int, default=DEFAULTS.benchmark_warmup)

    log = parser.add_argument_group("logging")
    log.add_argument("--log-interval", type=int, default=DEFAULTS.log_interval)
    log.add_argument("--json-summary", type=Path, default=None,
                     help=f"write a JSON summary of the run here (default: <save>/{METRICS_NAME})")
    log.add_argument("--log-file", type=Path, default=None,
                     help=f"JSON-lines log (default: <save>/{LOG_NAME} when --save is given)")
    log.add_argument("--results", type=Path, default=None,
                     help=f"COCO results json of the last evaluation (default: <save>/{RESULTS_NAME})")
    log.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log folder (needs tensorboard)")
    log.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags as a validated TrainConfig (flag-only checks here, the rest in TrainConfig)."""
    if args.no_cuda and args.device not in (None, "cpu"):
        raise UserInputError(f"--no-cuda contradicts --device {args.device}")
    layout = None if args.data_layout is None else args.data_layout == "channels_last"
    return TrainConfig(
        data=args.data, train_images=args.train_images, train_annotations=args.train_annotations,
        val_images=args.val_images, val_annotations=args.val_annotations, num_workers=args.num_workers,
        data_format=args.data_format, keep_difficult=args.keep_difficult,
        dali=args.dali, strict_images=args.strict_images, iou_crop=not args.no_iou_crop,
        mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        eval_backend=args.eval_backend, metric=args.metric,
        seed=args.seed, checkpoint=args.checkpoint, save=args.save, resume=args.resume, overwrite=args.overwrite,
        keep_last=args.keep_last, evaluation=tuple(args.evaluation), eval_every=args.eval_every,
        device="cpu" if args.no_cuda else args.device,
        learning_rate=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay,
        warmup=args.warmup if args.warmup is not None else 0, multistep=tuple(args.multistep),
        optimizer=args.optimizer, schedule=args.schedule,
        bn_recalibration=args.bn_recalibration, freeze_bn=args.freeze_bn,
        backbone=args.backbone, backbone_path=args.backbone_path, init_from=args.init_from,
        freeze_backbone_epochs=args.freeze_backbone,
        **({"backbone_weights": args.backbone_weights} if args.backbone_weights else {}),
        amp=args.amp, allow_tf32=args.allow_tf32,
        channels_last=layout, benchmark_iterations=args.benchmark_iterations,
        benchmark_warmup=args.benchmark_warmup, log_interval=args.log_interval, json_summary=args.json_summary,
        log_file=args.log_file, results=args.results, tensorboard=args.tensorboard, progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    try:
        run_config(config_from_args(args))
    except TrainingInterrupted as err:  # its message names config fields: write them as our flags
        raise TrainingInterrupted(with_flags(str(err), err.fields), err.signal_number) from None
    return 0
