"""Batched decoding and per-class NMS: raw model outputs -> per-image detections (SPEC §5).

For each image and each class except background: keep scores > ``score_threshold`` (0.05), the
``topk_per_class`` (200) best, non-maximum suppression at ``iou_threshold`` (0.45; 0.5 for COCO
evaluation); then the ``max_detections`` (200) best of the image over all classes, returned in
descending score order.

The whole batch is processed at once: one softmax, one threshold, one sort that groups the
candidates by (image, class) and orders them by score, one NMS step over all groups, one sort by
(image, score). The core, :func:`postprocess_flat`, is tensor in / tensor out and returns flat
tensors plus the image index of each detection; :class:`PostProcessor` splits them per image.

Ties are broken deterministically, the same way a plain per-image, per-class loop with stable
sorts does: equal scores keep the lower class first, then the lower default-box index.

NMS is exact, i.e. it gives the same result as ``torchvision.ops.nms`` run on every (image,
class) group separately. Three interchangeable strategies (``nms=``):

* ``"per_group"``: ``torchvision.ops.nms`` on each non-empty (image, class) group. Fastest on
  CPU (the groups are contiguous slices, so the loop does no searching).
* ``"matrix"``: all groups padded to the largest one, their IoU matrices computed at once and the
  greedy suppression run column by column; few kernel launches, suited to GPUs.
* ``"offsets"``: ``torchvision.ops.batched_nms`` (boxes shifted apart per group, one NMS call).
  Exportable to ONNX, but the shifted coordinates lose float32 precision when there are many
  groups, so a few suppression decisions near the threshold can differ from the exact result.

``"auto"`` picks ``"per_group"`` on CPU and ``"matrix"`` on other devices.

Note: the reference's own NMS suppresses a box when IoU >= threshold, torchvision (and we) when
IoU > threshold; only an IoU exactly equal to the threshold is treated differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torchvision

from ssd300.box_coder import decode_boxes
from ssd300.default_boxes import DefaultBoxes

NmsStrategy = Literal["auto", "per_group", "matrix", "offsets"]

_SCORE_BITS = 31  # a positive float32's bit pattern fits in 31 bits and orders like the float


@dataclass
class Detections:
    """Detections of one image, best first."""

    boxes: torch.Tensor  # (K, 4) ltrb, normalised to [0, 1] (may extend slightly beyond)
    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,) int64, 1..C-1
    boxes_pixels: Optional[torch.Tensor] = None  # (K, 4) ltrb in the original image's pixels

    def __len__(self) -> int:
        return self.scores.shape[0]


def _descending_score_key(group: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort by group ascending, then score descending (scores must be > 0)."""
    score_bits = scores.contiguous().view(torch.int32).long()
    return (group << _SCORE_BITS) | ((1 << _SCORE_BITS) - 1 - score_bits)


