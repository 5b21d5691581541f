"""The reference's optimisation recipe: SGD with momentum, decay on weights only, warmup + multistep.

Two departures, off by default, for short runs on small data (``ssd300 demo``): AdamW instead of
SGD (``optimizer="adamw"``) and a cosine decay over the whole run instead of the multistep drops
(``schedule="cosine"``). The reference recipe stays the default everywhere else.

* learning rate = ``base_lr * world_size * batch_size / 32`` (``learning_rate`` is the rate for
  batch 32 on one device, as in the reference);
* weight decay on every parameter with more than one dimension; biases and BatchNorm parameters
  (every 1-D parameter) get none;
* linear warmup over ``warmup`` iterations (``lr * iteration / warmup``, iteration counted from 0
  as the reference does), then multistep decay ``x gamma`` at the given epochs, stepped per epoch.

The schedule is a pure function of (epoch, iteration), so resuming from a checkpoint reproduces
the rate exactly without replaying scheduler steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

REFERENCE_BATCH_SIZE = 32
# The recipe's defaults (SPEC §6): the one owner; TrainConfig and Trainer.build take them from here.
DEFAULT_LEARNING_RATE = 2.6e-3   # for a global batch of REFERENCE_BATCH_SIZE
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_WARMUP = 0               # linear warmup iterations (published runs: 300)
DEFAULT_MULTISTEP = (43, 54)     # epochs (0-based) at which the rate is multiplied by 0.1
OPTIMIZERS = ("sgd", "adamw")    # sgd: the reference's
SCHEDULES = ("multistep", "cosine")  # multistep: the reference's


def scaled_learning_rate(base_lr: float, world_size: int, batch_size: int) -> float:
    """The reference's linear scaling rule: ``base_lr`` is the rate for a global batch of 32."""
    return base_lr * world_size * (batch_size / REFERENCE_BATCH_SIZE)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: weights (ndim > 1) with ``weight_decay``; biases and norm parameters without."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, momentum: float = DEFAULT_MOMENTUM,
                    weight_decay: float = DEFAULT_WEIGHT_DECAY, kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD with ``momentum`` (the reference), or AdamW with ``momentum`` as its first beta."""
    groups = parameter_groups(model, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if kind != "sgd":
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


@dataclass
class WarmupMultiStepSchedule:
    """Learning rate as a function of (epoch, global iteration); applied to an optimizer with ``apply``.

    ``state_dict``/``load_state_dict`` keep only plain numbers so a checkpoint stays
    ``weights_only``-loadable.
    """

    base_lr: float
    warmup_iterations: int = 0
    milestones: Sequence[int] = DEFAULT_MULTISTEP
    gamma: float = 0.1
    last_epoch: int = 0
    last_iteration: int = 0
    # cosine: after warmup the rate falls from base_lr to 0 along half a cosine over total_iterations
    # (milestones unused); the iteration is counted from 0 like the warmup's
    kind: str = "multistep"
    total_iterations: int = 0

    def __post_init__(self) -> None:
        self.milestones = tuple(sorted(int(m) for m in self.milestones))
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.kind == "cosine" and self.total_iterations < 1:
            raise ValueError("a cosine schedule needs total_iterations >= 1")

    def learning_rate(self, epoch: int, iteration: int) -> float:
        if self.kind == "cosine":
            progress = min(iteration, self.total_iterations) / self.total_iterations
            lr = self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decays = bisect.bisect_right(self.milestones, epoch)  # milestones already passed (<= epoch)
            lr = self.base_lr * self.gamma ** decays
        if self.warmup_iterations > 0 and iteration < self.warmup_iterations:
            lr *= iteration / self.warmup_iterations
        return lr

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> float:
        lr = self.learning_rate(epoch, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_epoch, self.last_iteration = epoch, iteration
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": float(self.base_lr),
            "warmup_iterations": int(self.warmup_iterations),
            "milestones": list(self.milestones),
            "gamma": float(self.gamma),
            "last_epoch": int(self.last_epoch),
            "last_iteration": int(self.last_iteration),
            "kind": self.kind,
            "total_iterations": int(self.total_iterations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the recipe (rate, warmup, milestones) comes from the current config.

        A reference checkpoint's MultiStepLR state has other keys; only ``last_epoch`` is used.
        """
        self.last_epoch = int(state.get("last_epoch", self.last_epoch))
        self.last_iteration = int(state.get("last_iteration", self.last_iteration))
