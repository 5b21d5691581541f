"""Convergence on a tiny fixed problem, in fp32 and in bf16: the loop, the loss and the model learn.

Two images, no augmentation, batch 2: every step sees the same batch, so the loss must fall and
AP50 on those images must rise. The learning rate is inside the stable range on purpose: at 0.03
(the old test) SGD with momentum 0.9 sat at the edge of instability, with loss spikes to several
times the starting loss (29.8 -> 264 at step 9 on one run) whose timing depends on float rounding,
so whether step 16 happened to be low was luck of the CPU's kernels (it failed on an AVX-512
machine, default and ATEN_CPU_CAPABILITY=avx2, and passed on an AVX2-only one). At 0.01 the loss
falls steadily: checked over model seeds 0-4, default and ATEN_CPU_CAPABILITY=avx2, the median of
the last 3 losses ends 9-30x below the first (asserted: 5x) and AP50 goes 0 -> 0.75-1.0.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ONE_LARGE_OBJECT

from ssd300.batchnorm import recalibrate_batchnorm
from ssd300.coco_eval import load_coco_ground_truth
from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_eval_loader, build_train_loader
from ssd300.data.transforms import TrainTransform
from ssd300.distributed import DistributedContext
from ssd300.evaluation import evaluate_model
from ssd300.model import SSD300
from ssd300.runtime import Runtime, native_bf16
from ssd300.trainer import Trainer

pytestmark = pytest.mark.slow  # training runs to convergence

STEPS = 16
LEARNING_RATE = 0.01
WARMUP = 3
TAIL = 3  # the bound is on the median of the last TAIL losses, not on one step


@dataclass
class Run:
    losses: list[float]
    ap_before: float
    ap_after: float


@pytest.fixture(scope="module")
def two_images(synthetic_dataset) -> Path:
    return synthetic_dataset(num_train=2, num_val=1, seed=0, **ONE_LARGE_OBJECT)


def _ap50(model: torch.nn.Module, root: Path, dataset: CocoDetection, runtime: Runtime) -> float:
    loader = build_eval_loader(CocoDetection(root / "train", dataset.annotation_file, train=False,
                                             label_map=dataset.label_map), 2, num_workers=0)
    metrics = evaluate_model(model, loader, load_coco_ground_truth(dataset.annotation_file), dataset.label_map,
                             ctx=DistributedContext(), runtime=runtime,
                             channels_last=runtime.channels_last(training=False))
    return metrics.ap50


def overfit(root: Path, amp: bool = False, seed: int = 0) -> Run:
    """Train a resnet18 SSD on the two images for STEPS steps under the runtime policy for ``amp``
    on this CPU (bf16 autocast + channels-last where bf16 is native, else fp32 NCHW)."""
    dataset = CocoDetection(root / "train", root / "annotations" / "instances_train.json", train=True,
                            transform=TrainTransform(crop=False, flip=False, color=False))
    runtime = Runtime.resolve("cpu", amp=amp)
    torch.manual_seed(seed)
    model = SSD300("resnet18", num_classes=dataset.label_map.num_classes).to(memory_format=runtime.memory_format(True))
    trainer = Trainer.build(model, runtime=runtime, label_map=dataset.label_map, learning_rate=LEARNING_RATE,
                            warmup=WARMUP, multistep=[1000])
    loader = build_train_loader(dataset, 2, num_workers=0, seed=0)
    ap_before = _ap50(model, root, dataset, runtime)
    for _ in range(STEPS):
        trainer.train_epoch(loader, total_epochs=STEPS)
    assert trainer.position.iteration == STEPS
    # 16 steps leave the BatchNorm running averages far behind the weights: recompute them.
    assert recalibrate_batchnorm(model, loader, torch.device("cpu"), channels_last=trainer.channels_last) == 1
    return Run([loss for _, loss in trainer.loss_history], ap_before, _ap50(model, root, dataset, runtime))


def assert_converged(run: Run) -> None:
    first, tail = run.losses[0], statistics.median(run.losses[-TAIL:])
    assert tail < first / 5, run.losses
    assert run.ap_after >= max(0.5, run.ap_before + 0.4), (run.ap_before, run.ap_after)


@pytest.fixture(scope="module")
def fp32_run(two_images) -> Run:
    return overfit(two_images)


def test_overfits_two_images_in_fp32(fp32_run):
    assert_converged(fp32_run)


@pytest.mark.skipif(not native_bf16(),
                    reason="this CPU has no native bf16 (AVX512-BF16/AMX): bf16 would be emulated, ~10x slower, "
                           "and training uses fp32 here anyway")
def test_overfits_two_images_in_bf16_like_fp32(two_images, fp32_run):
    run = overfit(two_images, amp=True)  # the runtime's CPU fast path: bf16 autocast, channels-last
    assert_converged(run)
    # The same start (bf16 rounds activations to ~3 significant digits; the loss is fp32) and the same
    # first update (step 0 has learning rate 0 in the warmup; step 2 follows one bf16 gradient: <= 4.3%
    # off fp32 over seeds 0-4). Later steps drift apart as rounding differences compound (20% at step 3
    # on some seeds, both runs still falling), so only the bound is compared there.
    assert run.losses[:2] == pytest.approx(fp32_run.losses[:2], rel=0.02), (run.losses, fp32_run.losses)
    assert run.losses[2] == pytest.approx(fp32_run.losses[2], rel=0.1), (run.losses, fp32_run.losses)
