"""One training run's mutable state and loop: steps, epochs, position, checkpoints, the NaN guard, signals.

The :class:`Trainer` owns model, optimizer, schedule, gradient scaler and position. Its position is
``(epoch, batch_in_epoch, iteration)``; because every sample's augmentation comes from
``(seed, epoch, index)`` and the schedule is a pure function of the position, restoring a
checkpoint and skipping ``batch_in_epoch`` batches reproduces a straight run. Precision and memory
format come from the :class:`~ssd300.runtime.Runtime`.

Numbering (README, "Epoch numbering"): epochs and iterations from 0. Iteration ``n`` is the
``n+1``-th optimizer step; ``loss_history`` holds ``(iteration, loss)`` of every step done.

History: a checkpoint keeps ``loss_history`` (and, from the run, its ``evaluations`` and ``best``:
:func:`stored_history` reads them back), so a resumed run's curves and summary cover the whole run.
The checkpoint rather than ``log.jsonl``, because it is written atomically together with the
state it describes: a crash (even SIGKILL mid-epoch) leaves history and state consistent, with no
records of steps the resume redoes, and nothing depends on ``log_interval``, on a ``log_file``
elsewhere, or on the folder (a resume may save elsewhere). Cost: 16 bytes a step (3.8 MB for the
65-epoch COCO recipe's 240k steps; small beside the weights and the optimizer's momentum).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssd300.batchnorm import set_frozen_batchnorm
from ssd300.box_coder import BoxCoder
from ssd300.checkpoint import model_checkpoint, save_checkpoint
from ssd300.data.coco import skipped_summary
from ssd300.default_boxes import default_boxes_300
from ssd300.distributed import DistributedContext, capture_rng_state, restore_rng_state
from ssd300.errors import EXIT_DIVERGED, Interrupted, UserInputError
from ssd300.files import PathLike, json_ready
from ssd300.labels import LabelMap
from ssd300.logging_utils import RunLogger
from ssd300.loss import SSDLoss
from ssd300.optim import (
    DEFAULT_MOMENTUM,
    DEFAULT_MULTISTEP,
    DEFAULT_WARMUP,
    DEFAULT_WEIGHT_DECAY,
    WarmupMultiStepSchedule,
    build_optimizer,
)
from ssd300.runtime import Runtime


class NonFiniteLossError(UserInputError):
    """The loss became NaN/inf; the message names the iteration. Lower ``learning_rate`` or raise ``warmup``.

    Its own exit code (3, :data:`ssd300.errors.EXIT_DIVERGED`): not a usage error."""

    exit_code = EXIT_DIVERGED


class TrainingInterrupted(Interrupted):
    """SIGINT/SIGTERM arrived (the run writes a checkpoint first when it has a run folder).
    ``exit_code``: 130 for SIGINT, 143 for SIGTERM. ``fields``: the config fields the message
    names (as :class:`~ssd300.errors.UserInputError`'s), so the CLI can write them as flags."""

    def __init__(self, message: str = "interrupted", signal_number: int = signal.SIGINT, *,
                 fields: tuple[str, ...] = ()) -> None:
        super().__init__(message, signal_number)
        self.fields = tuple(fields)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a checkpoint can be written first.

    A second signal while stopping raises :class:`~ssd300.errors.Interrupted` at once.
    """

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_number is not None:
            raise Interrupted("stopped at once by a second signal", signum)
        self.signal_number = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None


@dataclass
class TrainPosition:
    epoch: int = 0            # the epoch being run (== number of completed epochs between epochs)
    batch_in_epoch: int = 0   # batches of ``epoch`` already done
    iteration: int = 0        # global optimizer steps done (== the 0-based number of the next one)

    @property
    def last_iteration(self) -> int:
        """The 0-based number of the last step done (-1 before any): what records after a step name."""
        return self.iteration - 1


@dataclass
class Trainer:
    """Built with :meth:`Trainer.build` (the recipe's defaults); the fields stay open for tests
    that swap one collaborator (e.g. ``loss_fn``)."""

    model: nn.Module                      # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    schedule: WarmupMultiStepSchedule
    box_coder: BoxCoder
    runtime: Runtime
    ctx: DistributedContext
    label_map: LabelMap
    logger: RunLogger
    loss_fn: nn.Module = field(default_factory=SSDLoss)
    frozen_batchnorm: bool = False
    run_args: dict[str, Any] = field(default_factory=dict)
    position: TrainPosition = field(default_factory=TrainPosition)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    scaler: Optional[torch.amp.GradScaler] = None  # from the runtime (fp16 only) unless given

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = self.runtime.grad_scaler()

    @classmethod
    def build(cls, model: nn.Module, *, runtime: Runtime, label_map: LabelMap, learning_rate: float,
              momentum: float = DEFAULT_MOMENTUM, weight_decay: float = DEFAULT_WEIGHT_DECAY,
              warmup: int = DEFAULT_WARMUP, multistep: Sequence[int] = DEFAULT_MULTISTEP,
              optimizer: str = "sgd", schedule: str = "multistep", total_iterations: int = 0,
              ctx: Optional[DistributedContext] = None, logger: Optional[RunLogger] = None,
              frozen_batchnorm: bool = False, run_args: Optional[dict[str, Any]] = None) -> "Trainer":
        """The one way to wire a Trainer: the reference's SGD (decay on weights only), its warmup +
        multistep schedule and the 300x300 default boxes on the run's device.

        ``learning_rate`` is the rate actually used (already scaled for the global batch:
        :func:`ssd300.optim.scaled_learning_rate`). ``optimizer="adamw"`` and ``schedule="cosine"``
        (over ``total_iterations``) are the short-run alternatives of :mod:`ssd300.optim`.
        ``ctx`` defaults to one process on ``runtime.device``; ``logger`` to a silent one.
        """
        ctx = ctx if ctx is not None else DistributedContext(device=runtime.device)
        return cls(model=model, optimizer=build_optimizer(model, learning_rate, momentum, weight_decay, optimizer),
                   schedule=WarmupMultiStepSchedule(learning_rate, warmup, tuple(multistep), kind=schedule,
                                                    total_iterations=total_iterations),
                   box_coder=BoxCoder(default_boxes_300().to(ctx.device)), runtime=runtime, ctx=ctx,
                   label_map=label_map, logger=logger if logger is not None else RunLogger(enabled=False),
                   frozen_batchnorm=frozen_batchnorm, run_args=dict(run_args or {}))

    @property
    def channels_last(self) -> bool:
        return self.runtime.channels_last(training=True)

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, batch: Any, stop: Optional[StopFlag] = None) -> tuple[float, bool]:
        """One optimizer step; returns (loss averaged over ranks, stop requested on any rank)."""
        device = self.ctx.device
        batch = batch.to(device, non_blocking=True, channels_last=self.channels_last)
        lr = self.schedule.apply(self.optimizer, self.position.epoch, self.position.iteration)
        with torch.no_grad():
            loc_targets, labels = self.box_coder.encode(batch.boxes, batch.labels, batch.num_boxes)
        with self.runtime.autocast():
            locs, logits = self.model(batch.images)
        loss = self.loss_fn(locs, logits, loc_targets, labels)

        # Ranks must agree on stopping (NaN or a signal) at the same step, or the others would hang
        # in the next all-reduce; the flags ride on one small all-reduce with the loss.
        flags = torch.stack([loss.detach().float(),
                             torch.tensor(float(stop.requested if stop else 0.0), device=loss.device)])
        work = dist.all_reduce(flags, async_op=True) if self.ctx.distributed else None

        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if work is not None:
            work.wait()
        loss_value, stop_votes = flags.tolist()  # syncs; GradScaler.step would sync here anyway
        loss_value /= self.ctx.world_size
        if not np.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {self.position.iteration} (epoch {self.position.epoch}, "
                f"learning rate {lr:.3g}); stopped without updating the weights or writing a checkpoint; "
                "try a lower learning_rate or a longer warmup", fields=("learning_rate", "warmup"))
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.position.iteration += 1
        self.position.batch_in_epoch += 1
        return loss_value, stop_votes > 0

    # -- epochs ------------------------------------------------------------------------------

    def train_epoch(self, loader: Any, total_epochs: int, stop: Optional[StopFlag] = None) -> None:
        epoch = self.position.epoch
        loader.set_epoch(epoch)
        self.model.train()
        if self.frozen_batchnorm:
            set_frozen_batchnorm(self.model)
        iterations = len(loader)
        skip = self.position.batch_in_epoch
        batches: Iterable[Any] = islice(iter(loader), skip, None) if skip else loader
        self.logger.start_epoch(epoch, total_epochs, iterations, initial=skip)
        tick = time.perf_counter()
        skipped: list[str] = []
        for batch in batches:
            batch_size = len(batch)
            skipped.extend(batch.skipped)
            loss, stop_now = self.train_step(batch, stop)
            now = time.perf_counter()
            images_per_second = batch_size * self.ctx.world_size / max(now - tick, 1e-9)
            tick = now
            self.loss_history.append((self.position.last_iteration, loss))
            self.logger.step(epoch=epoch, iteration=self.position.last_iteration,
                             batch_in_epoch=self.position.batch_in_epoch - 1, iterations_in_epoch=iterations,
                             loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                             images_per_second=images_per_second)
            if stop_now:  # the position stays mid-epoch: the run writes it as its interrupted checkpoint
                self.logger.end_epoch()
                raise TrainingInterrupted(f"stopped by signal after iteration {self.position.last_iteration}",
                                          stop.signal_number if stop and stop.signal_number else signal.SIGINT)
        self.logger.end_epoch()
        if skipped:  # this rank's; each was also logged when it happened
            self.logger.info(f"epoch {epoch}: {skipped_summary(skipped)}")
        self.position.epoch += 1
        self.position.batch_in_epoch = 0

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Reference keys (model, epoch, iteration, optimizer, scheduler, label_map) plus ours."""
        return model_checkpoint(
            self.model, self.label_map,
            epoch=self.position.epoch,
            iteration=self.position.iteration,
            batch_in_epoch=self.position.batch_in_epoch,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            args=_plain_args(self.run_args),
            rng=capture_rng_state(),
            loss_history=history_tensor(self.loss_history),
        )

    def save(self, path: PathLike, **extra: Any) -> Path:
        """Atomically write this state (plus ``extra`` entries, plain data) to the file ``path``.
        A training run's checkpoints go through :class:`~ssd300.run_folder.RunFolder` instead."""
        save_checkpoint(path, {**self.state_dict(), **extra})
        return Path(path)

    def load_training_state(self, checkpoint: dict[str, Any]) -> bool:
        """Restore optimizer, schedule, scaler, position and RNG from a checkpoint (weights are
        loaded separately). Returns False for a weights-only checkpoint (fine-tuning starts at 0)."""
        if "optimizer" not in checkpoint:
            return False
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as err:
            raise UserInputError(f"checkpoint: its optimizer state does not fit this model/recipe ({err})",
                                 fields=("checkpoint",)) from None
        if isinstance(checkpoint.get("scheduler"), dict):
            self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.position = TrainPosition(epoch=int(checkpoint.get("epoch", 0)),
                                      batch_in_epoch=int(checkpoint.get("batch_in_epoch", 0)),
                                      iteration=int(checkpoint.get("iteration", 0)))
        if isinstance(checkpoint.get("rng"), dict):
            restore_rng_state(checkpoint["rng"])
        # the steps before this position (a checkpoint written before the history was kept: none)
        self.loss_history = [(i, loss) for i, loss in history_list(checkpoint.get("loss_history"))
                             if i < self.position.iteration]
        return True


def history_tensor(history: Sequence[tuple[int, float]]) -> torch.Tensor:
    """``(iteration, loss)`` pairs as one float64 ``(N, 2)`` tensor: compact in a checkpoint
    (8 bytes a number, not a pickled tuple) and exact for iterations below 2**53."""
    return torch.tensor(history, dtype=torch.float64).reshape(-1, 2)


def history_list(stored: Any) -> list[tuple[int, float]]:
    """:func:`history_tensor`'s pairs back; anything else (missing, malformed) is no history."""
    if not isinstance(stored, torch.Tensor) or stored.dim() != 2 or stored.shape[1] != 2:
        return []
    return [(int(i), float(loss)) for i, loss in stored.to(torch.float64).tolist()]


def _plain_args(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as plain data (paths -> str) so the checkpoint stays weights_only-loadable."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            out[key] = value
    return out


def stored_history(checkpoint: dict[str, Any]) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """A training checkpoint's ``best`` and ``evaluations`` (of epochs before its position); what is
    missing or malformed (a checkpoint from before the history was kept) is no history."""
    completed = int(checkpoint.get("epoch", 0))
    best = checkpoint.get("best")
    if not (isinstance(best, dict) and isinstance(best.get("epoch"), int) and isinstance(best.get("AP"), float)):
        best = None
    stored = checkpoint.get("evaluations")
    evaluations = [e for e in stored if isinstance(e, dict) and isinstance(e.get("epoch"), int)
                   and e["epoch"] < completed] if isinstance(stored, list) else []
    return best, evaluations


def plain_data(value: Any) -> Any:
    """``value`` as plain Python data (numpy scalars to numbers), so a checkpoint holding it stays
    ``weights_only``-loadable."""
    return json.loads(json.dumps(json_ready(value), default=lambda o: o.item() if hasattr(o, "item") else str(o)))
