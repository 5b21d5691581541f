"""Transfer learning to other classes: initialise an SSD300 from a checkpoint trained on other classes.

Everything but the classifier (trunk, additional blocks, box-regression heads) is copied as it is.
A confidence head has ``nd * C`` output channels (SPEC §1: reshaped to ``(N, C, nd*H*W)``), so the
channels of class ``c`` are ``c*nd .. c*nd + nd - 1``, one per default box of a cell. For every
class of the new label map whose name matches a source class (case-insensitive; the background
row always), those ``nd`` rows of weight and bias are copied, for every anchor of every head;
the other classes keep the model's own initialisation, the reference's (Xavier-uniform weights,
PyTorch's default bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_architecture, model_state_dict, unwrap_model
from .errors import UserInputError
from .labels import LabelMap


@dataclass(frozen=True)
class TransferSummary:
    """What :func:`init_from_checkpoint` did: tensors copied, classes mapped (target name <- source
    name), classes initialised fresh."""

    kept: int
    mapped: tuple[tuple[str, str], ...]
    new: tuple[str, ...]

    def describe(self, source: str) -> str:
        mapped = ", ".join(t if t == s else f"{t} <- {s}" for t, s in self.mapped) or "none"
        new = ", ".join(self.new) or "none"
        return (f"initialised from {source}: {self.kept} tensors kept (trunk, extra layers, box heads); "
                f"{len(self.mapped)} classes mapped ({mapped}); {len(self.new)} new ({new})")


def source_label_map(checkpoint: Mapping[str, Any], source: str) -> LabelMap:
    _, num_classes = checkpoint_architecture(checkpoint, source)
    try:
        return LabelMap.from_checkpoint(checkpoint, num_classes=num_classes)
    except ValueError as exc:
        raise UserInputError(f"{source}: {exc}") from None


def class_mapping(source: LabelMap, target: LabelMap) -> dict[int, int]:
    """{target label: source label} for background (0 -> 0) and every target class whose name
    matches a source class's, case-insensitively."""
    by_name: dict[str, int] = {}
    for label, name in enumerate(source.names[1:], start=1):
        by_name.setdefault(name.casefold(), label)
    mapping = {0: 0}
    for label, name in enumerate(target.names[1:], start=1):
        if name.casefold() in by_name:
            mapping[label] = by_name[name.casefold()]
    return mapping


def init_from_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any], label_map: LabelMap,
                         source: str = "init_from") -> TransferSummary:
    """Load ``checkpoint``'s weights into ``model`` (an SSD300 for ``label_map``'s classes),
    mapping the classifier rows by class name. Backbones must be the same."""
    target = unwrap_model(model)
    backbone, _ = checkpoint_architecture(checkpoint, source)
    if backbone != getattr(target, "backbone_name", None):
        raise UserInputError(f"{source}: its backbone is {backbone} but the model's is "
                             f"{getattr(target, 'backbone_name', None)} (choose backbone {backbone})",
                             fields=("init_from", "backbone"))
    src_map = source_label_map(checkpoint, source)
    state = model_state_dict(checkpoint, source)
    own = target.state_dict()
    mapping = class_mapping(src_map, label_map)
    missing = [k for k in own if k not in state]
    if missing:
        raise UserInputError(f"{source}: weights do not fit the model: {len(missing)} missing keys (e.g. {missing[0]})")
    new_state: dict[str, torch.Tensor] = {}
    kept = 0
    nd_of = getattr(target, "boxes_per_location")
    for key, value in own.items():
        if key.startswith("conf."):
            head = int(key.split(".")[1])
            new_state[key] = _map_rows(value, state[key], mapping, nd_of[head], src_map.num_classes)
            continue
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserInputError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model's is "
                                 f"{tuple(value.shape)}")
        new_state[key] = state[key]
        kept += 1
    target.load_state_dict(new_state, strict=True)
    mapped = tuple((label_map.names[t], src_map.names[s]) for t, s in sorted(mapping.items()) if t != 0)
    new = tuple(name for t, name in enumerate(label_map.names) if t not in mapping)
    return TransferSummary(kept, mapped, new)


def _map_rows(own: torch.Tensor, src: torch.Tensor, mapping: dict[int, int], nd: int,
              src_classes: int) -> torch.Tensor:
    """A conf head's weight or bias: the model's own, with the ``nd`` rows of each mapped class
    taken from the source's rows of its source class."""
    if src.shape[0] != nd * src_classes or tuple(src.shape[1:]) != tuple(own.shape[1:]):
        raise UserInputError(f"checkpoint confidence head of shape {tuple(src.shape)} does not fit "
                             f"{nd} boxes x {src_classes} classes")
    out = own.clone()
    src = src.to(dtype=own.dtype, device=own.device)
    for t, s in mapping.items():
        out[t * nd:(t + 1) * nd] = src[s * nd:(s + 1) * nd]
    return out


def set_backbone_frozen(model: nn.Module, epoch: int, frozen_epochs: int, distributed: bool) -> str | None:
    """Freeze the trunk (no gradients, BatchNorm in eval) for epochs < ``frozen_epochs``, train it
    after: a function of the epoch alone, so a resumed run freezes exactly as the straight run.
    Returns the log line when the state changed, else None."""
    if not frozen_epochs:
        return None
    if distributed:  # DDP's reducer expects the gradients of the parameters it was built with
        raise UserInputError("freeze_backbone_epochs: not supported with several processes (torchrun) yet",
                             fields=("freeze_backbone_epochs",))
    frozen = epoch < frozen_epochs
    trunk: Any = unwrap_model(model).feature_extractor  # a ResNetTrunk
    if trunk.frozen == frozen:
        return None
    trunk.freeze(frozen)
    return f"epoch {epoch}: backbone {'frozen' if frozen else 'trained'} (freeze_backbone_epochs {frozen_epochs})"