def _rank_within_groups(sorted_groups: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal values in a sorted 1-D tensor."""
    first = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    return torch.arange(sorted_groups.shape[0], device=sorted_groups.device) - first


def _pairwise_iou_exact(boxes: torch.Tensor) -> torch.Tensor:
    """IoU within each group of (S, K, 4) ltrb boxes -> (S, K, K), with torchvision nms's arithmetic."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.min(x2[:, :, None], x2[:, None, :]) - torch.max(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    h = (torch.min(y2[:, :, None], y2[:, None, :]) - torch.max(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = w * h
    return inter / (areas[:, :, None] + areas[:, None, :] - inter)


def _nms_matrix(boxes: torch.Tensor, groups: torch.Tensor, rank: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of all groups at once; candidates are sorted by (group, score desc)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=boxes.device)
    # Compact the non-empty groups into rows of a padded (S, K) layout.
    new_group = torch.ones_like(groups, dtype=torch.bool)
    new_group[1:] = groups[1:] != groups[:-1]
    row = torch.cumsum(new_group, 0) - 1
    num_rows = int(row[-1].item()) + 1
    width = int(rank.max().item()) + 1
    padded = boxes.new_zeros((num_rows, width, 4))
    padded[row, rank] = boxes
    present = torch.zeros((num_rows, width), dtype=torch.bool, device=boxes.device)
    present[row, rank] = True
    # Compare in float64 like torchvision's kernel (float IoU promoted against a double threshold).
    overlaps = _pairwise_iou_exact(padded).double() > iou_threshold
    overlaps &= torch.ones(width, width, dtype=torch.bool, device=boxes.device).triu(1)
    suppressed = ~present
    for column in range(width):
        kept_here = ~suppressed[:, column : column + 1]
        suppressed |= kept_here & overlaps[:, column, :]
    return ~suppressed[row, rank]


def _nms_per_group(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.nms on each contiguous group; candidates are sorted by (group, score desc)."""
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0:
        return keep
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    start = 0
    for count in counts.tolist():
        if count == 1:
            keep[start] = True
        else:
            kept = torchvision.ops.nms(boxes[start : start + count], scores[start : start + count], iou_threshold)
            keep[start + kept] = True
        start += count
    return keep


def _nms_offsets(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep[torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)] = True
    return keep


def postprocess_flat(
    locs: torch.Tensor,
    logits: torch.Tensor,
    dboxes_xywh: torch.Tensor,
    scale_xy: float = 0.1,
    scale_wh: float = 0.2,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.45,
    topk_per_class: int = 200,
    max_detections: int = 200,
    nms: NmsStrategy = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode + per-class NMS of a batch -> flat (boxes (K,4) ltrb, scores (K,), labels (K,), image_index (K,)).

    ``locs`` (N, 4, A), ``logits`` (N, C, A); ``dboxes_xywh`` (A, 4) on the same device.
    Detections are ordered by image, then by descending score.
    """
    if score_threshold < 0:
        raise ValueError("score_threshold must be >= 0")
    num_images, num_classes, num_anchors = logits.shape
    device = logits.device
    if nms == "auto":
        nms = "per_group" if device.type == "cpu" else "matrix"

    # One softmax. Flat index = (image * C + class) * A + anchor; background never a candidate.
    probabilities = torch.softmax(logits.float(), dim=1)
    above = probabilities > score_threshold
    above[:, 0] = False
    candidates = torch.nonzero(above.view(-1)).squeeze(1)
    candidate_scores = probabilities.view(-1)[candidates]
    groups = candidates // num_anchors  # image * C + class

    # Group by (image, class), best score first; a stable sort keeps lower anchors first on ties.
    order = torch.sort(_descending_score_key(groups, candidate_scores), stable=True).indices
    rank = _rank_within_groups(groups[order])
    top = rank < topk_per_class
    order, rank = order[top], rank[top]
    candidates, candidate_scores, groups = candidates[order], candidate_scores[order], groups[order]

    images = groups // num_classes
    anchors = candidates % num_anchors
    all_boxes = decode_boxes(locs, dboxes_xywh, scale_xy, scale_wh).reshape(-1, 4)
    candidate_boxes = all_boxes[images * num_anchors + anchors]

    if nms == "per_group":
        keep = _nms_per_group(candidate_boxes, candidate_scores, groups, iou_threshold)
    elif nms == "matrix":
        keep = _nms_matrix(candidate_boxes, groups, rank, iou_threshold)
    elif nms == "offsets":
        keep = _nms_offsets(candidate_boxes, candidate_scores, groups, iou_threshold)
    else:
        raise ValueError(f"unknown NMS strategy {nms!r}")
    kept_boxes, kept_scores, kept_groups, kept_images = (
        candidate_boxes[keep], candidate_scores[keep], groups[keep], images[keep]
    )

    # Best max_detections of each image; a stable sort keeps lower classes first on ties.
    order = torch.sort(_descending_score_key(kept_images, kept_scores), stable=True).indices
    order = order[_rank_within_groups(kept_images[order]) < max_detections]
    labels = kept_groups[order] % num_classes
    return kept_boxes[order], kept_scores[order], labels, kept_images[order]


class PostProcessor:
    """``PostProcessor(default_boxes)(locs, logits, image_sizes=None) -> list[Detections]``."""

    def __init__(
        self,
        default_boxes: DefaultBoxes,
        score_threshold: float = 0.05,
        iou_threshold: float = 0.45,
        topk_per_class: int = 200,
        max_detections: int = 200,
        nms: NmsStrategy = "auto",
    ) -> None:
        self.default_boxes = default_boxes
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.topk_per_class = topk_per_class
        self.max_detections = max_detections
        self.nms = nms

    def flat(self, locs: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat (boxes, scores, labels, image_index) of the whole batch; see :func:`postprocess_flat`."""
        dboxes = self.default_boxes.to(logits.device)
        return postprocess_flat(
            locs, logits, dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh,
            self.score_threshold, self.iou_threshold, self.topk_per_class, self.max_detections, self.nms,
        )

    @torch.no_grad()
    def __call__(
        self, locs: torch.Tensor, logits: torch.Tensor, image_sizes: Optional[torch.Tensor] = None
    ) -> list[Detections]:
        """Per-image detections; ``image_sizes`` (N, 2) as (width, height) adds ``boxes_pixels``."""
        if locs.dim() != 3 or logits.dim() != 3 or locs.shape[1] != 4 or locs.shape[0] != logits.shape[0] \
                or locs.shape[2] != logits.shape[2]:
            raise ValueError(
                f"expected locs (N, 4, A) and logits (N, C, A), got {tuple(locs.shape)} and {tuple(logits.shape)}"
            )
        num_images = logits.shape[0]
        if image_sizes is not None and tuple(image_sizes.shape) != (num_images, 2):
            raise ValueError(f"image_sizes must be ({num_images}, 2) as (width, height), got {tuple(image_sizes.shape)}")
        boxes, scores, labels, image_index = self.flat(locs, logits)
        counts = torch.bincount(image_index, minlength=num_images).tolist()
        per_image_pixels: list[Optional[torch.Tensor]] = [None] * num_images
        if image_sizes is not None:
            scale = image_sizes.to(boxes).repeat(1, 2)  # (N, 4): w, h, w, h
            per_image_pixels = list((boxes * scale[image_index]).split(counts))
        return [
            Detections(b, s, l, p)
            for b, s, l, p in zip(boxes.split(counts), scores.split(counts), labels.split(counts), per_image_pixels)
        ]
