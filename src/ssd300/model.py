"""SSD300 v1.1: ResNet trunk, five additional blocks and six loc/conf heads (SPEC §1).

The model returns raw head outputs only: ``locs (N, 4, 8732)`` and ``logits (N, C, 8732)`` in the
reference's coordinate-major layout. Default boxes, decoding and NMS live in their own modules.
Module and parameter names equal the reference's, so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .backbone import BACKBONE_CHANNELS, ResNetTrunk, check_backbone_name
from .default_boxes import DefaultBoxesConfig
from .errors import UserInputError

# Middle width of each additional block's 1x1 -> 3x3 bottleneck.
_BLOCK_MID_CHANNELS: tuple[int, ...] = (256, 256, 128, 128, 128)


def _additional_block(in_ch: int, mid_ch: int, out_ch: int, downsample: bool) -> nn.Sequential:
    # Blocks 0-2 halve the map (stride 2, pad 1); blocks 3-4 shrink 5->3->1 with an unpadded 3x3.
    stride, padding = (2, 1) if downsample else (1, 0)
    return nn.Sequential(
        nn.Conv2d(in_ch, mid_ch, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_ch, out_ch, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SSD300(nn.Module):
    """SSD300 with a ResNet trunk. ``forward(images (N,3,300,300)) -> (locs, logits)``."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 81,
        backbone_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        check_backbone_name(backbone)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise UserInputError(
                f"num_classes must be an integer >= 2 (background + at least one class), got {num_classes!r}"
            )
        self.backbone_name = backbone
        self.num_classes = num_classes
        # The default-box geometry is the one owner of the boxes per cell of each feature map.
        self.boxes_per_location = DefaultBoxesConfig().boxes_per_location
        channels = BACKBONE_CHANNELS[backbone]

        self.feature_extractor = ResNetTrunk(backbone, backbone_path)
        self.additional_blocks = nn.ModuleList(
            _additional_block(channels[i], _BLOCK_MID_CHANNELS[i], channels[i + 1], downsample=i < 3)
            for i in range(5)
        )
        self.loc = nn.ModuleList(
            nn.Conv2d(ch, nd * 4, kernel_size=3, padding=1) for nd, ch in zip(self.boxes_per_location, channels)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(ch, nd * num_classes, kernel_size=3, padding=1)
            for nd, ch in zip(self.boxes_per_location, channels)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Only the new layers: the trunk keeps torchvision's init (or the loaded ImageNet weights).
        for part in (self.additional_blocks, self.loc, self.conf):
            for param in part.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.feature_extractor(x)
        features = [feature]
        for block in self.additional_blocks:
            feature = block(feature)
            features.append(feature)
        n = x.shape[0]
        locs: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for i, (loc_head, conf_head) in enumerate(zip(self.loc, self.conf)):
            # reshape, not view: with channels-last the head output is NHWC in memory. Flattening
            # (nd*4, H, W) as (4, nd*H*W) gives box index anchor*H*W + row*W + col (SPEC §1).
            locs.append(loc_head(features[i]).reshape(n, 4, -1))
            logits.append(conf_head(features[i]).reshape(n, self.num_classes, -1))
        return torch.cat(locs, dim=2).contiguous(), torch.cat(logits, dim=2).contiguous()

    def fuse(self) -> "SSD300":
        """An equivalent inference-only copy (see :func:`fuse_for_inference`)."""
        return fuse_for_inference(self)


def fuse_for_inference(model: SSD300) -> SSD300:
    """Return an eval-mode copy with every BatchNorm folded into the convolution before it.

    Same outputs as ``model.eval()`` (up to float rounding) with fewer kernels per forward. The
    copy has different state-dict keys (convs gain biases, BNs become Identity): use it for
    inference and export, not for training or checkpoints. ``model`` itself is not changed.
    """
    fused = copy.deepcopy(model).eval()
    trunk: Any = fused.feature_extractor.feature_extractor  # conv1, bn1, relu, maxpool, layer1..3
    trunk[0] = fuse_conv_bn_eval(trunk[0], trunk[1])
    trunk[1] = nn.Identity()
    block: Any
    for layer in trunk[4:]:
        for block in layer:
            for idx in (1, 2, 3):
                conv, bn = getattr(block, f"conv{idx}", None), getattr(block, f"bn{idx}", None)
                if conv is not None and bn is not None:
                    setattr(block, f"conv{idx}", fuse_conv_bn_eval(conv, bn))
                    setattr(block, f"bn{idx}", nn.Identity())
            if block.downsample is not None:
                block.downsample[0] = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    for block in fused.additional_blocks:
        for conv_idx in (0, 3):
            block[conv_idx] = fuse_conv_bn_eval(block[conv_idx], block[conv_idx + 1])
            block[conv_idx + 1] = nn.Identity()
    return fused
