"""TrainConfig: the reference's defaults, validation naming the field, the CLI adding nothing of its own;
the package's top-level names."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ssd300.commands import train as train_command
from ssd300.errors import UserInputError
from ssd300.training import TrainConfig, evaluate, train

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_references():
    config = TrainConfig()
    # SPEC §6-7: SGD 2.6e-3 per 32 images, momentum 0.9, wd 5e-4, 65 epochs, decay at 43 and 54
    assert (config.learning_rate, config.momentum, config.weight_decay) == (2.6e-3, 0.9, 5e-4)
    assert (config.epochs, config.batch_size, config.eval_batch_size) == (65, 32, 32)
    assert config.multistep == (43, 54) and config.evaluation == (21, 31, 37, 42, 48, 53, 59, 64)
    assert config.amp and config.allow_tf32 and config.iou_crop and config.mode == "training"


def test_cli_defaults_are_the_configs():
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    assert train_command.config_from_args(parser.parse_args([])) == TrainConfig()


def test_frozen_and_coerced(tmp_path):
    config = TrainConfig(data=str(tmp_path), save=str(tmp_path / "run"), evaluation=[1, 2], multistep=[3])
    assert config.data == tmp_path and config.save == tmp_path / "run"
    assert config.evaluation == (1, 2) and config.multistep == (3,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert config.replace(epochs=3).epochs == 3 and config.epochs == 65


@pytest.mark.parametrize("changes,message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"evaluation": (-1,)}, "evaluation takes epoch numbers >= 0"),
    ({"mode": "predict"}, "mode must be one of training, evaluation"),
    ({"backbone": "vgg16"}, "backbone must be one of resnet18"),
    ({"mode": "evaluation"}, "mode 'evaluation' needs checkpoint"),
    ({"batch_size": 1}, "batch_size 1: BatchNorm needs at least 2 images"),
    ({"checkpoint": "/no/such.pt"}, "checkpoint /no/such.pt: file not found"),
    ({"optimizer": "lamb"}, "optimizer must be one of sgd, adamw, got 'lamb'"),
    ({"schedule": "linear"}, "schedule must be one of multistep, cosine, got 'linear'"),
])
def test_validation_names_the_field(changes, message):
    with pytest.raises(UserInputError) as info:
        TrainConfig(**changes)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert "--" not in str(info.value)  # the library speaks Python; the CLI writes flags
    assert set(info.value.fields) >= {next(iter(changes))}
    with pytest.raises(UserInputError, match=r"^batch_size must be >= 1, got 0$"):
        TrainConfig().replace(batch_size=0)  # a replaced copy is validated again


def test_batch_of_one_is_fine_with_frozen_batchnorm_and_train_refuses_evaluation(tmp_path):
    assert TrainConfig(batch_size=1, freeze_bn=True).batch_size == 1
    checkpoint = tmp_path / "x.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(UserInputError, match="use evaluate"):
        train(TrainConfig(mode="evaluation", checkpoint=checkpoint))
    assert callable(evaluate)


@pytest.mark.slow  # fresh interpreters import the package
def test_top_level_names_are_lazy_and_acyclic():
    code = ("import sys, ssd300; assert 'torch' not in sys.modules, 'import ssd300 pulled torch in'; "
            "from ssd300 import SSD300, Detector, TrainConfig, train, evaluate, RunResult, Runtime; "
            "import ssd300.training, ssd300.trainer, ssd300.inference; "
            "assert ssd300.TrainConfig is ssd300.training.TrainConfig; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO / "src")}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_recipe_choices_reach_the_config():
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    config = train_command.config_from_args(parser.parse_args(["--optimizer", "adamw", "--schedule", "cosine"]))
    assert (config.optimizer, config.schedule) == ("adamw", "cosine")
    assert (TrainConfig().optimizer, TrainConfig().schedule) == ("sgd", "multistep")  # the reference's
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "lamb"])
