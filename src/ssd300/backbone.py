"""The ResNet trunk of SSD300: torchvision's ResNet cut after layer3, with conv4_x at stride 1.

Keeping layer3 at stride 1 makes the trunk output 38 x 38 for a 300 x 300 input (stride 8), the
first of the six feature maps. The trunk's children are kept by index in ``feature_extractor`` so
that state-dict keys match the reference (``feature_extractor.<0..6>....``).

ImageNet weights come from a local file in torchvision's state-dict format (``weights_path``);
:func:`imagenet_weights_path` gives torchvision's published file for a backbone, downloaded once
into torch's hub cache and hash-checked (:mod:`ssd300.weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models

from .errors import UserInputError
from .files import read_torch_file, strip_module_prefix
from .weights import fetch, imagenet_weights

_RESNETS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
    "resnet152": models.resnet152,
}

BACKBONES: tuple[str, ...] = tuple(_RESNETS)

# Channels of the six feature maps fed to the heads (SPEC §1): the trunk's output, then the five
# additional blocks' outputs.
BACKBONE_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "resnet18": (256, 512, 512, 256, 256, 128),
    "resnet34": (256, 512, 512, 256, 256, 256),
    "resnet50": (1024, 512, 512, 256, 256, 256),
    "resnet101": (1024, 512, 512, 256, 256, 256),
    "resnet152": (1024, 512, 512, 256, 256, 256),
}

# conv1, bn1, relu, maxpool, layer1, layer2, layer3: layer4, avgpool and fc are dropped.
_TRUNK_CHILDREN = 7


# torchvision's ImageNet weight files (``ResNet<n>_Weights.IMAGENET1K_V1``) for ``backbone_path``; the
# 8 hex digits in each name are the first 8 of the file's sha256 (torch.hub checks them so too).
TORCHVISION_IMAGENET_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth", "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth", "resnet152": "resnet152-394f9c45.pth",
}


def imagenet_weights_path(name: str) -> Path:
    """torchvision's ``IMAGENET1K_V1`` file for backbone ``name``: from torch's hub cache, else
    downloaded there (hash-checked); offline, one line naming the URL and where to place the file."""
    return fetch(imagenet_weights(check_backbone_name(name)))


def cached_imagenet_weights(name: str) -> Path | None:
    """The ImageNet file of backbone ``name`` when it is already in torch's hub cache (no network)."""
    path = imagenet_weights(check_backbone_name(name)).path
    return path if path.is_file() else None


def check_backbone_name(name: str) -> str:
    if name not in _RESNETS:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}",
                             fields=("backbone",))
    return name


class ResNetTrunk(nn.Module):
    """conv1 .. layer3 of a torchvision ResNet, first block of layer3 at stride 1."""

    def __init__(self, name: str = "resnet50", weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.name = check_backbone_name(name)
        resnet = _RESNETS[name](weights=None)
        if weights_path is not None:
            load_resnet_weights(resnet, weights_path, name)
        self.out_channels = BACKBONE_CHANNELS[name][0]
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:_TRUNK_CHILDREN])
        _set_first_block_stride_one(self.feature_extractor[-1])

    frozen: bool = False

    def freeze(self, frozen: bool = True) -> None:
        """Freeze (or thaw) the trunk: no gradients, BatchNorm in eval mode even under ``model.train()``."""
        self.frozen = frozen
        for param in self.parameters():
            param.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetTrunk":
        super().train(mode)
        if self.frozen:
            self.feature_extractor.eval()  # running statistics stay those of the loaded weights
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)


def _set_first_block_stride_one(layer3: nn.Module) -> None:
    block: Any = layer3[0]  # type: ignore[index]  # a torchvision Bottleneck/BasicBlock
    block.conv1.stride = (1, 1)
    block.conv2.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def load_resnet_weights(resnet: nn.Module, weights_path: str | Path, arch: str = "ResNet") -> None:
    """Load a torchvision-format ResNet state dict from a local file, strictly.

    The file may hold the state dict itself, or a dict wrapping it under ``state_dict``/``model``;
    ``module.`` prefixes (DataParallel) are stripped. ``fc`` is ignored (it may be missing or of
    another size).
    """
    path = Path(weights_path)
    obj = read_torch_file(path, "backbone weights")
    state = _unwrap_state_dict(obj)
    if state is None:
        raise UserInputError(f"backbone weights {path}: not a state dict (found {type(obj).__name__})")
    # The classifier is dropped with layer4, so its presence or shape (a fine-tuned fc) is irrelevant.
    state = {k: v for k, v in ((strip_module_prefix(k), v) for k, v in state.items()) if not k.startswith("fc.")}
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserInputError(
            f"backbone weights {path}: does not match torchvision's {arch}: {'; '.join(detail)}"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserInputError(
                f"backbone weights {path}: {key} has shape {shape}, {arch} expects "
                f"{tuple(expected[key].shape)} (weights of another architecture?)"
            )
    resnet.load_state_dict(state, strict=False)


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping):
        return None
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    if not obj or not all(isinstance(k, str) for k in obj):
        return None
    return dict(obj)

