"""Optional dependencies: each one missing is one line naming the extra that installs it.

The package itself needs only the core dependencies; ONNX export/onnxruntime (extra ``onnx``),
DALI (``dali``), faster-coco-eval (``eval``) and TensorBoard (``tensorboard``) are imported here,
when a feature needs them, so a missing one reads ``onnxruntime is not installed (backend
onnxruntime): pip install 'ssd300[onnx]'`` instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserInputError

# Import name -> the extra of pyproject.toml that installs it.
EXTRA_OF: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "nvidia.dali": "dali",
    "faster_coco_eval": "eval",
    "tensorboard": "tensorboard",
    "mlserver": "serve",
}


def install_hint(module: str) -> str:
    return f"pip install 'ssd300[{EXTRA_OF[module]}]'"


def require(module: str, purpose: str, *, fields: tuple[str, ...] = ()) -> ModuleType:
    """Import ``module`` or raise UserInputError: ``<module> is not installed (<purpose>): pip install ...``.

    ``fields``: the arguments/config fields ``purpose`` names (``require("onnxruntime", "backend
    onnxruntime", fields=("backend",))``), so the CLI can write them as its flags."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserInputError(f"{module} is not installed ({purpose}): {install_hint(module)}",
                             fields=fields) from None


def available(module: str) -> bool:
    """Whether ``module`` imports (anything else it raises counts as missing, e.g. a broken CUDA runtime)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True
