"""The one config of training, evaluation and benchmark runs: :class:`TrainConfig`, validated when built.

``ssd300 train`` / ``evaluate`` / ``demo`` take their defaults from here and only turn their flags
into a :class:`TrainConfig`. The recipe's defaults are :mod:`ssd300.optim`'s (SPEC §6-7). Every
problem is a one-line :class:`~ssd300.errors.UserInputError` that names the field the Python way
(``batch_size must be >= 1, got 0``) and lists it in ``fields``; the CLI writes those as flags.
Also here, all before any work starts: where the data comes from (:func:`resolve_data`), the
check that every output path can be written (:func:`check_outputs`) and the checkpoint a
``resume`` continues (:func:`resolve_resume`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssd300.backbone import BACKBONES, TORCHVISION_IMAGENET_FILES
from ssd300.checkpoint import checkpoint_in_folder
from ssd300.coco_eval import EVAL_BACKENDS
from ssd300.data.coco import resolve_split
from ssd300.data.layouts import check_data_format
from ssd300.errors import UserInputError
from ssd300.files import check_output_path
from ssd300.optim import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_MOMENTUM,
    DEFAULT_MULTISTEP,
    DEFAULT_WARMUP,
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    SCHEDULES,
)
from ssd300.optional import install_hint
from ssd300.run_folder import EPOCH_NAME_PATTERN, INTERRUPTED, LAST, RunFolder
from ssd300.voc_eval import METRICS
from ssd300.weights import is_weights_reference

MODES = ("training", "evaluation", "benchmark-training", "benchmark-inference")
TRAINING_MODES = ("training", "benchmark-training")
DEFAULT_EVALUATION = (21, 31, 37, 42, 48, 53, 59, 64)
MAX_SEED = 2**31 - 1  # numpy, torch and DALI all take it; the seed of rank r is seed + r


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training, evaluation or benchmark run needs; validated when built.

    Paths may be given as strings. Any problem raises :class:`~ssd300.errors.UserInputError`
    naming the field, before any work starts.
    """

    # data: a dataset folder, or explicit image folders + COCO-format annotation files
    data: Optional[Path] = None
    train_images: Optional[Path] = None
    train_annotations: Optional[Path] = None
    val_images: Optional[Path] = None
    val_annotations: Optional[Path] = None
    data_format: str = "auto"               # layout of data: auto (detected), coco, voc, yolo (ssd300.data.layouts)
    keep_difficult: bool = False            # train on VOC's difficult boxes too (evaluation ignores them)
    num_workers: Optional[int] = None       # data loading processes per rank (None: min(8, CPUs))
    dali: bool = False                       # the DALI training pipeline
    strict_images: bool = False              # stop at the first undecodable image instead of skipping it
    iou_crop: bool = True                    # the SSD random IoU crop (the reference always crops)
    # run
    mode: str = "training"
    epochs: int = 65
    batch_size: int = 32                     # images per process and step
    eval_batch_size: int = 32
    eval_backend: str = "auto"             # COCO evaluation library: auto (faster-coco-eval when installed), ...
    metric: str = "coco"                     # coco (AP@[.5:.95]), voc07 (11-point) or voc12 (all-point) mAP@0.5
    seed: Optional[int] = None               # base seed (rank r uses seed + r); None: the checkpoint's, else random
    checkpoint: Optional[Path] = None        # resume from / start from / the model to evaluate
    save: Optional[Path] = None              # the run folder (ssd300.run_folder): checkpoints, log, figures
    resume: bool = False                     # continue the run in ``save`` from its newest checkpoint
    overwrite: bool = False                  # a fresh run may replace another run's files in ``save``
    keep_last: int = 0                       # keep only the newest N epoch checkpoints (0: all)
    evaluation: tuple[int, ...] = DEFAULT_EVALUATION  # epochs (0-based) after which to evaluate
    eval_every: int = 0                      # also evaluate after every N-th epoch (0: off)
    device: Optional[str] = None             # None: cuda when available, else cpu
    # recipe (ssd300.optim)
    learning_rate: float = DEFAULT_LEARNING_RATE  # for a global batch of 32; scaled by world size x batch / 32
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    warmup: int = DEFAULT_WARMUP             # linear warmup iterations (published runs: 300)
    multistep: tuple[int, ...] = DEFAULT_MULTISTEP
    optimizer: str = "sgd"                   # sgd (the reference) or adamw (short runs on small data)
    schedule: str = "multistep"              # multistep (the reference) or cosine (decays over the whole run)
    bn_recalibration: int = 0                # batches to recompute BatchNorm statistics over before evaluating
    freeze_bn: bool = False
    # model and precision (see ssd300.runtime)
    backbone: Optional[str] = None           # None: the checkpoint's, else resnet50
    backbone_path: Optional[Path] = None     # ImageNet weights (torchvision state-dict file); wins over the next
    # "imagenet": torchvision's published ImageNet weights (downloaded once, ssd300.weights), "none": from
    # scratch; the default may be set per machine with $SSD300_BACKBONE_WEIGHTS (e.g. none without network)
    backbone_weights: str = field(default_factory=lambda: os.environ.get("SSD300_BACKBONE_WEIGHTS", "imagenet"))
    # transfer learning (ssd300.transfer): a fresh run starts from this checkpoint (path, published name
    # or URL) trained on other classes; classifier rows of classes with the same name are kept
    init_from: Optional[Path] = None
    freeze_backbone_epochs: int = 0          # the trunk is frozen (no gradients, BatchNorm eval) for the first N epochs
    amp: bool = True
    allow_tf32: bool = True
    channels_last: Optional[bool] = None     # None: the runtime policy
    # benchmark
    benchmark_iterations: int = 20
    benchmark_warmup: int = 20
    # logging; None: the run folder's file when save is set (ssd300.run_folder)
    log_interval: int = 20
    json_summary: Optional[Path] = None      # the run's summary
    log_file: Optional[Path] = None          # the JSON-lines log
    results: Optional[Path] = None           # COCO results of the last evaluation
    tensorboard: Optional[Path] = None
    progress: Optional[bool] = None          # None: when stderr is a terminal

    def __post_init__(self) -> None:
        # Frozen, so normalising str paths and lists goes through object.__setattr__.
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if name in WEIGHTS_FIELDS and is_weights_reference(value):
                continue  # a published name or URL: resolved after the other checks
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("evaluation", "multistep"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self._check_ranges()
        self._check_combinations()
        self._resolve_weights()
        self._check_paths()

    def _resolve_weights(self) -> None:
        """checkpoint / init_from given as a published name or URL: the cached (else downloaded and
        verified) file, before any data is read; offline, one line naming the URL and the file."""
        for name in WEIGHTS_FIELDS:
            value = getattr(self, name)
            if is_weights_reference(value):
                from ssd300.checkpoint import resolve_checkpoint

                try:
                    object.__setattr__(self, name, resolve_checkpoint(value))
                except UserInputError as err:
                    raise UserInputError(f"{name} {err}", fields=(name,)) from None

    def _check_ranges(self) -> None:
        if self.mode not in MODES:
            _refuse("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_data_format(self.data_format)
        if self.eval_backend not in ("auto", *EVAL_BACKENDS):
            _refuse("eval_backend", f"must be one of auto, {', '.join(EVAL_BACKENDS)}, got {self.eval_backend!r}")
        if self.metric not in METRICS:
            _refuse("metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("batch_size", "eval_batch_size", "log_interval", "benchmark_iterations"):
            if getattr(self, name) < 1:
                _refuse(name, f"must be >= 1, got {getattr(self, name)}")
        # epochs: one rule per mode, the same message for 0 and -3 (what is allowed, what was given)
        if self.mode == "training" and self.epochs < 1:
            _refuse("epochs", f"must be >= 1 to train, got {self.epochs}")
        for name in ("epochs", "bn_recalibration", "benchmark_warmup", "warmup", "eval_every", "keep_last"):
            if getattr(self, name) < 0:
                _refuse(name, f"must be >= 0, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            _refuse("seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        if self.num_workers is not None and self.num_workers < 0:
            _refuse("num_workers", f"must be >= 0, got {self.num_workers}")
        if not self.learning_rate > 0:
            _refuse("learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            _refuse("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            _refuse("weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("multistep", "evaluation"):
            if any(e < 0 for e in getattr(self, name)):
                _refuse(name, f"takes epoch numbers >= 0, got {list(getattr(self, name))}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                _refuse(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.backbone_weights not in BACKBONE_WEIGHTS:
            _refuse("backbone_weights", f"must be one of {', '.join(BACKBONE_WEIGHTS)}, got {self.backbone_weights!r}")
        if self.freeze_backbone_epochs < 0:
            _refuse("freeze_backbone_epochs", f"must be >= 0, got {self.freeze_backbone_epochs}")
        if self.backbone is not None and self.backbone not in BACKBONES:
            _refuse("backbone", f"must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")

    def _check_combinations(self) -> None:
        if self.mode in TRAINING_MODES and self.batch_size < 2 and not self.freeze_bn:
            raise UserInputError("batch_size 1: BatchNorm needs at least 2 images per process to train "
                                 "(use a larger batch, or freeze_bn)", fields=("batch_size", "freeze_bn"))
        if self.mode == "evaluation" and self.checkpoint is None:
            raise UserInputError("mode 'evaluation' needs checkpoint: the model to evaluate",
                                 fields=("mode", "checkpoint"))
        if self.dali and not self.iou_crop:
            raise UserInputError("iou_crop: the DALI pipeline always crops; turning the crop off applies to the "
                                 "PyTorch loader only", fields=("iou_crop",))
        if self.dali and self.mode not in TRAINING_MODES:
            raise UserInputError(f"dali is a training loader; it does nothing in mode {self.mode!r}",
                                 fields=("dali",))
        if self.dali and self.num_workers == 0:
            raise UserInputError("num_workers 0 with dali: the DALI pipeline needs at least 1 CPU thread",
                                 fields=("num_workers", "dali"))
        if self.dali:
            from ssd300.data.dali import dali_available

            if not dali_available():
                raise UserInputError(f"dali: NVIDIA DALI is not installed ({install_hint('nvidia.dali')})",
                                     fields=("dali",))
        if self.init_from is not None and self.checkpoint is not None:
            raise UserInputError("init_from contradicts checkpoint: init_from starts a fresh run on other classes "
                                 "from a model's weights, checkpoint resumes (or fine-tunes with the same classes)",
                                 fields=("init_from", "checkpoint"))
        if self.resume and self.save is None:
            raise UserInputError("resume needs save: the run folder to continue", fields=("resume", "save"))
        if self.resume and self.overwrite:
            raise UserInputError("resume contradicts overwrite", fields=("resume", "overwrite"))

    def _check_paths(self) -> None:
        for name in ("checkpoint", "backbone_path", "init_from"):
            path = getattr(self, name)
            if path is not None and path.is_dir():
                found = checkpoint_in_folder(path) if name == "checkpoint" else None
                hint = f"; did you mean {found}?" if found else ""
                _refuse(name, f"{path}: is a folder, not a file{hint}")
            if path is not None and not path.is_file():
                _refuse(name, f"{path}: file not found")
        if self.save is not None and self.save.exists() and not self.save.is_dir():
            _refuse("save", f"{self.save}: exists and is not a folder")

    @property
    def needs_train_data(self) -> bool:
        return self.mode in TRAINING_MODES

    @property
    def evaluation_epochs(self) -> tuple[int, ...]:
        """The epochs (0-based) a training run evaluates after: ``evaluation`` (the reference's
        schedule by default), every ``eval_every``-th, and always the final one; none at all only
        when both ``evaluation`` is empty and ``eval_every`` is 0 (a run without validation data)."""
        if self.mode != "training" or (not self.evaluation and not self.eval_every):
            return ()
        every = set(range(self.eval_every - 1, self.epochs, self.eval_every)) if self.eval_every else set()
        return tuple(sorted({e for e in self.evaluation if e < self.epochs} | every | {self.epochs - 1}))

    @property
    def needs_val_data(self) -> bool:
        return self.mode in ("evaluation", "benchmark-inference") or bool(self.evaluation_epochs)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


PATH_FIELDS = ("data", "train_images", "train_annotations", "val_images", "val_annotations", "checkpoint", "save",
               "backbone_path", "init_from", "json_summary", "log_file", "results", "tensorboard")
WEIGHTS_FIELDS = ("checkpoint", "init_from")  # may name published weights or a URL (ssd300.weights)
BACKBONE_WEIGHTS = ("imagenet", "none")
# Output paths checked before the work: (field, is a folder).
OUTPUT_FIELDS = (("save", True), ("log_file", False), ("results", False), ("json_summary", False),
                 ("tensorboard", True))


def _refuse(field: str, problem: str) -> None:
    raise UserInputError(f"{field} {problem}", fields=(field,))


Split = tuple[Path, Path]  # (image folder, annotation source: ssd300.data.layouts)


@dataclass
class DataPaths:
    train: Optional[Split] = None
    val: Optional[Split] = None


def resolve_data(config: TrainConfig) -> DataPaths:
    """The ``data`` folder's splits or the explicit ``train_*``/``val_*`` paths (not both)."""
    explicit = {"train": (config.train_images, config.train_annotations),
                "val": (config.val_images, config.val_annotations)}
    given = [f"{split}_{kind}" for split, pair in explicit.items()
             for kind, value in zip(("images", "annotations"), pair) if value is not None]
    if config.data is not None and given:
        raise UserInputError(f"data and {given[0]} contradict each other: give a dataset folder or explicit paths",
                             fields=("data", given[0]))
    paths = DataPaths()
    if config.data is not None:
        if config.needs_train_data:
            paths.train = resolve_split(config.data, "train", config.data_format)
        if config.needs_val_data:
            paths.val = resolve_split(config.data, "val", config.data_format)
        return paths
    for split, needed in (("train", config.needs_train_data), ("val", config.needs_val_data)):
        images, annotations = explicit[split]
        pair = (f"{split}_images", f"{split}_annotations")
        if (images is None) != (annotations is None):
            missing, other = pair if images is None else pair[::-1]
            raise UserInputError(f"{missing} is missing ({other} and {missing} go together)", fields=(missing, other))
        if needed and images is None:
            hint = " (or train without evaluating: evaluation with no epochs)" if split == "val" else ""
            # the fields first: the CLI writes the first whole-word occurrence of each as its flag
            raise UserInputError(f"give data (a dataset folder) or {pair[0]} and {pair[1]}: there is no {split} "
                                 f"data{hint}", fields=("data", *pair, *(("evaluation",) if hint else ())))
        if images is not None and annotations is not None:
            if not images.is_dir():
                _refuse(pair[0], f"{images}: folder not found")
            if not annotations.exists():  # a COCO json, a VOC image-set list, a YOLO labels folder
                _refuse(pair[1], f"{annotations}: file not found")
            setattr(paths, split, (images, annotations))
    return paths


def check_outputs(config: TrainConfig) -> None:
    """Every output path of the run can be written (one-line UserInputError naming the field if not)."""
    for name, folder in OUTPUT_FIELDS:
        path = getattr(config, name)
        if path is not None:
            check_output_path(path, name, folder=folder)


def resolve_resume(config: TrainConfig) -> TrainConfig:
    """``resume`` without ``checkpoint`` (mode training): the newest checkpoint of the run folder.
    ``resume``, ``overwrite`` and ``keep_last`` mean nothing to the other modes."""
    if not config.resume or config.checkpoint is not None or config.mode != "training":
        return config
    assert config.save is not None  # validated
    newest = RunFolder(config.save).newest_checkpoint()
    if newest is None:
        raise UserInputError(f"resume: no checkpoint in {config.save} ({LAST}, {INTERRUPTED} or "
                             f"{EPOCH_NAME_PATTERN})", fields=("resume",))
    return config.replace(checkpoint=newest, init_from=None)  # init_from applied to the run's start only


def resolve_backbone_weights(config: TrainConfig) -> TrainConfig:
    """A fresh training run with ``backbone_weights`` "imagenet" and no ``backbone_path``: torchvision's
    ImageNet file for the backbone as ``backbone_path`` (cached, else downloaded once; offline, one
    line naming the URL and where to place the file), before any data is read."""
    if (config.mode != "training" or config.backbone_weights != "imagenet" or config.backbone_path is not None
            or config.checkpoint is not None or config.init_from is not None):
        return config
    from ssd300.backbone import imagenet_weights_path

    try:
        path = imagenet_weights_path(config.backbone or "resnet50")
    except UserInputError as err:
        raise UserInputError(f"backbone_weights imagenet: {err} (or train from scratch: backbone_weights none)",
                             fields=("backbone_weights",)) from None
    return config.replace(backbone_path=path)


def random_backbone_warning(config: TrainConfig, backbone: str, *, has_checkpoint: bool) -> Optional[str]:
    """The loud line for training ResNet-50 from random weights: the published mAP (SPEC §8, 0.27
    on COCO) assumes an ImageNet-trained trunk. None when there is nothing to warn about."""
    if (config.mode != "training" or has_checkpoint or config.backbone_path is not None or backbone != "resnet50"
            or config.backbone_weights != "none"):
        return None
    return ("WARNING: training ResNet-50 from random weights (backbone_weights none): the published mAP (0.27 "
            "on COCO) assumes ImageNet weights; use backbone_weights imagenet (torchvision's "
            f"{TORCHVISION_IMAGENET_FILES['resnet50']}, downloaded once) or give that file as backbone_path "
            "(see README, 'Start from published weights')")
