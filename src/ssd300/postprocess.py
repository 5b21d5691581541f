"""Batched decoding and per-class NMS: raw model outputs -> per-image detections (SPEC §5).

For each image and each class except background: keep scores > ``score_threshold`` (0.05), the
``topk_per_class`` (200) best, non-maximum suppression at ``iou_threshold`` (0.45; 0.5 for COCO
evaluation); then the ``max_detections`` (200) best of the image over all classes, returned in
descending score order.

The whole batch is processed at once: one softmax (only for the default boxes where some class
can pass the threshold, bit-identical to ``torch.softmax`` per image on one thread, see
:func:`_candidate_probabilities`), one threshold, one sort that groups the
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

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torchvision

from ssd300.box_coder import decode_boxes
from ssd300.default_boxes import DefaultBoxes

NmsStrategy = Literal["auto", "per_group", "matrix", "offsets"]

_SCORE_BITS = 31  # a positive float32's bit pattern fits in 31 bits and orders like the float
# Columns per block for the class softmax: a multiple of every CPU vector width, see
# :func:`_candidate_probabilities`.
_SOFTMAX_BLOCK = 64
# Margin (in log space) of the test that skips default boxes where no class can pass the score
# threshold: far above the error of any exp() implementation.
_LOG_SLACK = 0.01


@dataclass
class Detections:
    """Detections of one image, best first."""

    boxes: torch.Tensor  # (K, 4) ltrb, normalised to [0, 1] (may extend slightly beyond)
    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,) int64, 1..C-1
    boxes_pixels: Optional[torch.Tensor] = None  # (K, 4) ltrb in the original image's pixels

    def __len__(self) -> int:
        return self.scores.shape[0]


def _softmax_rows(rows: torch.Tensor) -> torch.Tensor:
    """Softmax of each row of a (K, C) tensor, computed as ``torch.softmax(x, dim=0)`` computes it
    on a single thread for columns in the vectorised body: in (K / 64, C, 64) blocks."""
    k, num_classes = rows.shape
    pad = (-k) % _SOFTMAX_BLOCK
    if pad:
        rows = torch.cat((rows, rows.new_zeros((pad, num_classes))))
    blocks = rows.view(-1, _SOFTMAX_BLOCK, num_classes).transpose(1, 2).contiguous()  # (K'/64, C, 64)
    return torch.softmax(blocks, dim=1).transpose(1, 2).reshape(-1, num_classes)[:k]


def _candidate_probabilities(
    logits: torch.Tensor, score_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities > ``score_threshold`` (background excluded) of (N, C, A) logits ->
    (flat index (image * C + class) * A + default box; probability), in (image, default box,
    class) order, so within each (image, class) the default boxes ascend.

    Same values as ``torch.softmax(logits[i], dim=0)`` per image on one thread, computed only for
    the default boxes where some class can pass: p_c <= exp(logit_c - max logit), so a box whose
    best foreground logit is below the overall best plus log(threshold) has no candidate; with
    realistic scores that skips almost every box. Why the detour for equal bits: PyTorch's
    softmax over the class dim runs vectorised over default boxes, and the vectorised body and
    the scalar tail of each row round differently (so do the row pieces threads split at); the
    boxes kept are softmaxed in blocks of 64 (body arithmetic, no split inside a block), and the
    last ``A % 64`` boxes, which a whole row computes in its tail, by a softmax over just them.
    """
    num_images, num_classes, num_anchors = logits.shape
    body = num_anchors - num_anchors % _SOFTMAX_BLOCK
    if score_threshold > 0 and num_classes > 1:
        best_foreground = logits[:, 1:].amax(dim=1)  # (N, A)
        best = torch.maximum(best_foreground, logits[:, 0])
        possible = best_foreground - best >= math.log(score_threshold) - _LOG_SLACK
    else:
        possible = torch.ones((num_images, num_anchors), dtype=torch.bool, device=logits.device)
    tail = torch.softmax(logits[:, :, body:], dim=1).transpose(1, 2)  # (N, A - body, C)
    images, anchors = possible[:, :body].nonzero(as_tuple=True)
    if 2 * images.shape[0] > num_images * body:
        # Most boxes kept (e.g. untrained logits): every box, without gathering, in (N, A, C).
        blocks = logits[:, :, :body].reshape(num_images, num_classes, -1, _SOFTMAX_BLOCK).transpose(1, 2)
        rows = torch.softmax(blocks.reshape(-1, num_classes, _SOFTMAX_BLOCK), dim=1)
        rows = rows.view(num_images, -1, num_classes, _SOFTMAX_BLOCK).transpose(2, 3).reshape(num_images, body, num_classes)
        rows = torch.cat((rows, tail), dim=1).view(-1, num_classes)
        anchors = torch.arange(num_anchors, device=logits.device).repeat(num_images)
        images = torch.arange(num_images, device=logits.device).repeat_interleave(num_anchors)
    else:
        rows = _softmax_rows(logits.transpose(1, 2)[images, anchors])  # (K, C)
        tail = tail.reshape(-1, num_classes)
        tail_images = torch.arange(num_images, device=logits.device).repeat_interleave(num_anchors - body)
        tail_anchors = torch.arange(body, num_anchors, device=logits.device).repeat(num_images)
        # Rows in (image, default box) order.
        order = torch.argsort(
            torch.cat((images * num_anchors + anchors, tail_images * num_anchors + tail_anchors))
        )
        rows = torch.cat((rows, tail))[order]
        images = torch.cat((images, tail_images))[order]
        anchors = torch.cat((anchors, tail_anchors))[order]
    above = rows > score_threshold
    above[:, 0] = False
    row, cls = above.nonzero(as_tuple=True)
    flat = (images[row] * num_classes + cls) * num_anchors + anchors[row]
    return flat, rows[row, cls]


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

    # Flat index = (image * C + class) * A + anchor; background never a candidate.
    candidates, candidate_scores = _candidate_probabilities(logits.float(), score_threshold)
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
