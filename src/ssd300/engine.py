"""Training, evaluation and benchmark loops; checkpoints and exact resume; the NaN guard.

The :class:`Trainer` owns one training run's mutable state (model, optimizer, schedule, gradient
scaler, position). Its position is ``(epoch, batch_in_epoch, iteration)``; because every sample's
augmentation comes from ``(seed, epoch, index)`` and the schedule is a pure function of the
position, restoring a checkpoint and skipping ``batch_in_epoch`` batches reproduces a straight run.

Precision: ``amp`` means fp16 autocast + GradScaler on CUDA, bf16 autocast (no scaler) on CPU.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssd300.box_coder import BoxCoder
from ssd300.checkpoint import model_checkpoint, save_checkpoint
from ssd300.coco_eval import CocoMetrics, detections_to_rows, evaluate_results, merge_rank_rows, rows_to_results, \
    write_results_json
from ssd300.distributed import DistributedContext, all_gather_objects, all_reduce_sum, broadcast_object, \
    capture_rng_state, restore_rng_state
from ssd300.errors import UserInputError
from ssd300.labels import LabelMap
from ssd300.logging_utils import RunLogger
from ssd300.loss import SSDLoss
from ssd300.optim import WarmupMultiStepSchedule
from ssd300.postprocess import PostProcessor


class NonFiniteLossError(UserInputError):
    """The loss became NaN/inf; the message names the iteration. Lower --lr or raise --warmup."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was written (when a save directory is set)."""


