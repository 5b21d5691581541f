"""Training as a library: :func:`train` / :func:`evaluate` / :func:`run` of a :class:`TrainConfig`.

>>> from ssd300 import TrainConfig, train
>>> result = train(TrainConfig(data="runs/synth", backbone="resnet18", epochs=2, batch_size=8, save="runs/x"))
>>> result.last_metrics["AP50"], result.checkpoint

The config, its defaults (the reference's, SPEC §6-7) and its validation are
:mod:`ssd300.train_config`'s. ``mode`` selects what :func:`run` does: ``training`` (train,
evaluating after the ``evaluation`` epochs, every ``eval_every`` epochs and the final epoch),
``evaluation`` (COCO metrics of ``checkpoint``), ``benchmark-training`` /
``benchmark-inference`` (images/s). Under ``torchrun`` every process calls the same function with
the same config.

Epochs and iterations are numbered from 0 everywhere, as in the reference: ``evaluation``/
``multistep`` values, the epoch checkpoints (written after epoch ``n``), the ``epoch`` and
``iteration`` of log records (an evaluation's: the last step before it), console lines and the
curves' axes. A checkpoint's ``epoch``/``iteration`` entries are the reference's: epochs and steps
completed, i.e. where a resume starts. The run folder (``save``), its file names and its
checkpoints are :mod:`ssd300.run_folder`'s.

Checkpoints carry the run's history (:mod:`ssd300.trainer` says why), so a resumed run's
``metrics.json``/``curves.png`` cover the whole run; an evaluation a signal interrupted is redone first.
A run (:class:`_Run`): seed, runtime, run folder; data and model; trainer and loader; one mode; the
epoch loop asks the :class:`~ssd300.evaluation.RunEvaluator` for each scheduled evaluation and saves
each epoch's checkpoint; curves and summary last.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ssd300.benchmarking import benchmark_inference, benchmark_training, format_benchmark
from ssd300.checkpoint import (ModelSpec, checkpoint_architecture, load_checkpoint, load_model_weights,
                               resolve_model_spec)
from ssd300.coco_eval import CocoMetrics
from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_train_loader
from ssd300.data.transforms import TrainTransform
from ssd300.distributed import (
    DistributedContext,
    broadcast_object,
    init_distributed,
    seed_everything,
    shutdown_distributed,
)
from ssd300.errors import UserInputError
from ssd300.evaluation import EvaluationInterrupted, RunEvaluator
from ssd300.files import write_json
from ssd300.logging_utils import RunLogger
from ssd300.model import SSD300
from ssd300.optim import scaled_learning_rate
from ssd300.plots import plot_curves
from ssd300.run_folder import BEST, RunFolder
from ssd300.runtime import Runtime, default_workers
from ssd300.transfer import init_from_checkpoint, set_backbone_frozen
from ssd300.train_config import (
    DEFAULT_EVALUATION,
    MODES,
    TRAINING_MODES,
    DataPaths,
    TrainConfig,
    check_outputs,
    random_backbone_warning,
    resolve_data,
    resolve_backbone_weights,
    resolve_resume,
)
from ssd300.trainer import StopFlag, Trainer, TrainingInterrupted, plain_data, stored_history

__all__ = ["DEFAULT_EVALUATION", "MODES", "RunResult", "TrainConfig", "evaluate", "random_backbone_warning", "run",
           "train"]


@dataclass
class RunResult:
    """What a run produced."""

    mode: str
    evaluations: list[dict[str, Any]] = field(default_factory=list)   # one entry per evaluation
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (iteration from 0, loss), whole run
    benchmark: dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[Path] = None       # the last checkpoint written
    metrics: Optional[CocoMetrics] = None   # the last evaluation's
    trainer: Optional[Trainer] = None       # of training runs
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def last_metrics(self) -> dict[str, Any]:
        return self.evaluations[-1] if self.evaluations else {}


def run(config: TrainConfig) -> RunResult:
    """Run ``config.mode``; returns what was produced. All ranks call this under torchrun."""
    check_outputs(config)
    config = resolve_backbone_weights(resolve_resume(config))
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
                             "use evaluate() or run()", fields=("mode",))
    return run(config)


def evaluate(config: TrainConfig) -> Optional[CocoMetrics]:
    """COCO metrics (:class:`~ssd300.coco_eval.CocoMetrics`) of ``config.checkpoint`` on the validation data."""
    return run(config.replace(mode="evaluation")).metrics


class _Run:
    """One run's pieces, built in order; each step is a method so :meth:`execute` reads as the recipe."""

    def __init__(self, config: TrainConfig, paths: DataPaths, ctx: DistributedContext) -> None:
        self.config, self.paths, self.ctx = config, paths, ctx
        self.checkpoint = load_checkpoint(config.checkpoint) if config.checkpoint is not None else None
        self.init_checkpoint = load_checkpoint(config.init_from) if config.init_from is not None else None
        self.seed = self.agree_on_seed()
        seed_everything(self.seed, ctx.rank)
        self.runtime = Runtime.resolve(ctx.device, config.amp, channels_last=config.channels_last,
                                       allow_tf32=config.allow_tf32).configure()
        self.channels_last = self.runtime.channels_last(training=config.mode in TRAINING_MODES)
        self.workers = config.num_workers if config.num_workers is not None else default_workers()
        # ``outputs`` names the files of any mode's run folder; a training run also owns it:
        # its lock, policies and checkpoints (``checkpoints``).
        self.outputs = RunFolder(config.save) if config.save is not None else None
        self.checkpoints = self.outputs if config.mode == "training" else None
        notes = self.take_folder()
        self.logger = self.open_logger()
        self.summary_path = config.json_summary or (self.outputs.metrics_file if self.outputs else None)
        self.result = RunResult(mode=config.mode)
        for note in notes:
            self.logger.info(note)
        # The run's best evaluation so far ({"epoch", "AP", "AP50"}) and its evaluations; a resumed
        # run continues them.
        self.best: Optional[dict[str, Any]] = None
        if self.resuming:
            assert self.checkpoint is not None
            self.best, self.result.evaluations[:] = stored_history(self.checkpoint)

    # ------------------------------------------------------------------ setup

    def agree_on_seed(self) -> int:
        """The config's seed, else the checkpoint's, else a random one; every rank takes rank 0's
        (they need the same base seed for the data order)."""
        stored_args = self.checkpoint.get("args", {}) if self.checkpoint is not None else {}
        seed = self.config.seed if self.config.seed is not None else stored_args.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % 2**31
        return int(broadcast_object(seed))

    @property
    def resuming(self) -> bool:
        """A training run continuing a checkpoint's training state (not fine-tuning from weights)."""
        return self.config.mode == "training" and self.checkpoint is not None and "optimizer" in self.checkpoint

    def take_folder(self) -> list[str]:
        """The run folder's policies (one run per folder, lock, stale temps) on the main rank;
        every rank raises the same error, so none is left waiting in a collective."""
        if self.checkpoints is None:
            return []
        notes: list[str] = []
        problem: Optional[UserInputError] = None
        if self.ctx.is_main:
            try:
                notes = self.checkpoints.prepare(resuming_from=self.config.checkpoint if self.resuming else None,
                                                 overwrite=self.config.overwrite)
            except UserInputError as err:
                problem = err
        problem = broadcast_object(problem)
        if problem is not None:
            raise problem
        return notes

    def open_logger(self) -> RunLogger:
        config = self.config
        log_file = config.log_file or (self.outputs.log_file if self.outputs else None)
        try:
            return RunLogger(enabled=self.ctx.is_main, jsonl_path=log_file, tensorboard_dir=config.tensorboard,
                             log_interval=config.log_interval, progress=config.progress)
        except BaseException:
            if self.checkpoints is not None:
                self.checkpoints.release_lock()
            raise

    def build_data_and_model(self) -> None:
        self.build_datasets()
        model = SSD300(self.spec.backbone, num_classes=self.spec.num_classes,
                       backbone_path=self.config.backbone_path if self.checkpoint is None else None)
        if self.checkpoint is not None:
            load_model_weights(model, self.checkpoint)  # one-line error when it does not fit
        elif self.init_checkpoint is not None:
            source = f"init_from {self.config.init_from}"
            transfer = init_from_checkpoint(model, self.init_checkpoint, self.spec.label_map, source=source)
            self.logger.info(line := transfer.describe(str(self.config.init_from)))
            self.logger.record("init_from", message=line, kept=transfer.kept, new=list(transfer.new),
                               mapped=dict(transfer.mapped))
        model.to(self.ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: Any = model
        self.evaluator = self.build_evaluator()

    def build_evaluator(self) -> Optional[RunEvaluator]:
        config, val = self.config, self.paths.val
        if val is None or self.val_set is None:
            return None
        results = config.results or (self.outputs.results_file if self.outputs else None)
        return RunEvaluator(self.val_set, val[1], self.spec.label_map, self.runtime, self.ctx, self.logger,
                            batch_size=config.eval_batch_size, num_workers=self.workers,
                            channels_last=self.channels_last, eval_backend=config.eval_backend, metric=config.metric,
                            bn_recalibration=config.bn_recalibration, results_path=results, outputs=self.outputs,
                            evaluations=self.result.evaluations)

    def evaluate(self, epoch: int, iteration: int, train_loader: Any = None,
                 stop: Optional[StopFlag] = None) -> CocoMetrics:
        assert self.evaluator is not None  # evaluating modes resolve validation data
        metrics = self.evaluator.evaluate(self.model, epoch, iteration, train_loader,
                                          should_stop=self.stop_vote(stop) if stop is not None else None)
        self.result.metrics = metrics
        return metrics

    def stop_vote(self, stop: StopFlag) -> Callable[[], bool]:
        """Whether any rank got a signal (ranks must stop an evaluation at the same batch)."""
        def requested() -> bool:
            if not self.ctx.distributed:
                return stop.requested
            vote = torch.tensor([float(stop.requested)], device=self.ctx.device)
            torch.distributed.all_reduce(vote)
            return bool(vote.item() > 0)
        return requested

    def build_datasets(self) -> None:
        """The datasets and the model spec they agree on (a checkpoint and the data must have the
        same categories for training; evaluation may use a subset of the checkpoint's)."""
        config, paths = self.config, self.paths
        self.train_set: Optional[CocoDetection] = None
        self.val_set: Optional[CocoDetection] = None
        if paths.train is not None:
            self.train_set = CocoDetection(*paths.train, train=True, seed=self.seed, strict=config.strict_images,
                                           transform=TrainTransform(crop=config.iou_crop),
                                           keep_difficult=config.keep_difficult)
        data_label_map, data_source = None, "the dataset"
        if self.train_set is not None and paths.train is not None:
            data_label_map, data_source = self.train_set.label_map, f"annotation file {paths.train[1]}"
        elif paths.val is not None:
            # evaluation: the validation file's own categories, checked against the checkpoint's
            self.val_set = CocoDetection(*paths.val, train=False, strict=config.strict_images)
            data_label_map, data_source = self.val_set.label_map, f"annotation file {paths.val[1]}"
        self.spec: ModelSpec = resolve_model_spec(
            self.checkpoint, source=f"checkpoint {config.checkpoint}", data_label_map=data_label_map,
            data_source=data_source, data_subset_ok=self.train_set is None, backbone=config.backbone,
            default_backbone=self.init_backbone())
        if paths.val is not None and (self.val_set is None or self.val_set.label_map != self.spec.label_map):
            self.val_set = CocoDetection(*paths.val, train=False, label_map=self.spec.label_map,
                                         strict=config.strict_images)

    def init_backbone(self) -> str:
        """The backbone of a fresh run: init_from's when given, else resnet50."""
        init = self.init_checkpoint
        return "resnet50" if init is None else checkpoint_architecture(init, f"init_from {self.config.init_from}")[0]

    @property
    def lr(self) -> float:
        return scaled_learning_rate(self.config.learning_rate, self.ctx.world_size, self.config.batch_size)

    def build_trainer(self, iterations_per_epoch: int) -> Trainer:
        config, ctx = self.config, self.ctx
        if ctx.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        trainer = Trainer.build(
            self.model, runtime=self.runtime, label_map=self.spec.label_map, learning_rate=self.lr,
            momentum=config.momentum, weight_decay=config.weight_decay, warmup=config.warmup,
            multistep=config.multistep, optimizer=config.optimizer, schedule=config.schedule,
            total_iterations=config.epochs * iterations_per_epoch, ctx=ctx, logger=self.logger,
            frozen_batchnorm=config.freeze_bn,
            run_args={**dataclasses.asdict(config), "seed": self.seed, "backbone": self.spec.backbone})
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
                                 f"than batch_size {config.batch_size} x {ctx.world_size} processes",
                                 fields=("batch_size",))
        self.logger.info(f"{len(train_set)} training images, {len(loader)} iterations per epoch, "
                         f"learning rate {self.lr:.4g} (= {config.learning_rate:g} x {ctx.world_size} x "
                         f"{config.batch_size}/32), {config.optimizer}, {config.schedule} schedule")
        return loader

    # ------------------------------------------------------------------ modes

    def execute(self) -> RunResult:
        try:
            self.build_data_and_model()
            self.announce()
            {"evaluation": self.run_evaluation_mode, "benchmark-inference": self.run_benchmark_inference,
             "benchmark-training": self.run_benchmark_training, "training": self.run_training}[self.config.mode]()
        finally:
            self.logger.close()
            if self.checkpoints is not None:
                self.checkpoints.release_lock()
        self.write_summary()
        return self.result

    def announce(self) -> None:
        self.logger.info(f"ssd300 {self.config.mode}: {self.spec.backbone}, {self.spec.num_classes - 1} classes, "
                         f"{self.ctx.world_size} process(es), seed {self.seed}")
        self.logger.info(self.runtime.describe())
        started = self.checkpoint is not None or self.init_checkpoint is not None
        warning = random_backbone_warning(self.config, self.spec.backbone, has_checkpoint=started)
        if warning is not None:
            self.logger.info(warning)
            self.logger.record("warning", message=warning)

    def run_evaluation_mode(self) -> None:
        assert self.checkpoint is not None  # validated: mode evaluation needs one
        # the checkpoint's entries count what was done: the last epoch and step are one less
        self.evaluate(int(self.checkpoint.get("epoch", 0)) - 1, int(self.checkpoint.get("iteration", 0)) - 1)

    def eval_loader(self) -> Any:
        assert self.evaluator is not None  # benchmark-inference resolves validation data
        return self.evaluator.loader()

    def run_benchmark_inference(self) -> None:
        config = self.config
        self.result.benchmark = benchmark_inference(
            self.model, self.eval_loader(), ctx=self.ctx, runtime=self.runtime,
            warmup=config.benchmark_warmup, iterations=config.benchmark_iterations, channels_last=self.channels_last)
        self.logger.info(format_benchmark("inference", self.result.benchmark))

    def run_benchmark_training(self) -> None:
        loader = self.build_train_loader()
        trainer = self.build_trainer(len(loader))
        self.result.benchmark = benchmark_training(trainer, loader, warmup=self.config.benchmark_warmup,
                                                   iterations=self.config.benchmark_iterations)
        self.logger.info(format_benchmark("training", self.result.benchmark))
        self.result.loss_history = trainer.loss_history

    def run_training(self) -> None:
        loader = self.build_train_loader()
        trainer = self.build_trainer(len(loader))
        try:
            self.train_epochs(trainer, loader)
        finally:  # an interrupted run's curves too
            self.write_curves(trainer)
            self.result.loss_history = trainer.loss_history

    # ------------------------------------------------------------------ the epoch loop

    def train_epochs(self, trainer: Trainer, loader: Any) -> None:
        config = self.config
        if self.checkpoints is None:
            self.logger.info("no run folder (save): checkpoints will not be written")
        scheduled = config.evaluation_epochs
        with StopFlag() as stop:
            redone = self.redo_interrupted_evaluation(trainer, loader, stop)
            if trainer.position.epoch >= config.epochs:
                if redone:
                    return  # the run had ended but for that evaluation
                raise UserInputError(f"checkpoint {config.checkpoint}: epochs {config.epochs} leaves nothing to "
                                     f"train, it already completed {trainer.position.epoch} epochs (raise epochs)",
                                     fields=("checkpoint", "epochs"))
            shown = ", ".join(str(e) for e in scheduled) if scheduled else "none (evaluation is empty)"
            self.logger.info(f"epochs 0..{config.epochs - 1}; evaluating after epochs: {shown}")
            while trainer.position.epoch < config.epochs:
                epoch = trainer.position.epoch
                self.freeze_backbone(epoch)
                try:
                    trainer.train_epoch(loader, config.epochs, stop)
                except TrainingInterrupted as stopped:
                    raise self.interrupted(trainer, stopped.signal_number) from None
                # Evaluate before saving: bn_recalibration changes the BatchNorm statistics, and the
                # checkpoint should hold the model that was evaluated.
                metrics = None
                if epoch in scheduled:
                    metrics = self.evaluate_after(trainer, epoch, loader, stop)
                self.save_epoch(trainer, epoch, metrics)

    def redo_interrupted_evaluation(self, trainer: Trainer, loader: Any, stop: StopFlag) -> bool:
        """A resumed run whose checkpoint is the end of a scheduled epoch without that epoch's
        evaluation (a signal stopped it): evaluate now, and write the epoch's checkpoint again with
        its metrics (and best). Returns whether it did."""
        if not self.resuming or self.checkpoint is None or self.evaluator is None:
            return False
        position, epoch = trainer.position, trainer.position.epoch - 1
        stored = self.checkpoint.get("metrics")
        evaluated = isinstance(stored, dict) and stored.get("epoch") == epoch
        if position.batch_in_epoch != 0 or epoch not in self.config.evaluation_epochs or evaluated:
            return False
        self.logger.info(f"the evaluation after epoch {epoch} did not finish (interrupted): evaluating it now")
        metrics = self.evaluate_after(trainer, epoch, loader, stop)
        self.save_epoch(trainer, epoch, metrics)
        return True

    def freeze_backbone(self, epoch: int) -> None:
        """The trunk frozen for epochs < freeze_backbone_epochs (a function of the epoch: resume is exact)."""
        change = set_backbone_frozen(self.model, epoch, self.config.freeze_backbone_epochs, self.ctx.distributed)
        if change:
            self.logger.info(change)

    def evaluate_after(self, trainer: Trainer, epoch: int, loader: Any, stop: StopFlag) -> CocoMetrics:
        """The scheduled evaluation after ``epoch``; a signal during it saves the epoch and stops."""
        try:
            return self.evaluate(epoch, trainer.position.last_iteration, loader, stop)
        except EvaluationInterrupted as stopped:
            path = self.save_epoch(trainer, epoch, None)
            where = f"; epoch {epoch}'s checkpoint written to {path} (to continue: resume)" if path else ""
            message = f"stopped by signal during the evaluation after epoch {epoch}{where}"
            self.logger.info(message)
            raise TrainingInterrupted(message, stop.signal_number or stopped.signal_number,
                                      fields=("resume",) if path else ()) from None

    def save_epoch(self, trainer: Trainer, epoch: int, metrics: Optional[CocoMetrics]) -> Optional[Path]:
        """The epoch's checkpoint (with its metrics when evaluated) through the run folder, which
        also points the last (and, when its AP is the run's best so far, the best) checkpoint at it;
        then pruning to ``keep_last``. None where nothing is written (no folder, not rank 0)."""
        improved = metrics is not None and (self.best is None or metrics.ap > float(self.best["AP"]))
        if improved and metrics is not None:
            self.best = {"epoch": epoch, "AP": metrics.ap, "AP50": metrics.ap50}
        if self.checkpoints is None or not self.ctx.is_main:
            return None
        extra: dict[str, Any] = {}
        if metrics is not None:
            extra["metrics"] = {"epoch": epoch, **metrics.as_dict()}
        path = self.checkpoints.save_epoch(epoch, {**self.state(trainer), **extra}, best=improved)
        if improved and self.best is not None:
            self.logger.info(f"best so far (AP {self.best['AP']:.4f}, epoch {epoch}): "
                             f"{self.checkpoints.checkpoint(BEST)}")
        removed = self.checkpoints.prune_epochs(self.config.keep_last)
        self.result.checkpoint = path
        self.logger.info(f"checkpoint: {path}" + (f" (removed {', '.join(p.name for p in removed)}: "
                                                   f"keep_last {self.config.keep_last})" if removed else ""))
        return path

    def interrupted(self, trainer: Trainer, signal_number: int) -> TrainingInterrupted:
        """A signal stopped an epoch: its state as the run folder's interrupted checkpoint (rank 0)."""
        position = trainer.position
        message = f"stopped by signal after iteration {position.last_iteration} (epoch {position.epoch})"
        fields: tuple[str, ...] = ()
        if self.checkpoints is not None and self.ctx.is_main:
            path = self.checkpoints.save_interrupted(self.state(trainer))
            message += (f"; state written to {path} (to continue: resume with save {self.checkpoints.path}, "
                        f"or checkpoint {path})")
            fields = ("resume", "save", "checkpoint")
        self.logger.info(message)
        return TrainingInterrupted(message, signal_number, fields=fields)

    def state(self, trainer: Trainer) -> dict[str, Any]:
        """The checkpoint's content: the trainer's state (with its loss history) and the run's
        evaluation history (``best``, ``evaluations``), so a resume continues both."""
        return {**trainer.state_dict(), "best": self.best, "evaluations": plain_data(self.result.evaluations)}

    # ------------------------------------------------------------------ results

    def write_curves(self, trainer: Trainer) -> None:
        if self.outputs is not None and self.ctx.is_main and trainer.loss_history:
            path = plot_curves(trainer.loss_history, self.result.evaluations, self.outputs.curves_file)
            self.logger.info(f"loss and mAP curves: {path}")

    def write_summary(self) -> None:
        result = self.result
        result.summary = {"mode": self.config.mode, "seed": self.seed, "backbone": self.spec.backbone,
                          "world_size": self.ctx.world_size, "precision": self.runtime.precision,
                          "runtime": self.runtime.describe(), "evaluations": result.evaluations, **result.benchmark}
        if result.loss_history:
            result.summary["final_loss"] = result.loss_history[-1][1]
            result.summary["iterations"] = result.loss_history[-1][0] + 1  # a count; the history is 0-based
        if result.evaluations:
            result.summary.update(AP=result.last_metrics["AP"], AP50=result.last_metrics["AP50"])
        if self.summary_path is not None and self.ctx.is_main:
            write_json(self.summary_path, result.summary)
