"""``ssd300 train``: training, evaluation and benchmarks with the reference's flags (SPEC §7).

``--mode training`` (default) trains and evaluates at the ``--evaluation`` epochs,
``--mode evaluation`` evaluates ``--checkpoint``, ``--mode benchmark-training`` and
``--mode benchmark-inference`` report images/s. Launch under ``torchrun`` for several processes.
Every flag problem is reported in one line before any work starts.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssd300.errors import UserInputError

MODES = ("training", "evaluation", "benchmark-training", "benchmark-inference")
BACKBONE_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_EVALUATION = [21, 31, 37, 42, 48, 53, 59, 64]
DEFAULT_MULTISTEP = [43, 54]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", "-d", type=Path, default=None,
                      help="dataset folder: COCO 2017 layout (train2017/, val2017/, annotations/) or "
                           "train/, val/, annotations/instances_{train,val}.json")
    data.add_argument("--train-images", type=Path, help="training image folder (instead of --data)")
    data.add_argument("--train-annotations", type=Path, help="training COCO-format json (instead of --data)")
    data.add_argument("--val-images", type=Path, help="validation image folder (instead of --data)")
    data.add_argument("--val-annotations", type=Path, help="validation COCO-format json (instead of --data)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="data loading processes per rank (default: min(8, CPU count))")
    data.add_argument("--dali", action="store_true", help="use the DALI training pipeline (needs nvidia-dali)")
    data.add_argument("--strict-images", action="store_true",
                      help="stop at the first missing or undecodable image (default: log it, skip it, count it)")
    data.add_argument("--no-iou-crop", action="store_true",
                      help="train without the SSD random IoU crop (flip and colour only): learns faster "
                           "from few steps, generalises less; the reference always crops")

    run = parser.add_argument_group("run")
    run.add_argument("--mode", choices=MODES, default="training")
    run.add_argument("--epochs", "-e", type=int, default=65)
    run.add_argument("--batch-size", "--bs", type=int, default=32, help="images per process and step")
    run.add_argument("--eval-batch-size", "--ebs", type=int, default=32)
    run.add_argument("--seed", "-s", type=int, default=None, help="base seed (rank r uses seed + r); random if unset")
    run.add_argument("--checkpoint", type=Path, default=None,
                     help="resume from (our checkpoints) or start from (reference/weights-only) this file; "
                          "the model to evaluate/benchmark")
    run.add_argument("--save", type=Path, nargs="?", const=Path("./models"), default=None,
                     help="write epoch_<n>.pt checkpoints and logs here (bare --save: ./models)")
    run.add_argument("--evaluation", nargs="*", type=int, default=DEFAULT_EVALUATION,
                     help="epochs (0-based) after which to evaluate")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--no-cuda", action="store_true", help="same as --device cpu (reference flag)")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--learning-rate", "--lr", type=float, default=2.6e-3,
                        help="learning rate for a global batch of 32; scaled by world size x batch / 32")
    recipe.add_argument("--momentum", "-m", type=float, default=0.9)
    recipe.add_argument("--weight-decay", "--wd", type=float, default=5e-4)
    recipe.add_argument("--warmup", type=int, default=None, help="linear warmup iterations (published runs: 300)")
    recipe.add_argument("--multistep", nargs="*", type=int, default=DEFAULT_MULTISTEP,
                        help="epochs at which the learning rate is multiplied by 0.1")
    recipe.add_argument("--bn-recalibration", type=int, default=0, metavar="BATCHES",
                        help="before each evaluation, recompute BatchNorm statistics over this many training "
                             "batches (helps short runs; 0 = off, as the reference)")
    recipe.add_argument("--freeze-bn", action="store_true",
                        help="BatchNorm uses running statistics (small batches, fine-tuning)")

    model = parser.add_argument_group("model and precision")
    model.add_argument("--backbone", choices=BACKBONE_CHOICES, default=None, help="default resnet50")
    model.add_argument("--backbone-path", type=Path, default=None,
                       help="ImageNet weights for the backbone (torchvision state-dict file)")
    model.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="mixed precision: fp16 + gradient scaling on CUDA, bf16 on CPU (default on)")
    model.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--data-layout", choices=("channels_first", "channels_last"), default=None,
                       help="memory layout (default: channels_last on CUDA, channels_first on CPU where it is faster)")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark-iterations", type=int, default=20)
    bench.add_argument("--benchmark-warmup", type=int, default=20)

    log = parser.add_argument_group("logging")
    log.add_argument("--log-interval", type=int, default=20)
    log.add_argument("--json-summary", type=Path, default=None, help="write a JSON summary of the run here")
    log.add_argument("--log-file", type=Path, default=None,
                     help="JSON-lines log (default: <save>/log.jsonl when --save is given)")
    log.add_argument("--results", type=Path, default=None,
                     help="COCO results json of the last evaluation (default: <save>/results.json)")
    log.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log folder (needs tensorboard)")
    log.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")


# ----------------------------------------------------------------------------- validation


@dataclass
class DataPaths:
    train_images: Optional[Path] = None
    train_annotations: Optional[Path] = None
    val_images: Optional[Path] = None
    val_annotations: Optional[Path] = None


def validate_args(args: argparse.Namespace) -> None:
    """Flag combinations and values; raises a one-line UserInputError."""
    positive = {"--batch-size": args.batch_size, "--eval-batch-size": args.eval_batch_size,
                "--log-interval": args.log_interval, "--benchmark-iterations": args.benchmark_iterations}
    for flag, value in positive.items():
        if value < 1:
            raise UserInputError(f"{flag} must be >= 1, got {value}")
    if args.bn_recalibration < 0:
        raise UserInputError(f"--bn-recalibration must be >= 0, got {args.bn_recalibration}")
    if args.epochs < 0:
        raise UserInputError(f"--epochs must be >= 0, got {args.epochs}")
    if args.benchmark_warmup < 0:
        raise UserInputError(f"--benchmark-warmup must be >= 0, got {args.benchmark_warmup}")
    if not args.learning_rate > 0:
        raise UserInputError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not 0 <= args.momentum < 1:
        raise UserInputError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        raise UserInputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.warmup is not None and args.warmup < 0:
        raise UserInputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserInputError(f"--num-workers must be >= 0, got {args.num_workers}")
    if any(e < 0 for e in args.multistep) or any(e < 0 for e in args.evaluation):
        raise UserInputError("--multistep and --evaluation take epoch numbers >= 0")
    if args.mode in ("training", "benchmark-training") and args.batch_size < 2 and not args.freeze_bn:
        raise UserInputError("--batch-size 1: BatchNorm needs at least 2 images per process to train "
                             "(use a larger batch, or --freeze-bn)")
    if args.no_cuda and args.device not in (None, "cpu"):
        raise UserInputError(f"--no-cuda contradicts --device {args.device}")
    if args.mode == "evaluation" and args.checkpoint is None:
        raise UserInputError("--mode evaluation needs --checkpoint (the model to evaluate)")
    if args.dali and args.no_iou_crop:
        raise UserInputError("--no-iou-crop applies to the PyTorch loader; the DALI pipeline always crops")
    if args.dali and args.mode not in ("training", "benchmark-training"):
        raise UserInputError(f"--dali is a training loader; it does nothing with --mode {args.mode}")
    if args.dali:
        from ssd300.data.dali import dali_available

        if not dali_available():
            raise UserInputError("--dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")
    for flag, path in (("--checkpoint", args.checkpoint), ("--backbone-path", args.backbone_path)):
        if path is not None and not Path(path).is_file():
            raise UserInputError(f"{flag} {path}: file not found")
    if args.save is not None and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UserInputError(f"--save {args.save}: exists and is not a folder")


def resolve_data(args: argparse.Namespace, *, need_train: bool, need_val: bool) -> DataPaths:
    """``--data`` folder or the explicit ``--train-*``/``--val-*`` paths (not both)."""
    explicit = {"--train-images": args.train_images, "--train-annotations": args.train_annotations,
                "--val-images": args.val_images, "--val-annotations": args.val_annotations}
    given = [flag for flag, value in explicit.items() if value is not None]
    if args.data is not None and given:
        raise UserInputError(f"--data and {given[0]} contradict each other: give a dataset folder or explicit paths")
    paths = DataPaths()
    if args.data is not None:
        from ssd300.data.coco import resolve_split

        if need_train:
            paths.train_images, paths.train_annotations = resolve_split(args.data, "train")
        if need_val:
            paths.val_images, paths.val_annotations = resolve_split(args.data, "val")
        return paths
    for split, needed in (("train", need_train), ("val", need_val)):
        images, annotations = explicit[f"--{split}-images"], explicit[f"--{split}-annotations"]
        if (images is None) != (annotations is None):
            missing = f"--{split}-annotations" if annotations is None else f"--{split}-images"
            raise UserInputError(f"{missing} is missing (--{split}-images and --{split}-annotations go together)")
        if needed and images is None:
            raise UserInputError(f"no {split} data: give --data FOLDER or --{split}-images and --{split}-annotations")
        if images is not None:
            if not Path(images).is_dir():
                raise UserInputError(f"--{split}-images {images}: folder not found")
            if not Path(annotations).is_file():
                raise UserInputError(f"--{split}-annotations {annotations}: file not found")
            setattr(paths, f"{split}_images", Path(images))
            setattr(paths, f"{split}_annotations", Path(annotations))
    return paths


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    """What a run produced (used by ``demo`` and tests)."""

    mode: str
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    benchmark: dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    trainer: Any = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def last_metrics(self) -> dict[str, Any]:
        return self.evaluations[-1] if self.evaluations else {}


def run(args: argparse.Namespace) -> int:
    execute(args)
    return 0


def execute(args: argparse.Namespace) -> RunResult:
    """Validate, build and run; returns what was produced. All ranks call this under torchrun."""
    validate_args(args)
    need_train = args.mode in ("training", "benchmark-training")
    need_val = args.mode in ("evaluation", "benchmark-inference") or (
        args.mode == "training" and any(e < args.epochs for e in args.evaluation))
    paths = resolve_data(args, need_train=need_train, need_val=need_val)

    import torch

    from ssd300.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu" if args.no_cuda else args.device)
    try:
        return _execute(args, paths, ctx)
    finally:
        shutdown_distributed()


def _execute(args: argparse.Namespace, paths: DataPaths, ctx: Any) -> RunResult:
    import torch
    from torch import nn

    from ssd300.box_coder import BoxCoder
    from ssd300.checkpoint import load_checkpoint, load_model_weights
    from ssd300.coco_eval import load_coco_ground_truth
    from ssd300.data.coco import CocoDetection
    from ssd300.data.loaders import build_eval_loader, build_train_loader
    from ssd300.default_boxes import default_boxes_300
    from ssd300.distributed import broadcast_object, seed_everything
    from ssd300.engine import Precision, Trainer, benchmark_inference, benchmark_training, configure_backends, \
        default_channels_last, evaluate
    from ssd300.labels import LabelMap
    from ssd300.logging_utils import RunLogger, write_json
    from ssd300.model import SSD300
    from ssd300.optim import WarmupMultiStepSchedule, build_optimizer, scaled_learning_rate

    checkpoint = load_checkpoint(args.checkpoint, map_location="cpu") if args.checkpoint is not None else None
    stored_args = checkpoint.get("args", {}) if checkpoint is not None else {}
    seed = args.seed if args.seed is not None else stored_args.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
    seed = int(broadcast_object(seed))  # every rank needs the same base seed for the data order
    seed_everything(seed, ctx.rank)
    configure_backends(ctx.device, args.allow_tf32)
    precision = Precision.for_device(ctx.device, args.amp)
    if args.data_layout is None:
        channels_last = default_channels_last(ctx.device)
    else:
        channels_last = args.data_layout == "channels_last"
    layout = "channels_last" if channels_last else "channels_first"
    workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)

    save_dir = Path(args.save) if args.save is not None else None
    log_file = args.log_file or (save_dir / "log.jsonl" if save_dir is not None else None)
    logger = RunLogger(enabled=ctx.is_main, jsonl_path=log_file, tensorboard_dir=args.tensorboard,
                       log_interval=args.log_interval, progress=args.progress)

    # Label map: the checkpoint's when it has one (evaluation must map to its classes), else the data's.
    label_map: Optional[LabelMap] = None
    if checkpoint is not None and checkpoint.get("label_map"):
        from ssd300.checkpoint import infer_architecture, model_state_dict

        _, ckpt_classes = infer_architecture(model_state_dict(checkpoint), f"checkpoint {args.checkpoint}")
        try:
            label_map = LabelMap.from_checkpoint(checkpoint, num_classes=ckpt_classes)
        except ValueError as err:
            raise UserInputError(f"checkpoint {args.checkpoint}: {err}") from None
    train_set = val_set = None
    if paths.train_annotations is not None:
        from ssd300.data.transforms import TrainTransform

        train_set = CocoDetection(paths.train_images, paths.train_annotations, train=True, seed=seed,
                                  strict=args.strict_images, transform=TrainTransform(crop=not args.no_iou_crop))
        if label_map is not None and label_map.category_ids != train_set.label_map.category_ids:
            raise UserInputError(
                f"checkpoint {args.checkpoint} was trained on {label_map.num_classes - 1} classes with other "
                f"category ids than {paths.train_annotations} ({train_set.label_map.num_classes - 1} classes)")
        label_map = train_set.label_map
    if paths.val_annotations is not None:
        val_set = CocoDetection(paths.val_images, paths.val_annotations, train=False, label_map=label_map,
                                strict=args.strict_images)
        label_map = label_map or val_set.label_map
    assert label_map is not None

    backbone = args.backbone or stored_args.get("backbone") or (
        checkpoint.get("backbone") if checkpoint is not None else None) or "resnet50"
    if checkpoint is not None and args.backbone is None:
        from ssd300.checkpoint import infer_architecture, model_state_dict

        backbone = infer_architecture(model_state_dict(checkpoint), f"checkpoint {args.checkpoint}")[0]
    model = SSD300(backbone, num_classes=label_map.num_classes,
                   backbone_path=args.backbone_path if checkpoint is None else None)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)  # one-line error when it does not fit
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    run_args = {k: v for k, v in vars(args).items()}
    run_args.update(seed=seed, backbone=backbone)
    logger.info(f"ssd300 {args.mode}: {backbone}, {label_map.num_classes - 1} classes, device {ctx.device}"
                f" x {ctx.world_size}, {precision.name}, {layout}, seed {seed}")
    if args.amp and precision.dtype is None:
        logger.info("--amp: this CPU has no native bf16 (emulated bf16 is ~10x slower), so training runs in fp32")
    result = RunResult(mode=args.mode)

    def make_eval_loader() -> Any:
        return build_eval_loader(val_set, args.eval_batch_size, num_workers=workers, rank=ctx.rank,
                                 world_size=ctx.world_size)

    coco_gt = load_coco_ground_truth(paths.val_annotations) if (val_set is not None and ctx.is_main) else None
    results_path = args.results or (save_dir / "results.json" if save_dir is not None else None)

    def run_evaluation(epoch: int, iteration: int, train_loader: Any = None) -> dict[str, Any]:
        start = time.perf_counter()
        if train_loader is not None and args.bn_recalibration > 0:
            recalibrate(model, train_loader)
        metrics = evaluate(model, make_eval_loader(), coco_gt, label_map, ctx=ctx, precision=precision,
                           channels_last=channels_last, results_path=results_path, log=logger.info)
        seconds = time.perf_counter() - start
        logger.info(metrics.summary)
        logger.info(f"epoch {epoch + 1}: AP {metrics.ap:.4f}  AP50 {metrics.ap50:.4f}  ({seconds:.1f} s, "
                    f"{metrics.num_images} images)")
        logger.evaluation(epoch=epoch, iteration=iteration, metrics=metrics.as_dict(), seconds=seconds)
        entry = {"epoch": epoch, "iteration": iteration, **metrics.as_dict()}
        result.evaluations.append(entry)
        return entry

    def recalibrate(model: Any, train_loader: Any) -> None:
        from itertools import islice

        from ssd300.engine import recalibrate_batchnorm, unwrap

        inner = unwrap(model)
        used = recalibrate_batchnorm(inner, islice(iter(train_loader), args.bn_recalibration), ctx.device,
                                     channels_last)
        if ctx.distributed:  # one set of statistics for every rank: rank 0's
            for buffer in inner.buffers():
                torch.distributed.broadcast(buffer, 0)
        logger.info(f"BatchNorm statistics recomputed over {used} training batches")

    try:
        if args.mode == "evaluation":
            run_evaluation(int(checkpoint.get("epoch", 0)) - 1 if checkpoint else -1,
                           int(checkpoint.get("iteration", 0)) if checkpoint else 0)
        elif args.mode == "benchmark-inference":
            loader = make_eval_loader()
            result.benchmark = benchmark_inference(model, loader, ctx=ctx, precision=precision,
                                                   warmup=args.benchmark_warmup,
                                                   iterations=args.benchmark_iterations,
                                                   channels_last=channels_last)
            logger.info(_format_benchmark("inference", result.benchmark))
        else:
            if ctx.distributed:
                model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            lr = scaled_learning_rate(args.learning_rate, ctx.world_size, args.batch_size)
            optimizer = build_optimizer(model, lr, args.momentum, args.weight_decay)
            schedule = WarmupMultiStepSchedule(lr, args.warmup or 0, args.multistep)
            trainer = Trainer(model=model, optimizer=optimizer, schedule=schedule,
                              box_coder=BoxCoder(default_boxes_300().to(ctx.device)), precision=precision,
                              ctx=ctx, label_map=label_map, logger=logger, channels_last=channels_last,
                              frozen_batchnorm=args.freeze_bn, save_dir=save_dir, run_args=run_args)
            result.trainer = trainer
            if checkpoint is not None and args.mode == "training":
                if trainer.load_training_state(checkpoint):
                    logger.info(f"resumed from {args.checkpoint}: epoch {trainer.position.epoch + 1}, "
                                f"iteration {trainer.position.iteration}")
                else:
                    logger.info(f"starting from the weights of {args.checkpoint} (no optimizer state: fine-tuning)")
            if args.dali:
                from ssd300.data.dali import build_dali_train_loader

                train_loader = build_dali_train_loader(
                    train_set, args.batch_size, num_threads=workers, seed=seed, rank=ctx.rank,
                    world_size=ctx.world_size, device_id=ctx.device.index if ctx.device.type == "cuda" else None)
            else:
                train_loader = build_train_loader(train_set, args.batch_size, num_workers=workers, seed=seed,
                                                  rank=ctx.rank, world_size=ctx.world_size)
            if len(train_loader) == 0:
                raise UserInputError(f"{paths.train_annotations}: {len(train_set)} training images are fewer than "
                                     f"--batch-size {args.batch_size} x {ctx.world_size} processes")
            logger.info(f"{len(train_set)} training images, {len(train_loader)} iterations per epoch, "
                        f"learning rate {lr:.4g} (= {args.learning_rate:g} x {ctx.world_size} x "
                        f"{args.batch_size}/32)")
            if args.mode == "benchmark-training":
                result.benchmark = benchmark_training(trainer, train_loader, warmup=args.benchmark_warmup,
                                                      iterations=args.benchmark_iterations)
                logger.info(_format_benchmark("training", result.benchmark))
            else:
                if save_dir is None:
                    logger.info("no --save folder: checkpoints will not be written")
                _train(trainer, train_loader, args.epochs, args.evaluation,
                       lambda epoch, iteration: run_evaluation(epoch, iteration, train_loader), result)
            result.loss_history = trainer.loss_history
    finally:
        logger.close()

    result.summary = {"mode": args.mode, "seed": seed, "backbone": backbone, "world_size": ctx.world_size,
                      "precision": precision.name, "evaluations": result.evaluations, **result.benchmark}
    if result.loss_history:
        result.summary["final_loss"] = result.loss_history[-1][1]
        result.summary["iterations"] = result.loss_history[-1][0]
    if result.evaluations:
        result.summary.update(AP=result.last_metrics["AP"], AP50=result.last_metrics["AP50"])
    if args.json_summary is not None and ctx.is_main:
        write_json(args.json_summary, result.summary)
    return result


def _train(trainer: Any, loader: Any, epochs: int, evaluation_epochs: list[int], run_evaluation: Any,
           result: RunResult) -> None:
    from ssd300.engine import StopFlag

    with StopFlag() as stop:
        while trainer.position.epoch < epochs:
            epoch = trainer.position.epoch
            trainer.train_epoch(loader, epochs, stop)
            # Evaluate before saving: --bn-recalibration changes the BatchNorm statistics, and the
            # checkpoint should hold the model that was evaluated.
            if epoch in evaluation_epochs:
                run_evaluation(epoch, trainer.position.iteration)
            path = trainer.save(f"epoch_{epoch}.pt")
            if path is not None:
                result.checkpoint = path
                trainer.logger.info(f"checkpoint: {path}")


def _format_benchmark(kind: str, figures: dict[str, float]) -> str:
    parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
    return f"benchmark-{kind}: " + ", ".join(parts)
