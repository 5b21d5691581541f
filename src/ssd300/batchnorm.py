"""BatchNorm during training: frozen statistics (small batches, fine-tuning) and exact recalibration."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


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