# ----------------------------------------------------------------------------- precision


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and the gradient scaler (CUDA fp16 only)."""

    device_type: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> "Precision":
        """fp16 + scaler on CUDA; bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32.

        Without native support bf16 is emulated and ~10x slower than fp32 (measured on an AVX2
        EPYC), so AMP on such a CPU falls back to fp32.
        """
        if not amp:
            return cls(device.type, None, None)
        if device.type == "cuda":
            return cls("cuda", torch.float16, torch.amp.GradScaler("cuda"))
        if device.type == "cpu" and not cpu_has_native_bf16():
            return cls(device.type, None, None)
        return cls(device.type, torch.bfloat16, None)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16 (AMP)", torch.bfloat16: "bf16 (AMP)"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (x86 AVX512-BF16 or AMX-BF16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_channels_last(device: torch.device) -> bool:
    """channels_last on CUDA (tensor cores); on CPU contiguous NCHW trains ~4x faster in our
    measurements (oneDNN's NHWC backward is slow on AVX2), so it is the CPU default."""
    return device.type == "cuda"


def configure_backends(device: torch.device, allow_tf32: bool) -> None:
    """TF32 matmuls/convolutions on Ampere+ when allowed; cuDNN autotuning for the fixed 300x300 input."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def set_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers use (and keep) their running statistics; their affine weights still train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], device: torch.device,
                          channels_last: bool = False) -> int:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` ("precise BN").

    After a short run the running averages (momentum 0.1) lag behind weights that still move
    fast, so evaluation-mode outputs disagree with training-mode ones; a few forward passes with
    the final weights fix that. Returns the number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average == exact mean over the batches
    model.train()
    count = 0
    for batch in batches:
        batch = batch.to(device, non_blocking=True, channels_last=channels_last)
        model(batch.images)
        count += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count


# ----------------------------------------------------------------------------- signals


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a checkpoint can be written first.

    A second signal while stopping raises KeyboardInterrupt at once.
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
            raise KeyboardInterrupt
        self.signal_number = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None


# ----------------------------------------------------------------------------- trainer


@dataclass
class TrainPosition:
    epoch: int = 0            # the epoch being run (== number of completed epochs between epochs)
    batch_in_epoch: int = 0   # batches of ``epoch`` already done
    iteration: int = 0        # global optimizer steps done


@dataclass
class Trainer:
    model: nn.Module                      # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    schedule: WarmupMultiStepSchedule
    box_coder: BoxCoder
    precision: Precision
    ctx: DistributedContext
    label_map: LabelMap
    logger: RunLogger
    loss_fn: nn.Module = field(default_factory=SSDLoss)
    channels_last: bool = True
    frozen_batchnorm: bool = False
    save_dir: Optional[Path] = None
    run_args: dict[str, Any] = field(default_factory=dict)
    position: TrainPosition = field(default_factory=TrainPosition)
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, batch: Any, stop: Optional[StopFlag] = None) -> tuple[float, bool]:
        """One optimizer step; returns (loss averaged over ranks, stop requested on any rank)."""
        device = self.ctx.device
        batch = batch.to(device, non_blocking=True, channels_last=self.channels_last)
        lr = self.schedule.apply(self.optimizer, self.position.epoch, self.position.iteration)
        with torch.no_grad():
            loc_targets, labels = self.box_coder.encode(batch.boxes, batch.labels, batch.num_boxes)
        with self.precision.autocast():
            locs, logits = self.model(batch.images)
        loss = self.loss_fn(locs, logits, loc_targets, labels)

        # Ranks must agree on stopping (NaN or a signal) at the same step, or the others would hang
        # in the next all-reduce; the flags ride on one small all-reduce with the loss.
        flags = torch.stack([loss.detach().float(),
                             torch.tensor(float(stop.requested if stop else 0.0), device=loss.device)])
        work = dist.all_reduce(flags, async_op=True) if self.ctx.distributed else None

        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if work is not None:
            work.wait()
        loss_value, stop_votes = flags.tolist()  # syncs; GradScaler.step would sync here anyway
        loss_value /= self.ctx.world_size
        if not np.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {self.position.iteration} (epoch {self.position.epoch + 1}, "
                f"learning rate {lr:.3g}); stopped without updating the weights or writing a checkpoint; "
                "try a lower --lr or a longer --warmup")
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
        for batch in batches:
            batch_size = len(batch)
            loss, stop_now = self.train_step(batch, stop)
            now = time.perf_counter()
            images_per_second = batch_size * self.ctx.world_size / max(now - tick, 1e-9)
            tick = now
            self.loss_history.append((self.position.iteration, loss))
            self.logger.step(epoch=epoch, iteration=self.position.iteration - 1,
                             batch_in_epoch=self.position.batch_in_epoch - 1, iterations_in_epoch=iterations,
                             loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                             images_per_second=images_per_second)
            if stop_now:
                self.logger.end_epoch()
                path = self.save("interrupted.pt")
                where = f"; checkpoint written to {path} (resume with --checkpoint {path})" if path else ""
                message = f"stopped by signal at iteration {self.position.iteration}{where}"
                self.logger.info(message)
                raise TrainingInterrupted(message)
        self.logger.end_epoch()
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
            scaler=self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
            args=_plain_args(self.run_args),
            rng=capture_rng_state(),
        )

    def save(self, name: str) -> Optional[Path]:
        """Atomically write a checkpoint into the save directory (main rank only)."""
        if self.save_dir is None or not self.ctx.is_main:
            return None
        path = self.save_dir / name
        save_checkpoint(path, self.state_dict())
        return path

    def load_training_state(self, checkpoint: dict[str, Any]) -> bool:
        """Restore optimizer, schedule, scaler, position and RNG from a checkpoint (weights are
        loaded separately). Returns False for a weights-only checkpoint (fine-tuning starts at 0)."""
        if "optimizer" not in checkpoint:
            return False
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as err:
            raise UserInputError(f"--checkpoint: its optimizer state does not fit this model/recipe ({err})") from None
        if isinstance(checkpoint.get("scheduler"), dict):
            self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.precision.scaler is not None and checkpoint.get("scaler"):
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.position = TrainPosition(epoch=int(checkpoint.get("epoch", 0)),
                                      batch_in_epoch=int(checkpoint.get("batch_in_epoch", 0)),
                                      iteration=int(checkpoint.get("iteration", 0)))
        if isinstance(checkpoint.get("rng"), dict):
            restore_rng_state(checkpoint["rng"])
        return True


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


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_rows(model: nn.Module, loader: Iterable[Any], postprocessor: PostProcessor, precision: Precision,
                 device: torch.device, category_ids: tuple[int, ...], channels_last: bool = True,
                 progress: Optional[Callable[[int], None]] = None) -> tuple[list[int], np.ndarray, list[str]]:
    """Run the model over ``loader``; returns this rank's (image ids, result rows, skipped images)."""
    model.eval()
    image_ids: list[int] = []
    chunks: list[np.ndarray] = []
    skipped: list[str] = []
    for batch in loader:
        skipped.extend(batch.skipped)
        batch = batch.without_padding()
        if len(batch) == 0:
            continue
        batch = batch.to(device, non_blocking=True, channels_last=channels_last)
        with precision.autocast():
            locs, logits = model(batch.images)
        detections = postprocessor(locs.float(), logits.float())
        ids = batch.image_ids.tolist()
        chunks.append(detections_to_rows([d.boxes for d in detections], [d.scores for d in detections],
                                         [d.labels for d in detections], ids, batch.image_sizes.cpu(),
                                         category_ids))
        image_ids.extend(ids)
        if progress is not None:
            progress(len(ids))
    rows = np.concatenate(chunks) if chunks else np.zeros((0, 7))
    return image_ids, rows, skipped


def evaluate(model: nn.Module, loader: Iterable[Any], coco_gt: Any, label_map: LabelMap, *,
             ctx: DistributedContext, precision: Precision, channels_last: bool = True,
             results_path: Optional[Path] = None, iou_threshold: float = 0.5,
             log: Optional[Callable[[str], None]] = None) -> CocoMetrics:
    """COCO evaluation over ``loader`` (all ranks take part); every rank returns the same metrics.

    Post-processing uses IoU 0.5 for NMS as the reference's evaluation does (SPEC §5).
    ``coco_gt`` is only needed on the main rank.
    """
    from ssd300.default_boxes import default_boxes_300

    postprocessor = PostProcessor(default_boxes_300().to(ctx.device), iou_threshold=iou_threshold)
    image_ids, rows, skipped = predict_rows(unwrap(model), loader, postprocessor, precision, ctx.device,
                                            label_map.category_ids, channels_last)
    gathered = all_gather_objects((image_ids, rows, skipped))
    metrics: Optional[CocoMetrics] = None
    if ctx.is_main:
        ids, merged = merge_rank_rows((g[0], g[1]) for g in gathered)
        results = rows_to_results(merged)
        if results_path is not None:
            write_results_json(results, results_path)
        all_skipped = [s for g in gathered for s in g[2]]
        if all_skipped and log is not None:
            log(f"evaluation skipped {len(all_skipped)} unreadable images, e.g. {all_skipped[0]}")
        metrics = evaluate_results(coco_gt, results, image_ids=ids)
    return broadcast_object(metrics)


# ----------------------------------------------------------------------------- benchmarks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(loader: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def benchmark_training(trainer: Trainer, loader: Any, *, warmup: int, iterations: int) -> dict[str, float]:
    """Training images/s after ``warmup`` steps, summed over ranks (data loading included, as the
    reference measures it)."""
    trainer.model.train()
    batches = _cycle(loader)
    for _ in range(warmup):
        trainer.train_step(next(batches))
    _sync(trainer.ctx.device)
    images = 0
    start = time.perf_counter()
    for _ in range(iterations):
        batch = next(batches)
        images += len(batch)
        trainer.train_step(batch)
    _sync(trainer.ctx.device)
    elapsed = time.perf_counter() - start
    per_rank = images / elapsed
    total = all_reduce_sum(per_rank, trainer.ctx.device)
    return {"images_per_second": total, "images_per_second_per_rank": per_rank,
            "iterations": iterations, "batch_size": images / max(iterations, 1), "seconds": elapsed}


@torch.no_grad()
def benchmark_inference(model: nn.Module, loader: Any, *, ctx: DistributedContext, precision: Precision,
                        warmup: int, iterations: int, channels_last: bool = True) -> dict[str, float]:
    """Inference images/s: forward only, and end-to-end (host->device copy + forward + decode/NMS)."""
    from ssd300.default_boxes import default_boxes_300

    model = unwrap(model).eval()
    postprocessor = PostProcessor(default_boxes_300().to(ctx.device), iou_threshold=0.5)
    batches = _cycle(loader)
    host_batches = [next(batches) for _ in range(max(1, min(iterations, 8)))]
    device_batches = [b.to(ctx.device, channels_last=channels_last) for b in host_batches]

    def forward_only(i: int) -> int:
        batch = device_batches[i % len(device_batches)]
        with precision.autocast():
            model(batch.images)
        return len(batch)

    def end_to_end(i: int) -> int:
        batch = host_batches[i % len(host_batches)].to(ctx.device, non_blocking=True, channels_last=channels_last)
        with precision.autocast():
            locs, logits = model(batch.images)
        detections = postprocessor(locs.float(), logits.float(), batch.image_sizes)
        if detections:
            detections[-1].boxes.cpu()  # results on the host, as a user gets them
        return len(batch)

    results: dict[str, float] = {}
    for name, fn in (("forward", forward_only), ("end_to_end", end_to_end)):
        for i in range(warmup):
            fn(i)
        _sync(ctx.device)
        start, images = time.perf_counter(), 0
        for i in range(iterations):
            images += fn(i)
        _sync(ctx.device)
        elapsed = time.perf_counter() - start
        results[f"{name}_images_per_second"] = images / elapsed
        results[f"{name}_latency_ms"] = 1000.0 * elapsed / max(iterations, 1)
    results["batch_size"] = len(host_batches[0])
    return results
