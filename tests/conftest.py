"""Shared fixtures: synthetic COCO-format datasets (generated once per session and argument set) and the
tiny seeded SSD300 (ResNet-18, a few classes) with its checkpoint, built by hand in many tests before."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from ssd300.checkpoint import model_checkpoint, save_checkpoint
from ssd300.data.synth import generate_synthetic_dataset
from ssd300.labels import LabelMap
from ssd300.model import SSD300

# The suite runs without network: training runs start from scratch unless a test asks for ImageNet
# weights (TrainConfig.backbone_weights' per-machine default; subprocesses inherit it).
os.environ.setdefault("SSD300_BACKBONE_WEIGHTS", "none")

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


# The tiny model's default classes: background + the synthetic dataset's first two shapes.
TINY_LABEL_MAP = LabelMap.from_categories([(1, "disc"), (2, "rectangle")])

MakeTinyModel = Callable[..., SSD300]
MakeTinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_tiny_model() -> MakeTinyModel:
    """``make_tiny_model(num_classes=3, seed=0, backbone="resnet18", conf_scale=None) -> SSD300``.

    Exactly what ``torch.manual_seed(seed); SSD300(backbone, num_classes=num_classes)`` gives (a
    fresh module in training mode, and the global RNG left where that construction leaves it), but
    each variant is built once per session and deep-copied. ``conf_scale`` multiplies the class
    heads' weights (0.3 tames an untrained model: spread scores, no saturated ties).
    """
    built: dict[tuple[Any, ...], tuple[SSD300, torch.Tensor]] = {}

    def make(num_classes: int = 3, seed: int = 0, backbone: str = "resnet18",
             conf_scale: Optional[float] = None) -> SSD300:
        key = (num_classes, seed, backbone)
        if key not in built:
            torch.manual_seed(seed)
            model = SSD300(backbone, num_classes=num_classes)
            built[key] = model, torch.get_rng_state()
        model, rng_after = built[key]
        torch.set_rng_state(rng_after)
        model = copy.deepcopy(model)
        if conf_scale is not None:
            with torch.no_grad():
                for conf in model.conf:
                    conf.weight.mul_(conf_scale)
        return model

    return make


@pytest.fixture
def tiny_model(make_tiny_model: MakeTinyModel) -> SSD300:
    """A fresh seeded ResNet-18 SSD300 with 3 classes (``TINY_LABEL_MAP``), in eval mode."""
    return make_tiny_model().eval()


@pytest.fixture(scope="session")
def make_tiny_checkpoint(make_tiny_model: MakeTinyModel) -> MakeTinyCheckpoint:
    """``make_tiny_checkpoint(path, label_map=TINY_LABEL_MAP, model=None, **fields) -> path``: our
    checkpoint format (``model_checkpoint`` + ``save_checkpoint``) of ``model``, by default the tiny
    model with as many classes as ``label_map``; ``fields`` (epoch, iteration, args) go to
    ``model_checkpoint``."""

    def make(path: Path, label_map: LabelMap = TINY_LABEL_MAP, model: Optional[torch.nn.Module] = None,
             **fields: Any) -> Path:
        if model is None:
            model = make_tiny_model(label_map.num_classes)
        save_checkpoint(path, model_checkpoint(model, label_map, **fields))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny_checkpoint: MakeTinyCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's checkpoint with ``TINY_LABEL_MAP``, written once per session: read-only."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ssd.pt")


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ssd300(args: list[str], ranks: int = 1, timeout: float = 600) -> str:
    """``python -m ssd300 ARGS`` in a fresh process (``ranks`` > 1: under torchrun, gloo on the
    loopback), this checkout's sources first; asserts exit 0 and returns stdout + stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under torchrun must not leak its own rendezvous
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
                                      "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, "-m", "ssd300", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr
