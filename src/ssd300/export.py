"""Export SSD300 to ONNX or TorchScript: the whole detector (decoding + NMS) or the raw heads.

Full detector (default)
    input  ``images``  float32 (N, 3, 300, 300), already preprocessed exactly like the model's
           input (RGB resized to 300x300, scaled to [0, 1], normalised with ImageNet mean/std:
           :class:`ssd300.data.transforms.EvalTransform`). N is dynamic.
    output ``boxes``          float32 (N, K, 4)  ltrb, normalised to [0, 1] (multiply by the
                                                  image's width/height for pixels)
           ``scores``         float32 (N, K)      descending within each image
           ``labels``         int64   (N, K)      contiguous labels 1..C-1 (0 in padding rows)
           ``num_detections`` int64   (N,)        valid rows per image; rows beyond are zero
    K = ``max_detections`` (200 by default). The score threshold, NMS IoU and per-class top-k
    are baked into the file (they are recorded in the ONNX metadata).

Raw outputs (``raw=True``)
    ``locs`` (N, 4, 8732) and ``logits`` (N, C, 8732), the model's own outputs, for users who
    decode and run NMS elsewhere (e.g. TensorRT's NMS plugins); the default boxes are in
    :func:`ssd300.default_boxes.default_boxes_300` and the variances are 0.1/0.2 (SPEC §5).

ONNX uses the TorchScript-based exporter (``dynamo=False``): the detector's outputs have
data-dependent sizes (score filtering, NMS) before padding, which the dynamo exporter can only
handle with hand-written guards, while the tracing exporter maps ``torchvision.ops.nms`` to
ONNX ``NonMaxSuppression`` directly. TorchScript is traced (``torch.jit.trace``): every size in
the post-processing is computed with tensor ops, so the traced graph keeps the batch dynamic.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.ops import batched_nms

from ssd300.default_boxes import DefaultBoxes, default_boxes_300
from ssd300.errors import UserInputError

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
FULL_OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUT_NAMES = ("locs", "logits")
DEFAULT_OPSET = 17


def decode_locs(locs: torch.Tensor, dboxes_xywh: torch.Tensor, scale_xy: float, scale_wh: float) -> torch.Tensor:
    """(N, 4, A) regression offsets -> (N, A, 4) ltrb boxes (SPEC §5)."""
    offsets = locs.permute(0, 2, 1)
    xy = scale_xy * offsets[..., :2] * dboxes_xywh[:, 2:] + dboxes_xywh[:, :2]
    wh = torch.exp(scale_wh * offsets[..., 2:]) * dboxes_xywh[:, 2:]
    return torch.cat((xy - 0.5 * wh, xy + 0.5 * wh), dim=-1)


def flat_detections(
    locs: torch.Tensor,
    logits: torch.Tensor,
    dboxes_xywh: torch.Tensor,
    scale_xy: float = 0.1,
    scale_wh: float = 0.2,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.45,
    topk_per_class: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode + per-class NMS for a whole batch with tensor ops only (traceable, exportable).

    Returns flat ``boxes (M, 4)``, ``scores (M,)``, ``labels (M,)``, ``image_index (M,)`` of all
    kept detections of the batch, ordered by descending score (not yet capped per image).
    """
    n, num_classes, num_anchors = logits.shape
    boxes = decode_locs(locs.float(), dboxes_xywh, scale_xy, scale_wh)  # (N, A, 4)
    probs = torch.softmax(logits.float(), dim=1)[:, 1:, :]  # (N, C-1, A), background dropped
    k = min(topk_per_class, num_anchors)
    # Top-k per class first, then the threshold: the same set as "threshold, then top-k".
    cand_scores, cand_anchor = probs.topk(k, dim=2)  # (N, C-1, k)
    cand_scores = cand_scores.reshape(-1)
    keep = torch.nonzero(cand_scores > score_threshold).reshape(-1)
    per_image = (num_classes - 1) * k
    image_index = torch.div(keep, per_image, rounding_mode="floor")
    labels = torch.div(keep % per_image, k, rounding_mode="floor") + 1
    anchor = cand_anchor.reshape(-1)[keep]
    scores = cand_scores[keep]
    boxes = boxes.reshape(-1, 4)[image_index * num_anchors + anchor]
    # One NMS call for the batch: boxes of different (image, class) groups never suppress each other.
    group = image_index * num_classes + labels
    kept = batched_nms(boxes, scores, group, iou_threshold)
    return boxes[kept], scores[kept], labels[kept], image_index[kept]


def pad_per_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_index: torch.Tensor,
    image_ids: torch.Tensor,
    max_detections: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat detections ordered by descending score -> fixed-size (N, K) outputs per image.

    ``image_ids`` is ``arange(N)`` as a tensor, so that N stays dynamic when traced. Each image
    keeps its ``max_detections`` best; rows beyond ``num_detections`` are zero. Tensor ops only
    (no sort, no Python ints from data), so it traces and exports with dynamic sizes.
    """
    one_hot = (image_index.unsqueeze(1) == image_ids.unsqueeze(0)).to(torch.int64)  # (M, N)
    # The input is in descending score order, so a detection's rank within its image is the
    # number of detections of the same image before it.
    rank = (torch.cumsum(one_hot, dim=0) * one_hot).sum(dim=1) - 1
    valid = rank < max_detections
    slot = (image_index * max_detections + rank)[valid]
    zeros = torch.zeros_like(image_ids).unsqueeze(1).repeat(1, max_detections).reshape(-1)  # (N*K,)
    out_boxes = zeros.to(boxes.dtype).unsqueeze(1).repeat(1, 4).index_put((slot,), boxes[valid])
    out_scores = zeros.to(scores.dtype).index_put((slot,), scores[valid])
    out_labels = zeros.index_put((slot,), labels[valid].to(torch.int64))
    num_detections = one_hot.sum(dim=0).clamp(max=max_detections)
    return (
        out_boxes.reshape(-1, max_detections, 4),
        out_scores.reshape(-1, max_detections),
        out_labels.reshape(-1, max_detections),
        num_detections,
    )


class ExportableDetector(nn.Module):
    """SSD300 + decoding + NMS with fixed-size padded outputs (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        default_boxes: DefaultBoxes | None = None,
        score_threshold: float = 0.05,
        iou_threshold: float = 0.45,
        topk_per_class: int = 200,
        max_detections: int = 200,
    ) -> None:
        super().__init__()
        dboxes = default_boxes or default_boxes_300()
        self.model = model
        self.register_buffer("dboxes_xywh", dboxes.xywh.clone(), persistent=False)
        self.scale_xy = float(dboxes.scale_xy)
        self.scale_wh = float(dboxes.scale_wh)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.topk_per_class = int(topk_per_class)
        self.max_detections = int(max_detections)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        locs, logits = self.model(images)
        flat = flat_detections(locs, logits, self.dboxes_xywh, self.scale_xy, self.scale_wh,
                               self.score_threshold, self.iou_threshold, self.topk_per_class)
        # arange(N) built from the input, so that a traced graph keeps the batch size dynamic.
        image_ids = torch.ones_like(images[:, 0, 0, 0], dtype=torch.int64).cumsum(0) - 1
        return pad_per_image(*flat, image_ids, self.max_detections)

    def settings(self) -> dict[str, float | int]:
        return {"score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold,
                "topk_per_class": self.topk_per_class, "max_detections": self.max_detections}
