"""SSD300 v1.1 object detector (ResNet backbones), faithful to NVIDIA's reference.

``from ssd300 import SSD300, Detector, TrainConfig, train, evaluate, RunResult, Runtime``. The names
are imported on first use, so ``import ssd300`` stays fast (no torch until a name is needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "SSD300": "ssd300.model",
    "Detector": "ssd300.inference",
    "ImageDetections": "ssd300.inference",
    "TrainConfig": "ssd300.train_config",
    "RunResult": "ssd300.training",
    "train": "ssd300.training",
    "evaluate": "ssd300.training",
    "Runtime": "ssd300.runtime",
    "UserInputError": "ssd300.errors",
}

__all__ = ["Detector", "ImageDetections", "RunResult", "Runtime", "SSD300", "TrainConfig", "UserInputError",
           "__version__", "evaluate", "train"]

if TYPE_CHECKING:
    from ssd300.errors import UserInputError
    from ssd300.inference import Detector, ImageDetections
    from ssd300.model import SSD300
    from ssd300.runtime import Runtime
    from ssd300.train_config import TrainConfig
    from ssd300.training import RunResult, evaluate, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ssd300' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
