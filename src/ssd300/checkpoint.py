"""Checkpoints: atomic save, safe load, reference-compatible keys, architecture inference.

A checkpoint is a dict holding only tensors and plain Python containers/scalars, with the
reference's keys (``model``, ``epoch``, ``iteration``, ``optimizer``, ``scheduler``,
``label_map``) plus ours (``category_ids``, ``backbone``, ``num_classes``, ...). Files are
untrusted input: they are read with ``torch.load(weights_only=True)``, so a file carrying arbitrary
pickled objects is refused and never executed.

Accepted files: our checkpoints, the reference's (keys possibly prefixed ``module.`` by
DataParallel/DDP), and bare SSD300 state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import check_backbone_name
from .default_boxes import DefaultBoxesConfig
from .errors import UserInputError
from .labels import LabelMap, category_mismatch
from .model import SSD300
from .files import MapLocation, PathLike, atomic_write, read_torch_file, strip_module_prefix
from .weights import resolve_weights


_TRUNK = "feature_extractor.feature_extractor."
_LAYER3 = _TRUNK + "6."
# (bottleneck blocks?, number of blocks in layer3) -> backbone.
_ARCH_BY_LAYER3: dict[tuple[bool, int], str] = {
    (False, 2): "resnet18",
    (False, 6): "resnet34",
    (True, 6): "resnet50",
    (True, 23): "resnet101",
    (True, 36): "resnet152",
}


def save_checkpoint(path: PathLike, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` to ``path`` atomically (:func:`ssd300.files.atomic_write`): a crash mid-write
    leaves any previous file at ``path`` intact; a full disk is one line naming the file."""
    with atomic_write(path) as handle:
        torch.save(dict(obj), handle)


