"""Training ResNet-50 without ImageNet weights says so, loudly (the published mAP assumes them)."""

from __future__ import annotations

import json

import pytest
import torch

from ssd300.training import TrainConfig, random_backbone_warning


@pytest.mark.parametrize("changes,warns", [
    ({}, True),
    ({"mode": "benchmark-training"}, False),   # speed only
    ({"backbone_path": "weights.pth"}, False),
    ({"backbone_weights": "imagenet"}, False),  # resolved to torchvision's file before the run (ssd300.weights)
])
def test_warning_only_for_a_randomly_initialised_resnet50_training_run(tmp_path, changes, warns):
    if "backbone_path" in changes:
        (tmp_path / "weights.pth").write_bytes(b"x")
        changes = {"backbone_path": tmp_path / "weights.pth"}
    config = TrainConfig(**{"backbone_weights": "none", **changes})
    message = random_backbone_warning(config, "resnet50", has_checkpoint=False)
    assert (message is not None) == warns
    if warns:
        assert message.startswith("WARNING: training ResNet-50 from random weights")
        assert "resnet50-0676ba61.pth" in message and "as backbone_path" in message and "--" not in message
    scratch = TrainConfig(backbone_weights="none")
    assert random_backbone_warning(scratch, "resnet18", has_checkpoint=False) is None
    assert random_backbone_warning(scratch, "resnet50", has_checkpoint=True) is None


@pytest.mark.slow  # a ResNet-50 training run
def test_resnet50_training_without_backbone_path_prints_and_logs_the_warning(tmp_path, capsys):
    from ssd300 import train
    from ssd300.data.synth import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_train=2, num_val=1, seed=0, num_classes=1,
                                      max_objects=1, min_width=120, max_width=130, min_height=100, max_height=110)
    torch.manual_seed(0)
    train(TrainConfig(data=data, backbone="resnet50", backbone_weights="none", epochs=1, batch_size=2,
                      evaluation=(), seed=0,
                      num_workers=0, save=tmp_path / "run", progress=False, device="cpu", amp=False))
    printed = capsys.readouterr().err
    assert "WARNING: training ResNet-50 from random weights" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "warning" and "resnet50-0676ba61.pth" in r["message"] for r in records)
