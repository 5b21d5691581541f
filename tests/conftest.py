"""Shared fixtures: synthetic COCO-format datasets, generated once per session and argument set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from ssd300.data.synth import generate_synthetic_dataset

# Small images with one large object each: few positives per image, fast steps (training tests).
ONE_LARGE_OBJECT: dict[str, Any] = dict(num_classes=2, min_objects=1, max_objects=1, min_size=0.4, max_size=0.7,
                                        min_width=240, max_width=300, min_height=200, max_height=260)
# Two classes, up to two objects (command-line and distributed training tests).
TWO_CLASSES: dict[str, Any] = dict(num_classes=2, max_objects=2, min_width=240, max_width=300, min_height=200,
                                   max_height=260)

SyntheticDataset = Callable[..., Path]


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """``synthetic_dataset(num_train, num_val, seed=0, copy_to=None, **knobs) -> dataset root``.

    Each distinct (sizes, seed, knobs) is generated once per session and shared, so treat it as
    read-only; a test that damages files passes ``copy_to`` (e.g. ``tmp_path / "data"``) and gets
    its own copy there.
    """
    made: dict[tuple[Any, ...], Path] = {}

    def make(num_train: int, num_val: int, seed: int = 0, copy_to: Path | None = None, **knobs: Any) -> Path:
        key = (num_train, num_val, seed, tuple(sorted(knobs.items())))
        if key not in made:
            made[key] = generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train, num_val, seed=seed,
                                                   **knobs)
        if copy_to is None:
            return made[key]
        return Path(shutil.copytree(made[key], copy_to))

    return make
