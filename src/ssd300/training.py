"""Training as a library: a validated :class:`TrainConfig` and :func:`train` / :func:`evaluate`.

>>> from ssd300 import TrainConfig, train
>>> result = train(TrainConfig(data="runs/synth", backbone="resnet18", epochs=2, batch_size=8, save="runs/x"))
>>> result.last_metrics["AP50"], result.checkpoint

``ssd300 train`` / ``evaluate`` / ``demo`` only turn their flags into a :class:`TrainConfig`. The
defaults are the reference's (SPEC §6-7). ``mode`` selects what :func:`run` does: ``training``
(train, evaluating after the ``evaluation`` epochs, every ``eval_every`` epochs and the final
epoch), ``evaluation`` (COCO metrics of
``checkpoint``), ``benchmark-training`` / ``benchmark-inference`` (images/s). Under ``torchrun``
every process calls the same function with the same config.

Epochs are numbered from 0 everywhere, as in the reference: ``evaluation``/``multistep`` values,
``epoch_<n>.pt`` (written after epoch ``n``), the ``epoch`` of log records and console lines. A
checkpoint's ``epoch`` entry is the reference's: epochs completed, i.e. the epoch a resume starts.
The run folder (``save``) and its policies are :mod:`ssd300.run_folder`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ssd300.backbone import BACKBONES, TORCHVISION_IMAGENET_FILES
from ssd300.batchnorm import recalibrate_batchnorm
from ssd300.benchmarking import benchmark_inference, benchmark_training
from ssd300.box_coder import BoxCoder
from ssd300.checkpoint import load_checkpoint, load_model_weights, resolve_model_spec, unwrap_model
from ssd300.coco_eval import EVAL_BACKENDS, CocoMetrics, load_coco_ground_truth
from ssd300.data.coco import CocoDetection, resolve_split
from ssd300.data.loaders import build_eval_loader, build_train_loader
from ssd300.data.transforms import TrainTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.distributed import DistributedContext, broadcast_object, init_distributed, seed_everything, \
    shutdown_distributed
from ssd300.errors import UserInputError
from ssd300.evaluation import EvaluationInterrupted, evaluate_model
from ssd300.files import check_output_path, write_json
from ssd300.logging_utils import RunLogger
from ssd300.model import SSD300
from ssd300.optim import WarmupMultiStepSchedule, build_optimizer, scaled_learning_rate
from ssd300.optional import install_hint
from ssd300.plots import plot_curves, plot_evaluation
from ssd300.runtime import Runtime, default_workers
from ssd300.run_folder import BEST, CURVES_NAME, INTERRUPTED, LAST, RunFolder, epoch_file_name, evaluation_plot_name
from ssd300.trainer import StopFlag, Trainer, TrainingInterrupted

MODES = ("training", "evaluation", "benchmark-training", "benchmark-inference")
DEFAULT_EVALUATION = (21, 31, 37, 42, 48, 53, 59, 64)
DEFAULT_MULTISTEP = (43, 54)
TRAINING_MODES = ("training", "benchmark-training")
MAX_SEED = 2**31 - 1  # numpy, torch and DALI all take it; the seed of rank r is seed + r


def flag_of(name: str) -> str:
    """A config field as its command-line flag: ``batch_size`` -> ``--batch-size``."""
    return {"iou_crop": "--no-iou-crop", "channels_last": "--data-layout"}.get(name, "--" + name.replace("_", "-"))


def _named(name: str) -> str:
    return f"{name} ({flag_of(name)})"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training, evaluation or benchmark run needs; validated when built.

    Paths may be given as strings. Any problem raises :class:`~ssd300.errors.UserInputError`
    naming the field (and its flag), before any work starts.
    """

    # data: a dataset folder, or explicit image folders + COCO-format annotation files
    data: Optional[Path] = None
    train_images: Optional[Path] = None
    train_annotations: Optional[Path] = None
    val_images: Optional[Path] = None
    val_annotations: Optional[Path] = None
    num_workers: Optional[int] = None       # data loading processes per rank (None: min(8, CPUs))
    dali: bool = False                       # the DALI training pipeline
    strict_images: bool = False              # stop at the first undecodable image instead of skipping it
    iou_crop: bool = True                    # the SSD random IoU crop (the reference always crops)
    # run
    mode: str = "training"
    epochs: int = 65
    batch_size: int = 32                     # images per process and step
    eval_batch_size: int = 32
    eval_backend: str = "auto"             # COCO evaluation library: auto (faster-coco-eval when installed), ...
    seed: Optional[int] = None               # base seed (rank r uses seed + r); None: the checkpoint's, else random
    checkpoint: Optional[Path] = None        # resume from / start from / the model to evaluate
    save: Optional[Path] = None              # the run folder: epoch_<n>.pt, last.pt, best.pt, log.jsonl, ...
    resume: bool = False                     # continue the run in ``save`` from its newest checkpoint
    overwrite: bool = False                  # a fresh run may replace another run's files in ``save``
    keep_last: int = 0                       # keep only the newest N epoch_<n>.pt (0: all)
    evaluation: tuple[int, ...] = DEFAULT_EVALUATION  # epochs (0-based) after which to evaluate
    eval_every: int = 0                      # also evaluate after every N-th epoch (0: off)
    device: Optional[str] = None             # None: cuda when available, else cpu
    # recipe
    learning_rate: float = 2.6e-3            # for a global batch of 32; scaled by world size x batch / 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: int = 0                          # linear warmup iterations (published runs: 300)
    multistep: tuple[int, ...] = DEFAULT_MULTISTEP
    bn_recalibration: int = 0                # batches to recompute BatchNorm statistics over before evaluating
    freeze_bn: bool = False
    # model and precision (see ssd300.runtime)
    backbone: Optional[str] = None           # None: the checkpoint's, else resnet50
    backbone_path: Optional[Path] = None     # ImageNet weights (torchvision state-dict file)
    amp: bool = True
    allow_tf32: bool = True
    channels_last: Optional[bool] = None     # None: the runtime policy
    # benchmark
    benchmark_iterations: int = 20
    benchmark_warmup: int = 20
    # logging
    log_interval: int = 20
    json_summary: Optional[Path] = None      # None: <save>/metrics.json when save is set
    log_file: Optional[Path] = None          # None: <save>/log.jsonl when save is set
    results: Optional[Path] = None           # None: <save>/results.json when save is set
    tensorboard: Optional[Path] = None
    progress: Optional[bool] = None          # None: when stderr is a terminal

    def __post_init__(self) -> None:
        # Frozen, so normalising str paths and lists goes through object.__setattr__.
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("evaluation", "multistep"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"{_named('mode')} must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.eval_backend not in ("auto", *EVAL_BACKENDS):
            raise UserInputError(f"{_named('eval_backend')} must be one of auto, {', '.join(EVAL_BACKENDS)}, "
                                 f"got {self.eval_backend!r}")
        for name in ("batch_size", "eval_batch_size", "log_interval", "benchmark_iterations"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{_named(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "bn_recalibration", "benchmark_warmup", "warmup", "eval_every", "keep_last"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{_named(name)} must be >= 0, got {getattr(self, name)}")
        if self.mode == "training" and self.epochs < 1:
            raise UserInputError(f"{_named('epochs')} must be >= 1 to train, got {self.epochs}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"{_named('seed')} must be in [0, {MAX_SEED}], got {self.seed}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserInputError(f"{_named('num_workers')} must be >= 0, got {self.num_workers}")
        if not self.learning_rate > 0:
            raise UserInputError(f"{_named('learning_rate')} must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise UserInputError(f"{_named('momentum')} must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UserInputError(f"{_named('weight_decay')} must be >= 0, got {self.weight_decay}")
        for name in ("multistep", "evaluation"):
            if any(e < 0 for e in getattr(self, name)):
                raise UserInputError(f"{_named(name)} takes epoch numbers >= 0, got {list(getattr(self, name))}")
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise UserInputError(f"{_named('backbone')} must be one of {', '.join(BACKBONES)}, "
                                 f"got {self.backbone!r}")
        if self.mode in TRAINING_MODES and self.batch_size < 2 and not self.freeze_bn:
            raise UserInputError(f"{_named('batch_size')} 1: BatchNorm needs at least 2 images per process to "
                                 "train (use a larger batch, or freeze_bn / --freeze-bn)")
        if self.mode == "evaluation" and self.checkpoint is None:
            raise UserInputError(f"mode 'evaluation' needs {_named('checkpoint')}: the model to evaluate")
        if self.dali and not self.iou_crop:
            raise UserInputError(f"{_named('iou_crop')} applies to the PyTorch loader; the DALI pipeline always crops")
        if self.dali and self.mode not in TRAINING_MODES:
            raise UserInputError(f"{_named('dali')} is a training loader; it does nothing in mode {self.mode!r}")
        if self.dali and self.num_workers == 0:
            raise UserInputError(f"{_named('num_workers')} 0 with {flag_of('dali')}: the DALI pipeline needs at "
                                 "least 1 CPU thread (its --num-workers)")
        if self.dali:
            from ssd300.data.dali import dali_available

            if not dali_available():
                raise UserInputError(f"{_named('dali')}: NVIDIA DALI is not installed ({install_hint('nvidia.dali')})")
        for name in ("checkpoint", "backbone_path"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise UserInputError(f"{_named(name)} {path}: file not found")
        if self.save is not None and self.save.exists() and not self.save.is_dir():
            raise UserInputError(f"{_named('save')} {self.save}: exists and is not a folder")
        if self.resume and self.save is None:
            raise UserInputError(f"{_named('resume')} needs {_named('save')}: the run folder to continue")
        if self.resume and self.overwrite:
            raise UserInputError(f"{_named('resume')} contradicts {_named('overwrite')}")

    @property
    def needs_train_data(self) -> bool:
        return self.mode in TRAINING_MODES

    @property
    def evaluation_epochs(self) -> tuple[int, ...]:
        """The epochs (0-based) a training run evaluates after: ``evaluation`` (the reference's
        schedule by default), every ``eval_every``-th, and always the final one; none at all only
        when both ``evaluation`` is empty and ``eval_every`` is 0 (a run without validation data)."""
        if self.mode != "training" or (not self.evaluation and not self.eval_every):
            return ()
        every = set(range(self.eval_every - 1, self.epochs, self.eval_every)) if self.eval_every else set()
        return tuple(sorted({e for e in self.evaluation if e < self.epochs} | every | {self.epochs - 1}))

    @property
    def needs_val_data(self) -> bool:
        return self.mode in ("evaluation", "benchmark-inference") or bool(self.evaluation_epochs)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


_PATH_FIELDS = ("data", "train_images", "train_annotations", "val_images", "val_annotations", "checkpoint", "save",
                "backbone_path", "json_summary", "log_file", "results", "tensorboard")


Split = tuple[Path, Path]  # (image folder, COCO-format annotation file)


@dataclass
class DataPaths:
    train: Optional[Split] = None
    val: Optional[Split] = None


def resolve_data(config: TrainConfig) -> DataPaths:
    """The ``data`` folder's splits or the explicit ``train_*``/``val_*`` paths (not both)."""
    explicit = {"train": (config.train_images, config.train_annotations),
                "val": (config.val_images, config.val_annotations)}
    given = [f"--{split}-{kind}" for split, pair in explicit.items()
             for kind, value in zip(("images", "annotations"), pair) if value is not None]
    if config.data is not None and given:
        raise UserInputError(f"--data and {given[0]} contradict each other: give a dataset folder or explicit paths")
    paths = DataPaths()
    if config.data is not None:
        if config.needs_train_data:
            paths.train = resolve_split(config.data, "train")
        if config.needs_val_data:
            paths.val = resolve_split(config.data, "val")
        return paths
    for split, needed in (("train", config.needs_train_data), ("val", config.needs_val_data)):
        images, annotations = explicit[split]
        if (images is None) != (annotations is None):
            missing = f"--{split}-annotations" if annotations is None else f"--{split}-images"
            raise UserInputError(f"{missing} is missing (--{split}-images and --{split}-annotations go together)")
        if needed and images is None:
            hint = " (or train without evaluating: --evaluation with no epochs)" if split == "val" else ""
            raise UserInputError(f"no {split} data: give --data FOLDER or --{split}-images and "
                                 f"--{split}-annotations{hint}")
        if images is not None and annotations is not None:
            if not images.is_dir():
                raise UserInputError(f"--{split}-images {images}: folder not found")
            if not annotations.is_file():
                raise UserInputError(f"--{split}-annotations {annotations}: file not found")
            setattr(paths, split, (images, annotations))
    return paths


@dataclass
class RunResult:
    """What a run produced."""

    mode: str
    evaluations: list[dict[str, Any]] = field(default_factory=list)   # one entry per evaluation
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss)
    benchmark: dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[Path] = None       # the last checkpoint written
    metrics: Optional[CocoMetrics] = None   # the last evaluation's
    trainer: Optional[Trainer] = None       # of training runs
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def last_metrics(self) -> dict[str, Any]:
        return self.evaluations[-1] if self.evaluations else {}


def check_outputs(config: TrainConfig) -> None:
    """Every output path of the run can be written (one-line UserInputError naming the flag if not)."""
    for name, folder in (("save", True), ("log_file", False), ("results", False), ("json_summary", False),
                         ("tensorboard", True)):
        path = getattr(config, name)
        if path is not None:
            check_output_path(path, flag_of(name), folder=folder)


def resolve_resume(config: TrainConfig) -> TrainConfig:
    """``resume`` without ``checkpoint`` (mode training): the newest checkpoint of the run folder.
    ``resume``, ``overwrite`` and ``keep_last`` mean nothing to the other modes."""
    if not config.resume or config.checkpoint is not None or config.mode != "training":
        return config
    assert config.save is not None  # validated
    newest = RunFolder(config.save).newest_checkpoint()
    if newest is None:
        raise UserInputError(f"--resume: no checkpoint in {config.save} ({LAST}, {INTERRUPTED} or epoch_<n>.pt)")
    return config.replace(checkpoint=newest)


def run(config: TrainConfig) -> RunResult:
    """Run ``config.mode``; returns what was produced. All ranks call this under torchrun."""
    check_outputs(config)
    config = resolve_resume(config)
    paths = resolve_data(config)
    ctx = init_distributed(config.device)
    try:
        return _Run(config, paths, ctx).execute()
    finally:
        shutdown_distributed()


def train(config: TrainConfig) -> RunResult:
    """Train (or benchmark training, per ``config.mode``); see :func:`run`."""
    if config.mode not in TRAINING_MODES:
        raise UserInputError(f"train() runs mode 'training' or 'benchmark-training', not {config.mode!r}; "
                             "use evaluate() or run()")
    return run(config)


def evaluate(config: TrainConfig) -> Optional[CocoMetrics]:
    """COCO metrics (:class:`~ssd300.coco_eval.CocoMetrics`) of ``config.checkpoint`` on the validation data."""
    return run(config.replace(mode="evaluation")).metrics


class _Run:
    """One run's pieces, built in order; each step is a method so ``execute`` reads as the recipe."""

    def __init__(self, config: TrainConfig, paths: DataPaths, ctx: DistributedContext) -> None:
        self.config, self.paths, self.ctx = config, paths, ctx
        self.checkpoint = load_checkpoint(config.checkpoint) if config.checkpoint is not None else None
        stored_args = self.checkpoint.get("args", {}) if self.checkpoint is not None else {}
        seed = config.seed if config.seed is not None else stored_args.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % 2**31
        self.seed = int(broadcast_object(seed))  # every rank needs the same base seed for the data order
        seed_everything(self.seed, ctx.rank)
        self.runtime = Runtime.resolve(ctx.device, config.amp, channels_last=config.channels_last,
                                       allow_tf32=config.allow_tf32).configure()
        self.channels_last = self.runtime.channels_last(training=config.mode in TRAINING_MODES)
        self.workers = config.num_workers if config.num_workers is not None else default_workers()
        self.save_dir = config.save
        self.folder = RunFolder(config.save) if config.save is not None and config.mode == "training" else None
        notes = self.take_folder()
        log_file = config.log_file or (self.save_dir / "log.jsonl" if self.save_dir is not None else None)
        try:
            self.logger = RunLogger(enabled=ctx.is_main, jsonl_path=log_file, tensorboard_dir=config.tensorboard,
                                    log_interval=config.log_interval, progress=config.progress)
        except BaseException:
            if self.folder is not None:
                self.folder.release_lock()
            raise
        self.results_path = config.results or (self.save_dir / "results.json" if self.save_dir is not None else None)
        self.summary_path = config.json_summary or (
            self.save_dir / "metrics.json" if self.save_dir is not None else None)
        self.result = RunResult(mode=config.mode)
        for note in notes:
            self.logger.info(note)
        # The run's best evaluation so far ({"epoch", "AP", "AP50"}); a resumed run continues it.
        self.best: Optional[dict[str, Any]] = (self.checkpoint or {}).get("best") if self.resuming else None

    @property
    def resuming(self) -> bool:
        """A training run continuing a checkpoint's training state (not fine-tuning from weights)."""
        return self.config.mode == "training" and self.checkpoint is not None and "optimizer" in self.checkpoint

    def take_folder(self) -> list[str]:
        """The run folder's policies (one run per folder, lock, stale temps) on the main rank;
        every rank raises the same error, so none is left waiting in a collective."""
        if self.folder is None:
            return []
        notes: list[str] = []
        problem: Optional[str] = None
        if self.ctx.is_main:
            try:
                notes = self.folder.prepare(resuming_from=self.config.checkpoint if self.resuming else None,
                                            overwrite=self.config.overwrite)
            except UserInputError as err:
                problem = str(err)
        problem = broadcast_object(problem)
        if problem is not None:
            raise UserInputError(problem)
        return notes

    # ------------------------------------------------------------------ building

    def build_data_and_model(self) -> None:
        config, paths = self.config, self.paths
        self.train_set: Optional[CocoDetection] = None
        self.val_set: Optional[CocoDetection] = None
        if paths.train is not None:
            self.train_set = CocoDetection(*paths.train, train=True, seed=self.seed, strict=config.strict_images,
                                           transform=TrainTransform(crop=config.iou_crop))
        data_label_map, data_source = None, "the dataset"
        if self.train_set is not None and paths.train is not None:
            data_label_map, data_source = self.train_set.label_map, f"annotation file {paths.train[1]}"
        elif paths.val is not None:
            # evaluation: the validation file's own categories, checked against the checkpoint's
            self.val_set = CocoDetection(*paths.val, train=False, strict=config.strict_images)
            data_label_map, data_source = self.val_set.label_map, f"annotation file {paths.val[1]}"
        # A checkpoint and the data must agree on every category (id and name): training needs the
        # same labels in the same order; evaluation may use a subset of the checkpoint's categories.
        self.spec = resolve_model_spec(self.checkpoint, source=f"checkpoint {config.checkpoint}",
                                       data_label_map=data_label_map, data_source=data_source,
                                       data_subset_ok=self.train_set is None, backbone=config.backbone)
        if paths.val is not None and (self.val_set is None or self.val_set.label_map != self.spec.label_map):
            self.val_set = CocoDetection(*paths.val, train=False, label_map=self.spec.label_map,
                                         strict=config.strict_images)
        self.coco_gt = load_coco_ground_truth(paths.val[1], backend=config.eval_backend) if (
            paths.val is not None and self.ctx.is_main) else None
        model = SSD300(self.spec.backbone, num_classes=self.spec.num_classes,
                       backbone_path=config.backbone_path if self.checkpoint is None else None)
        if self.checkpoint is not None:
            load_model_weights(model, self.checkpoint)  # one-line error when it does not fit
        model.to(self.ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: Any = model

    def build_trainer(self) -> Trainer:
        config, ctx = self.config, self.ctx
        if ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.lr = scaled_learning_rate(config.learning_rate, ctx.world_size, config.batch_size)
        optimizer = build_optimizer(self.model, self.lr, config.momentum, config.weight_decay)
        run_args = {**dataclasses.asdict(config), "seed": self.seed, "backbone": self.spec.backbone}
        trainer = Trainer(model=self.model, optimizer=optimizer,
                          schedule=WarmupMultiStepSchedule(self.lr, config.warmup, list(config.multistep)),
                          box_coder=BoxCoder(default_boxes_300().to(ctx.device)), runtime=self.runtime, ctx=ctx,
                          label_map=self.spec.label_map, logger=self.logger, frozen_batchnorm=config.freeze_bn,
                          save_dir=self.save_dir, run_args=run_args)
        if self.checkpoint is not None and config.mode == "training":
            if trainer.load_training_state(self.checkpoint):
                self.logger.info(f"resumed from {config.checkpoint}: at epoch {trainer.position.epoch}, "
                                 f"iteration {trainer.position.iteration}")
            else:
                self.logger.info(f"starting from the weights of {config.checkpoint} (no optimizer state: fine-tuning)")
        self.result.trainer = trainer
        return trainer

    def build_train_loader(self) -> Any:
        config, ctx, train_set = self.config, self.ctx, self.train_set
        assert train_set is not None and self.paths.train is not None  # training modes resolve train data
        loader: Any
        if config.dali:
            from ssd300.data.dali import build_dali_train_loader

            loader = build_dali_train_loader(
                train_set, config.batch_size, num_threads=self.workers, seed=self.seed, rank=ctx.rank,
                world_size=ctx.world_size, device_id=ctx.device.index if ctx.device.type == "cuda" else None)
        else:
            loader = build_train_loader(train_set, config.batch_size, num_workers=self.workers, seed=self.seed,
                                        rank=ctx.rank, world_size=ctx.world_size)
        if len(loader) == 0:
            raise UserInputError(f"{self.paths.train[1]}: {len(train_set)} training images are fewer "
                                 f"than --batch-size {config.batch_size} x {ctx.world_size} processes")
        self.logger.info(f"{len(train_set)} training images, {len(loader)} iterations per epoch, "
                         f"learning rate {self.lr:.4g} (= {config.learning_rate:g} x {ctx.world_size} x "
                         f"{config.batch_size}/32)")
        return loader

    def eval_loader(self) -> Any:
        assert self.val_set is not None  # evaluating modes resolve validation data
        return build_eval_loader(self.val_set, self.config.eval_batch_size, num_workers=self.workers,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size)

    # ------------------------------------------------------------------ steps

    def run_evaluation(self, epoch: int, iteration: int, train_loader: Any = None,
                       stop: Optional[StopFlag] = None) -> CocoMetrics:
        """Evaluate after ``epoch`` (0-based); a signal (``stop``) ends it at the next batch."""
        start = time.perf_counter()
        if train_loader is not None and self.config.bn_recalibration > 0:
            self.recalibrate(train_loader)
        loader = self.eval_loader()
        with self.logger.progress_bar(len(loader.sampler), f"evaluation after epoch {epoch}") as bar:
            metrics = evaluate_model(self.model, loader, self.coco_gt, self.spec.label_map, ctx=self.ctx,
                                     runtime=self.runtime, channels_last=self.channels_last,
                                     results_path=self.results_path, log=self.logger.info, progress=bar.update,
                                     should_stop=self.stop_vote(stop) if stop is not None else None)
        seconds = time.perf_counter() - start
        names = self.spec.label_map.names_by_category_id()
        self.logger.info(f"epoch {epoch}: AP {metrics.ap:.4f}  AP50 {metrics.ap50:.4f}  ({seconds:.1f} s, "
                         f"{metrics.num_images} images, {metrics.backend})")
        per_class = metrics.per_class_records(names)
        self.logger.evaluation(epoch=epoch, iteration=iteration, metrics=metrics.as_dict(), seconds=seconds,
                               per_class=per_class)
        self.result.evaluations.append({"epoch": epoch, "iteration": iteration, **metrics.as_dict(),
                                        "per_class": per_class})
        self.result.metrics = metrics
        if self.save_dir is not None and self.ctx.is_main:
            plot = plot_evaluation(metrics, names, self.save_dir / evaluation_plot_name(epoch),
                                   title=f"epoch {epoch}")
            self.logger.info(f"per-class AP and precision-recall curves: {plot}")
        return metrics

    def stop_vote(self, stop: StopFlag) -> Any:
        """Whether any rank got a signal (ranks must stop an evaluation at the same batch)."""
        def requested() -> bool:
            if not self.ctx.distributed:
                return stop.requested
            vote = torch.tensor([float(stop.requested)], device=self.ctx.device)
            torch.distributed.all_reduce(vote)
            return bool(vote.item() > 0)
        return requested

    def recalibrate(self, train_loader: Any) -> None:
        inner = unwrap_model(self.model)
        used = recalibrate_batchnorm(inner, islice(iter(train_loader), self.config.bn_recalibration),
                                     self.ctx.device, self.channels_last)
        if self.ctx.distributed:  # one set of statistics for every rank: rank 0's
            for buffer in inner.buffers():
                torch.distributed.broadcast(buffer, 0)
        self.logger.info(f"BatchNorm statistics recomputed over {used} training batches")

    def train_epochs(self, trainer: Trainer, loader: Any) -> None:
        config = self.config
        if self.save_dir is None:
            self.logger.info("no save folder (--save): checkpoints will not be written")
        if trainer.position.epoch >= config.epochs:
            raise UserInputError(f"--checkpoint {config.checkpoint} already completed {trainer.position.epoch} "
                                 f"epochs; --epochs {config.epochs} leaves nothing to train (raise --epochs)")
        evaluation_epochs = config.evaluation_epochs
        shown = ", ".join(str(e) for e in evaluation_epochs) if evaluation_epochs else "none (--evaluation empty)"
        self.logger.info(f"epochs 0..{config.epochs - 1}; evaluating after epochs: {shown}")
        with StopFlag() as stop:
            while trainer.position.epoch < config.epochs:
                epoch = trainer.position.epoch
                try:
                    trainer.train_epoch(loader, config.epochs, stop)
                except TrainingInterrupted:
                    self.publish(trainer, INTERRUPTED)
                    raise
                # Evaluate before saving: bn_recalibration changes the BatchNorm statistics, and the
                # checkpoint should hold the model that was evaluated.
                metrics = None
                if epoch in evaluation_epochs:
                    try:
                        metrics = self.run_evaluation(epoch, trainer.position.iteration, loader, stop)
                    except EvaluationInterrupted as stopped:
                        path = self.save_epoch(trainer, epoch, None)
                        where = f"; epoch {epoch}'s checkpoint written to {path} (resume with --resume)" if path else ""
                        message = f"stopped by signal during the evaluation after epoch {epoch}{where}"
                        self.logger.info(message)
                        raise TrainingInterrupted(message, stop.signal_number or stopped.signal_number) from None
                self.save_epoch(trainer, epoch, metrics)

    def save_epoch(self, trainer: Trainer, epoch: int, metrics: Optional[CocoMetrics]) -> Optional[Path]:
        """``epoch_<n>.pt`` (with its metrics when evaluated), then ``last.pt``, ``best.pt`` when
        its AP is the run's best so far, and pruning to ``keep_last``."""
        improved = metrics is not None and (self.best is None or metrics.ap > float(self.best["AP"]))
        if improved and metrics is not None:
            self.best = {"epoch": epoch, "AP": metrics.ap, "AP50": metrics.ap50}
        extra: dict[str, Any] = {"best": self.best}
        if metrics is not None:
            extra["metrics"] = {"epoch": epoch, **metrics.as_dict()}
        path = trainer.save(epoch_file_name(epoch), **extra)
        if path is None or self.folder is None:
            return path
        self.folder.publish(path, LAST)
        if improved and self.best is not None:
            self.folder.publish(path, BEST)
            self.logger.info(f"best so far (AP {self.best['AP']:.4f}, epoch {epoch}): {self.folder.path / BEST}")
        removed = self.folder.prune_epochs(self.config.keep_last)
        self.result.checkpoint = path
        self.logger.info(f"checkpoint: {path}" + (f" (removed {', '.join(p.name for p in removed)}: "
                                                   f"--keep-last {self.config.keep_last})" if removed else ""))
        return path

    def publish(self, trainer: Trainer, name: str) -> None:
        """After an interruption: ``last.pt`` = the file just written (``interrupted.pt``)."""
        if self.folder is not None and self.ctx.is_main and (self.folder.path / name).is_file():
            self.folder.publish(self.folder.path / name, LAST)

    def execute(self) -> RunResult:
        config, result = self.config, self.result
        try:
            self.build_data_and_model()
            self.logger.info(f"ssd300 {config.mode}: {self.spec.backbone}, {self.spec.num_classes - 1} classes, "
                             f"{self.ctx.world_size} process(es), seed {self.seed}")
            self.logger.info(self.runtime.describe())
            warning = random_backbone_warning(config, self.spec.backbone, has_checkpoint=self.checkpoint is not None)
            if warning is not None:
                self.logger.info(warning)
                self.logger.record("warning", message=warning)
            if config.mode == "evaluation":
                assert self.checkpoint is not None
                self.run_evaluation(int(self.checkpoint.get("epoch", 0)) - 1, int(self.checkpoint.get("iteration", 0)))
            elif config.mode == "benchmark-inference":
                result.benchmark = benchmark_inference(self.model, self.eval_loader(), ctx=self.ctx,
                                                       runtime=self.runtime, warmup=config.benchmark_warmup,
                                                       iterations=config.benchmark_iterations,
                                                       channels_last=self.channels_last)
                self.logger.info(_format_benchmark("inference", result.benchmark))
            else:
                trainer = self.build_trainer()
                loader = self.build_train_loader()
                if config.mode == "benchmark-training":
                    result.benchmark = benchmark_training(trainer, loader, warmup=config.benchmark_warmup,
                                                          iterations=config.benchmark_iterations)
                    self.logger.info(_format_benchmark("training", result.benchmark))
                else:
                    try:
                        self.train_epochs(trainer, loader)
                    finally:  # an interrupted run's curves too
                        self.write_curves(trainer)
                result.loss_history = trainer.loss_history
        finally:
            self.logger.close()
            if self.folder is not None:
                self.folder.release_lock()
        self.write_summary()
        return result

    def write_curves(self, trainer: Trainer) -> None:
        if self.save_dir is not None and self.ctx.is_main and trainer.loss_history:
            path = plot_curves(trainer.loss_history, self.result.evaluations, self.save_dir / CURVES_NAME)
            self.logger.info(f"loss and mAP curves: {path}")

    def write_summary(self) -> None:
        result = self.result
        result.summary = {"mode": self.config.mode, "seed": self.seed, "backbone": self.spec.backbone,
                          "world_size": self.ctx.world_size, "precision": self.runtime.precision,
                          "runtime": self.runtime.describe(), "evaluations": result.evaluations, **result.benchmark}
        if result.loss_history:
            result.summary["final_loss"] = result.loss_history[-1][1]
            result.summary["iterations"] = result.loss_history[-1][0]
        if result.evaluations:
            result.summary.update(AP=result.last_metrics["AP"], AP50=result.last_metrics["AP50"])
        if self.summary_path is not None and self.ctx.is_main:
            write_json(self.summary_path, result.summary)


def random_backbone_warning(config: TrainConfig, backbone: str, *, has_checkpoint: bool) -> Optional[str]:
    """The loud line for training ResNet-50 from random weights: the published mAP (SPEC §8, 0.27
    on COCO) assumes an ImageNet-trained trunk. None when there is nothing to warn about."""
    if config.mode != "training" or has_checkpoint or config.backbone_path is not None or backbone != "resnet50":
        return None
    return ("WARNING: training ResNet-50 from random weights (no --backbone-path): the published mAP (0.27 on "
            "COCO) assumes ImageNet weights; pass torchvision's ResNet50_Weights.IMAGENET1K_V1 file "
            f"({TORCHVISION_IMAGENET_FILES['resnet50']}) with --backbone-path (see README, 'Backbone weights')")


def _format_benchmark(kind: str, figures: dict[str, float]) -> str:
    parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
    return f"benchmark-{kind}: " + ", ".join(parts)
