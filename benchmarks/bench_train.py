"""Training throughput on the CPU: fp32 vs bf16 autocast, NCHW vs channels-last, ResNet-18/50.

One full training step each (box encoding, forward, loss, backward, SGD), on a fixed batch of
random images with synthetic boxes so that data loading is excluded. Medians over a few steps
after warmup; ratios are against fp32 NCHW of the same backbone, measured in this process.

    .venv/bin/python benchmarks/bench_train.py [--batch-size 4] [--iterations 3]
"""

from __future__ import annotations

import argparse

import torch

from ssd300.data.loaders import Batch
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.runtime import Runtime
from ssd300.trainer import Trainer

from common import time_interleaved


def make_batch(batch_size: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 300, 300), dtype=torch.uint8, generator=generator)
    corners = torch.rand(batch_size, 2, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.3 + 0.2 * torch.rand(batch_size, 2, 2, generator=generator)], dim=2)
    return Batch(images=images, boxes=boxes.clamp(0, 1), labels=torch.ones(batch_size, 2, dtype=torch.int64),
                 num_boxes=torch.full((batch_size,), 2), image_ids=torch.arange(batch_size),
                 image_sizes=torch.full((batch_size, 2), 300), is_padding=torch.zeros(batch_size, dtype=torch.bool))


def make_trainer(backbone: str, bf16: bool, channels_last: bool) -> Trainer:
    torch.manual_seed(0)
    model = SSD300(backbone, num_classes=4)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    # bf16_available=True forces bf16 where it is emulated too (measured once, to show how slow it is).
    runtime = Runtime.resolve("cpu", amp=bf16, channels_last=channels_last, bf16_available=True)
    return Trainer.build(model, runtime=runtime, label_map=LabelMap.generic(4), learning_rate=1e-3, multistep=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    args = parser.parse_args()
    batch = make_batch(args.batch_size)
    policy = Runtime.resolve("cpu", amp=True)
    print(f"CPU training step, batch {args.batch_size}; the commands' policy here: {policy.describe()}; "
          f"configurations interleaved round by round so machine load hits them alike\n")
    print("| backbone | precision | layout | images/s (median) | vs fp32 NCHW |")
    print("|---|---|---|---|---|")
    variants = ((False, False), (False, True), (True, False), (True, True))
    for backbone in args.backbones:
        trainers = {v: make_trainer(backbone, *v) for v in variants}
        steps = {str(v): (lambda trainer=trainer: trainer.train_step(batch)) for v, trainer in trainers.items()}
        # Emulated bf16 is ~10x slower: one timed step is enough.
        once = {str(v): 1 for v in variants if v[0] and not policy.native_bf16}
        times = time_interleaved(steps, args.iterations, warmup=args.warmup, max_samples=once)
        baseline = len(batch) / times[str((False, False))].median
        for bf16, channels_last in variants:
            rate = len(batch) / times[str((bf16, channels_last))].median
            print(f"| {backbone} | {'bf16 autocast' if bf16 else 'fp32'} | "
                  f"{'channels_last' if channels_last else 'NCHW'} | {rate:.2f} | {rate / baseline:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
