"""Training loop on a tiny synthetic set: exact resume, NaN guard, checkpoint contents.

Convergence (fp32 and bf16) is tested in test_convergence.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ONE_LARGE_OBJECT

from ssd300.data.coco import CocoDetection
from ssd300.data.loaders import build_train_loader
from ssd300.model import SSD300
from ssd300.runtime import Runtime
from ssd300.trainer import NonFiniteLossError, Trainer
from ssd300.training import TrainConfig, run

pytestmark = pytest.mark.slow  # training runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(num_train=4, num_val=1, seed=0, **ONE_LARGE_OBJECT)


def _trainer(dataset: CocoDetection, lr: float, warmup: int = 0) -> Trainer:
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=dataset.label_map.num_classes)
    return Trainer.build(model, runtime=Runtime.resolve("cpu", amp=False), label_map=dataset.label_map,
                         learning_rate=lr, warmup=warmup, multistep=[1000])


def test_trainer_build_wires_the_reference_recipe(data_dir):
    dataset = CocoDetection(data_dir / "train", data_dir / "annotations" / "instances_train.json", train=True)
    model = SSD300("resnet18", num_classes=dataset.label_map.num_classes)
    trainer = Trainer.build(model, runtime=Runtime.resolve("cpu", amp=False), label_map=dataset.label_map,
                            learning_rate=0.01)
    decay, no_decay = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.SGD) and decay["momentum"] == 0.9
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)  # no decay on biases and BatchNorm
    assert trainer.schedule.milestones == (43, 54) and trainer.schedule.warmup_iterations == 0
    assert trainer.schedule.base_lr == 0.01 and trainer.box_coder.default_boxes.xywh.shape == (8732, 4)
    assert trainer.ctx.device == torch.device("cpu") and not trainer.ctx.distributed
    assert not trainer.logger.enabled and trainer.scaler is None and not trainer.frozen_batchnorm


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(data_dir, tmp_path):
    dataset = CocoDetection(data_dir / "train", data_dir / "annotations" / "instances_train.json", train=True)
    trainer = _trainer(dataset, lr=0.01)
    loader = build_train_loader(dataset, 4, num_workers=0, seed=0)
    trainer.train_epoch(loader, total_epochs=2)  # 1 good step
    good = trainer.save(tmp_path / "epoch_0.pt")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()

    real_loss = trainer.loss_fn
    trainer.loss_fn = lambda *a: real_loss(*a) * float("nan")  # the second step diverges
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at iteration 1 \(epoch 1"):
        trainer.train_epoch(loader, total_epochs=2)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("num_batches_tracked")
               and "running" not in k)  # no optimizer step with a NaN gradient
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt"]


def _args(data_dir: Path, **overrides) -> TrainConfig:
    base = dict(data=data_dir, backbone="resnet18", epochs=2, batch_size=2, eval_batch_size=2, seed=0,
                num_workers=0, amp=False, evaluation=(), warmup=2, learning_rate=0.05, log_interval=1,
                progress=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory) -> Path:
    """2 epochs x 2 steps without interruption; the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    run(_args(data_dir, save=out))
    return out


def test_checkpoint_is_weights_only_with_reference_keys(straight_run):
    checkpoint = torch.load(straight_run / "epoch_0.pt", map_location="cpu", weights_only=True)
    for key in ("model", "epoch", "iteration", "optimizer", "scheduler", "label_map", "category_ids", "scaler",
                "args", "rng", "backbone", "num_classes"):
        assert key in checkpoint, key
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["batch_in_epoch"]) == (1, 2, 0)
    assert checkpoint["label_map"] == {0: "background", 1: "disc", 2: "rectangle"}
    assert checkpoint["category_ids"] == {0: 0, 1: 1, 2: 2}
    assert checkpoint["args"]["seed"] == 0 and checkpoint["backbone"] == "resnet18"
    lines = (straight_run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all('"kind": "train"' in line for line in lines)


def test_resume_at_epoch_boundary_equals_a_straight_run(data_dir, straight_run, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run(_args(data_dir, epochs=1, save=first))
    # no --seed on resume: the checkpoint's seed (and data order) is used
    run(_args(data_dir, seed=None, checkpoint=first / "epoch_0.pt", save=resumed))
    assert not (resumed / "epoch_0.pt").exists()
    a, b = _weights(straight_run / "epoch_1.pt"), _weights(resumed / "epoch_1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight_run / "epoch_1.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(resumed / "epoch_1.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)


def test_sigterm_writes_a_checkpoint_and_mid_epoch_resume_is_exact(data_dir, straight_run, tmp_path):
    interrupted, resumed = tmp_path / "interrupted", tmp_path / "resumed"
    # 2 epochs of 2 steps; the signal lands after the first step (inside an epoch, most likely)
    command = [sys.executable, "-m", "ssd300", "train", "--data", str(data_dir), "--backbone", "resnet18",
               "--epochs", "2", "--bs", "2", "--seed", "0", "--num-workers", "0", "--no-amp", "--warmup", "2",
               "--lr", "0.05", "--log-interval", "1", "--no-progress", "--device", "cpu", "--evaluation",
               "--save", str(interrupted)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = interrupted / "log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, output  # 128 + SIGTERM, the shell's convention
    checkpoint = torch.load(interrupted / "interrupted.pt", weights_only=True)
    assert 0 < checkpoint["iteration"] < 4
    assert checkpoint["iteration"] == 2 * checkpoint["epoch"] + checkpoint["batch_in_epoch"]
    assert "(to continue: --resume with --save " in output  # the CLI writes the fields as its flags
    # one numbering: the last step done, 0-based, as log.jsonl's records name it
    assert f"stopped by signal after iteration {checkpoint['iteration'] - 1} (epoch {checkpoint['epoch']})" in output
    last = torch.load(interrupted / "last.pt", weights_only=True)  # last.pt is the interruption's state
    assert last["iteration"] == checkpoint["iteration"]

    run(_args(data_dir, seed=None, checkpoint=interrupted / "interrupted.pt", save=resumed))
    a, b = _weights(straight_run / "epoch_1.pt"), _weights(resumed / "epoch_1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adamw_cosine_run_decays_over_all_of_its_iterations(data_dir, tmp_path):
    """The cosine spans epochs x batches per epoch, known only once the loader is built."""
    out = tmp_path / "cosine"
    run(_args(data_dir, save=out, optimizer="adamw", schedule="cosine", warmup=0))
    checkpoint = torch.load(out / "epoch_1.pt", map_location="cpu", weights_only=True)
    scheduler = checkpoint["scheduler"]
    assert (scheduler["kind"], scheduler["total_iterations"], scheduler["last_iteration"]) == ("cosine", 4, 3)
    assert "exp_avg_sq" in checkpoint["optimizer"]["state"][0]  # AdamW's state, not SGD's momentum
    rates = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    scaled = 0.05 * 2 / 32
    expected = [scaled * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert rates == pytest.approx(expected, rel=1e-6)
