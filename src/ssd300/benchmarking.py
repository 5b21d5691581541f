"""Throughput loops of the ``benchmark-training`` / ``benchmark-inference`` modes: images/s."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
from torch import nn

from ssd300.checkpoint import unwrap_model
from ssd300.default_boxes import default_boxes_300
from ssd300.distributed import DistributedContext, all_reduce_sum
from ssd300.postprocess import COCO_EVAL, PostProcessor
from ssd300.runtime import Runtime
from ssd300.trainer import Trainer


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
def benchmark_inference(model: nn.Module, loader: Any, *, ctx: DistributedContext, runtime: Runtime,
                        warmup: int, iterations: int, channels_last: bool) -> dict[str, float]:
    """Inference images/s: forward only, and end-to-end (host->device copy + forward + decode/NMS)."""
    model = unwrap_model(model).eval()
    postprocessor = PostProcessor(default_boxes_300().to(ctx.device), COCO_EVAL)
    batches = _cycle(loader)
    host_batches = [next(batches) for _ in range(max(1, min(iterations, 8)))]
    device_batches = [b.to(ctx.device, channels_last=channels_last) for b in host_batches]

    def forward_only(i: int) -> int:
        batch = device_batches[i % len(device_batches)]
        with runtime.autocast():
            model(batch.images)
        return len(batch)

    def end_to_end(i: int) -> int:
        batch = host_batches[i % len(host_batches)].to(ctx.device, non_blocking=True, channels_last=channels_last)
        with runtime.autocast():
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


def format_benchmark(kind: str, figures: dict[str, float]) -> str:
    """One log line of a benchmark mode's figures: ``benchmark-<kind>: name value, ...``."""
    parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
    return f"benchmark-{kind}: " + ", ".join(parts)