def load_checkpoint(path: PathLike, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``); returns the dict as stored.

    A bare state dict is returned as it is; use :func:`model_state_dict` to get the weights from
    either form. Every problem with the file is a one-line :class:`UserInputError`. ``path`` may
    also name published weights or be a URL (:func:`resolve_checkpoint`).
    """
    _check_checkpoint_path(path)  # a local folder or exported file: say what it is
    path = resolve_checkpoint(path)
    obj = read_torch_file(path, "checkpoint", map_location)
    if not isinstance(obj, dict):
        raise UserInputError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    model_state_dict(obj, source=f"checkpoint {path}")  # fail now, naming the file, if there are no weights
    return obj


def checkpoint_in_folder(folder: PathLike) -> Path | None:
    """The checkpoint a folder given in place of a checkpoint file most likely means: its
    ``best.pt``, else ``last.pt``, else the newest ``checkpoints/*.pt`` (by name); None if none."""
    folder = Path(folder).expanduser()
    for candidate in (folder / "best.pt", folder / "last.pt"):
        if candidate.is_file():
            return candidate
    found = sorted(p for p in (folder / "checkpoints").glob("*.pt") if p.is_file())
    return found[-1] if found else None


def _check_checkpoint_path(path: PathLike) -> None:
    """A checkpoint path that is a folder is refused naming what it is, with the checkpoint it
    holds (:func:`checkpoint_in_folder`) as a suggestion; so is an exported file (recognised by
    content: an ONNX file named ``.bin`` too)."""
    target = Path(path).expanduser()
    if target.is_file():
        from .exported import format_of, is_exported_file

        if is_exported_file(target):
            raise UserInputError(f"checkpoint {path}: is a file written by ssd300 export ({format_of(target)}), not a "
                                 "training checkpoint; detect runs it, training and evaluation need the checkpoint "
                                 "it was exported from")
    if not target.is_dir():
        return
    found = checkpoint_in_folder(path)
    hint = f"; did you mean {found}?" if found else " (it holds no best.pt or last.pt)"
    raise UserInputError(f"checkpoint {path}: is a folder, not a checkpoint file{hint}")


def _is_torchvision_resnet(state: Mapping[str, Any]) -> bool:
    """A torchvision ResNet classifier's state dict (``conv1``, ``layer1``..``layer4``, ``fc``)."""
    keys = {strip_module_prefix(k) for k in state}
    return {"conv1.weight", "fc.weight"} <= keys and any(k.startswith("layer4.") for k in keys)


def resolve_checkpoint(value: PathLike) -> Path:
    """The local file of a checkpoint given as a path, a published name (``nvidia-ssd300-coco``,
    :mod:`ssd300.weights`) or an ``http(s)://``/``file://`` URL: downloaded once into the cache and
    checked as an SSD300 checkpoint (readable with ``weights_only``, architecture inferred) before use."""
    return resolve_weights(value, kind="checkpoint", what="checkpoint", check=_check_checkpoint_file)


def _check_checkpoint_file(path: Path) -> None:
    checkpoint_architecture(load_checkpoint(path), source=f"checkpoint {path}")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and any(k.endswith((".weight", ".bias")) for k in obj)
    )


def model_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (``model`` entry, or a bare state dict), ``module.`` stripped."""
    state = checkpoint.get("model", checkpoint.get("state_dict"))
    if state is None and _is_state_dict(checkpoint):
        state = checkpoint
    if not _is_state_dict(state):
        raise UserInputError(
            f"{source}: no model weights (expected a 'model' entry holding a state dict, or a bare state dict)"
        )
    return {strip_module_prefix(k): v for k, v in state.items()}


def infer_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[str, int]:
    """(backbone name, num_classes) from an SSD300 state dict's shapes and block counts."""
    state = {strip_module_prefix(k): v for k, v in state_dict.items()}
    blocks = {int(k[len(_LAYER3):].split(".", 1)[0]) for k in state if k.startswith(_LAYER3)}
    bottleneck = (_LAYER3 + "0.conv3.weight") in state
    backbone = _ARCH_BY_LAYER3.get((bottleneck, len(blocks)))
    conf0 = state.get("conf.0.weight")
    if _is_torchvision_resnet(state):
        raise UserInputError(
            f"{source}: not an SSD300 checkpoint but a ResNet classifier's weights (torchvision's layout); "
            "to train SSD300 from them, give the file to training as backbone_path", fields=("backbone_path",))
    if backbone is None or conf0 is None:
        raise UserInputError(
            f"{source}: not an SSD300 state dict (layer3 has {len(blocks)} "
            f"{'bottleneck' if bottleneck else 'basic'} blocks"
            f"{'' if conf0 is not None else ', no conf.0.weight'})"
        )
    return backbone, int(conf0.shape[0]) // DefaultBoxesConfig().boxes_per_location[0]


def checkpoint_architecture(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> tuple[str, int]:
    """(backbone, num_classes) of a checkpoint: read from its weights, the one rule.

    The weights are what gets loaded, so they decide; our stored ``backbone``/``num_classes``
    entries must agree with them (a file whose entries contradict its weights is refused).
    """
    inferred = infer_architecture(model_state_dict(checkpoint, source), source)
    for key, value in zip(("backbone", "num_classes"), inferred):
        stored = checkpoint.get(key, value)
        if stored != value or type(stored) is not type(value):
            raise UserInputError(f"{source}: its '{key}' entry ({stored!r}) contradicts its weights ({value!r})")
    return inferred


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the backbone and the label map (its size is the classifier's class count)."""

    backbone: str
    label_map: LabelMap

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes


def resolve_model_spec(checkpoint: Mapping[str, Any] | None = None, *, source: str = "checkpoint",
                       data_label_map: LabelMap | None = None, data_source: str = "the dataset",
                       data_subset_ok: bool = False, backbone: str | None = None,
                       num_classes: int | None = None, default_backbone: str = "resnet50") -> ModelSpec:
    """Decide the model's architecture and label map once, from (checkpoint, dataset, explicit choices).

    * With a checkpoint, its weights decide the architecture (:func:`checkpoint_architecture`); an
      explicit ``backbone``/``num_classes`` must agree. Its ``label_map`` names the classes; a file
      without one (a bare state dict) takes the dataset's, else generic names.
      ``data_label_map`` (the dataset's, read from ``data_source``) must have the checkpoint's
      categories: the same ids with the same names, in the same order (training), or a subset of
      them (``data_subset_ok``: evaluation); otherwise a one-line error names both files and the
      first difference (:func:`ssd300.labels.category_mismatch`).
    * Without one: ``backbone`` (default ``default_backbone``) and the dataset's label map.
    """
    if backbone is not None:
        check_backbone_name(backbone)
    if checkpoint is None:
        if data_label_map is None:
            raise ValueError("resolve_model_spec needs a checkpoint or a dataset label map")
        if num_classes is not None and num_classes != data_label_map.num_classes:
            raise UserInputError(f"the dataset has {data_label_map.num_classes} classes (incl. background) "
                                 f"but {num_classes} were requested")
        return ModelSpec(backbone or default_backbone, data_label_map)
    stored = checkpoint_architecture(checkpoint, source)
    _check_match(source, stored, backbone, num_classes)
    if not checkpoint.get("label_map") and data_label_map is not None and data_label_map.num_classes == stored[1]:
        label_map = data_label_map  # a bare state dict: the dataset names its classes
    elif checkpoint.get("label_map") or data_label_map is None or data_subset_ok:
        try:
            label_map = LabelMap.from_checkpoint(checkpoint, num_classes=stored[1])
        except ValueError as exc:
            raise UserInputError(f"{source}: {exc}") from None
    else:
        raise UserInputError(f"{source}: has {stored[1]} classes (incl. background) but the dataset has "
                             f"{data_label_map.num_classes}")
    if data_label_map is not None and label_map is not data_label_map:
        mismatch = category_mismatch(label_map, data_label_map, subset_ok=data_subset_ok)
        if mismatch is not None:
            raise UserInputError(f"{source} and {data_source} have different categories: {mismatch}")
    return ModelSpec(stored[0], label_map)


def _check_match(source: str, stored: tuple[str, int], backbone: str | None, num_classes: int | None) -> None:
    if backbone is not None and backbone != stored[0]:
        raise UserInputError(f"{source}: backbone is {stored[0]} but {backbone} was requested")
    if num_classes is not None and num_classes != stored[1]:
        raise UserInputError(
            f"{source}: has {stored[1]} classes (incl. background) but {num_classes} were requested"
        )


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} vs "
            f"{tuple(expected[k].shape)})"
        )
    if problems:
        raise UserInputError(f"{source}: weights do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _device_of(map_location: MapLocation) -> torch.device:
    return torch.device("cpu") if map_location is None else torch.device(map_location)


def load_model(
    path: PathLike,
    map_location: MapLocation = "cpu",
    backbone: str | None = None,
    num_classes: int | None = None,
) -> tuple[SSD300, LabelMap, dict[str, Any]]:
    """Build an SSD300 from a checkpoint file (ours, the reference's, or a bare state dict).

    Returns ``(model in eval mode on map_location, label map, checkpoint dict)``. ``backbone`` and
    ``num_classes``, when given, must agree with the checkpoint.
    """
    source = f"checkpoint {path}"
    checkpoint = load_checkpoint(path, map_location=map_location)
    spec = resolve_model_spec(checkpoint, source=source, backbone=backbone, num_classes=num_classes)
    model = SSD300(spec.backbone, spec.num_classes)
    _load_strict(model, model_state_dict(checkpoint, source), source)
    return model.to(_device_of(map_location)).eval(), spec.label_map, checkpoint


def load_model_weights(
    model: nn.Module, checkpoint: Mapping[str, Any] | PathLike, map_location: MapLocation = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint (dict or file) into an existing SSD300, strictly; returns the checkpoint dict.

    The model may be wrapped (DDP, ``torch.compile``): the weights go into the inner SSD300.
    """
    if isinstance(checkpoint, Mapping):
        source = "checkpoint"
        checkpoint = dict(checkpoint)
    else:
        source = f"checkpoint {checkpoint}"
        checkpoint = load_checkpoint(checkpoint, map_location=map_location)
    target = unwrap_model(model)
    state = model_state_dict(checkpoint, source)
    stored = checkpoint_architecture(checkpoint, source)
    _check_match(source, stored, getattr(target, "backbone_name", None), getattr(target, "num_classes", None))
    _load_strict(target, state, source)
    return checkpoint


def unwrap_model(model: nn.Module) -> nn.Module:
    """The SSD300 inside DataParallel/DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_checkpoint(model: nn.Module, label_map: LabelMap, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict for ``model``: reference keys (``model``, ``label_map``) plus
    ``category_ids``, ``backbone``, ``num_classes``; ``extra`` (epoch, optimizer, ...) is added."""
    inner = unwrap_model(model)
    num_classes = int(getattr(inner, "num_classes"))
    if label_map.num_classes != num_classes:
        raise ValueError(f"label map has {label_map.num_classes} classes but the model has {num_classes}")
    return {
        "model": inner.state_dict(),
        **label_map.to_checkpoint(),
        "backbone": str(getattr(inner, "backbone_name")),
        "num_classes": num_classes,
        **extra,
    }
