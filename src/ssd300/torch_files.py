"""Reading untrusted PyTorch files: ``torch.load(weights_only=True)``, one-line errors.

Used for checkpoints (:mod:`ssd300.checkpoint`) and ImageNet backbone weights
(:mod:`ssd300.backbone`). It imports no model code, so both can use it without an import cycle.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from .errors import UserInputError, one_line

PathLike = Union[str, "os.PathLike[str]"]
MapLocation = Union[str, torch.device, None]


@contextlib.contextmanager
def _counter_allowed() -> Iterator[None]:
    # MultiStepLR.state_dict() keeps its milestones in a collections.Counter; the reference's
    # checkpoints carry it. Recent torch allows it by default, older ones need the allow-list.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        yield
    else:
        with safe_globals([collections.Counter]):
            yield


def read_torch_file(path: PathLike, what: str = "checkpoint", map_location: MapLocation = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line UserInputError.

    ``what`` names the file's role in messages ("checkpoint", "backbone weights").
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    try:
        with _counter_allowed(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() and _looks_like_pickle(path):
            raise UserInputError(
                f"{what} {path}: refused: it holds pickled Python objects other than tensors and plain "
                f"data{_refused_detail(exc)}, which could run code when loaded, so it was not loaded; "
                "use only files from sources you trust, saved as plain state dicts"
            ) from None
        raise UserInputError(f"{what} {path}: not a PyTorch file, or corrupted") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/key errors all mean an unreadable file
        raise UserInputError(f"{what} {path}: not a PyTorch file, or truncated/corrupted ({one_line(exc)})") from None


def _looks_like_pickle(path: Path) -> bool:
    # torch's zip format, or a raw/legacy pickle (PROTO opcode); anything else is just not ours.
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refused_detail(exc: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" ({found.group(1)})" if found else ""


def strip_module_prefix(key: str) -> str:
    """A state-dict key without the ``module.`` prefixes DataParallel/DDP add (any number)."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key
