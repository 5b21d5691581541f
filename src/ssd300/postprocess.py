"""Batched decoding and per-class NMS: raw model outputs -> per-image detections (SPEC §5).

For each image and each class except background: keep scores > ``score_threshold`` (0.05), the
``topk_per_class`` (200) best, non-maximum suppression at ``iou_threshold`` (0.45; 0.5 for COCO
evaluation); then the ``max_detections`` (200) best of the image over all classes, returned in
descending score order, boxes clipped to the image (:func:`clip_boxes`). The settings are one
validated :class:`PostprocessConfig` (:data:`COCO_EVAL` for COCO evaluation).

The whole batch is processed at once: one softmax (only for the default boxes where some class
can pass the threshold, see :func:`_candidate_probabilities`), one threshold, one sort that
groups the candidates by (image, class) and orders them by score, one NMS step over all groups,
one sort by (image, score). The core, :func:`postprocess_flat`, is tensor in / tensor out and returns flat
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

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torchvision

from ssd300.box_coder import decode_boxes
from ssd300.default_boxes import DefaultBoxes
from ssd300.errors import UserInputError

NmsStrategy = Literal["auto", "per_group", "matrix", "offsets"]

_SCORE_BITS = 31  # a positive float32's bit pattern fits in 31 bits and orders like the float
# Margin (in log space) of the test that skips default boxes where no class can pass the score
# threshold: far above the error of any exp() implementation.
_LOG_SLACK = 0.01


@dataclass(frozen=True)
class PostprocessConfig:
    """The post-processing settings (SPEC §5), validated once; the defaults are the reference's.

    Every user of post-processing (PostProcessor, Detector, export, hub, the CLIs' defaults)
    takes its settings from here. :data:`COCO_EVAL` is the variant the reference evaluates with.
    """

    score_threshold: float = 0.05  # keep class scores above this
    iou_threshold: float = 0.45  # NMS suppresses a box overlapping a better one by more than this
    topk_per_class: int = 200  # best candidates per (image, class) that enter NMS
    max_detections: int = 200  # detections kept per image, over all classes

    def __post_init__(self) -> None:
        def bad(field_name: str, rule: str, value: object) -> UserInputError:
            flag = "--" + field_name.replace("_", "-")
            return UserInputError(f"{flag} ({field_name}) must be {rule}, got {value!r}")

        # Plain Python numbers (numpy or tensor scalars would not serialise into export metadata).
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise bad(name, "a number", value)
            object.__setattr__(self, name, float(value))
        for name in ("topk_per_class", "max_detections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise bad(name, "an integer >= 1", value)
            object.__setattr__(self, name, int(value))
        if not 0.0 <= self.score_threshold <= 1.0:
            raise bad("score_threshold", "in [0, 1]", self.score_threshold)
        if not 0.0 < self.iou_threshold <= 1.0:
            raise bad("iou_threshold", "in (0, 1]", self.iou_threshold)

    def replace(self, **changes: Any) -> "PostprocessConfig":
        """A copy with some settings changed (validated again); ``None`` values keep the setting."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# The reference's COCO evaluation: NMS at IoU 0.5 (SPEC §5).
COCO_EVAL = PostprocessConfig(iou_threshold=0.5)


def clip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised ltrb boxes clipped to the image, [0, 1]: the one clipping rule of every path.

    Applied after NMS, so suppression decisions stay the reference's (it does not clip); a clipped
    box never overlaps a ground-truth box (which lies inside the image) less than before.
    """
    return boxes.clamp(0.0, 1.0)


def boxes_to_pixels(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Normalised ltrb boxes (..., 4) -> pixels of images of (width, height) ``image_sizes`` (..., 2).

    Boxes from :func:`clip_boxes` stay inside [0, width] x [0, height].
    """
    sizes = image_sizes.to(device=boxes.device, dtype=boxes.dtype)
    return boxes * torch.cat((sizes, sizes), dim=-1)


@dataclass
class Detections:
    """Detections of one image, best first."""

    boxes: torch.Tensor  # (K, 4) ltrb, normalised, clipped to [0, 1]
    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,) int64, 1..C-1
    boxes_pixels: Optional[torch.Tensor] = None  # (K, 4) ltrb in the original image's pixels

    def __len__(self) -> int:
        return self.scores.shape[0]


def _candidate_probabilities(
    logits: torch.Tensor, score_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities > ``score_threshold`` (background excluded) of (N, C, A) logits ->
    (flat index (image * C + class) * A + default box; probability), in (image, default box,
    class) order, so within each (image, class) the default boxes ascend.

    The softmax is computed only for the default boxes where some class can pass:
    p_c <= exp(logit_c - max logit), so a box whose best foreground logit is below the overall
    best plus log(threshold) has no candidate; with realistic scores that skips almost every box.
    """
    num_images, num_classes, num_anchors = logits.shape
    if score_threshold > 0 and num_classes > 1:
        best_foreground = logits[:, 1:].amax(dim=1)  # (N, A)
        best = torch.maximum(best_foreground, logits[:, 0])
        possible = best_foreground - best >= math.log(score_threshold) - _LOG_SLACK
        box_index = possible.view(-1).nonzero().squeeze(1)  # image * A + default box, ascending
    else:
        box_index = None
    if box_index is None or 2 * box_index.shape[0] > num_images * num_anchors:
        # Most boxes kept (e.g. untrained logits, threshold 0): every box, without gathering.
        rows = torch.softmax(logits, dim=1).transpose(1, 2).reshape(-1, num_classes)
        box_index = None  # row r is box r: no index to gather through
    else:
        # Gather the kept boxes' logits straight from the (N, C, A) tensor: reshaping its transpose
        # first would copy all N x A x C logits (22 MB at batch 8), which costs more than the softmax.
        images, anchors = box_index // num_anchors, box_index % num_anchors
        rows = torch.softmax(logits.transpose(1, 2)[images, anchors], dim=1)  # (K, C)
    above = rows > score_threshold
    above[:, 0] = False
    row, cls = above.nonzero(as_tuple=True)
    boxes_of_rows = row if box_index is None else box_index[row]
    flat = ((boxes_of_rows // num_anchors) * num_classes + cls) * num_anchors + boxes_of_rows % num_anchors
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


def _nms_per_group(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                   iou_threshold: float) -> torch.Tensor:
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
    config: PostprocessConfig = PostprocessConfig(),
    nms: NmsStrategy = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode + per-class NMS of a batch -> flat (boxes (K,4) ltrb, scores (K,), labels (K,), image_index (K,)).

    ``locs`` (N, 4, A), ``logits`` (N, C, A); ``dboxes_xywh`` (A, 4) on the same device.
    Detections are ordered by image, then by descending score; boxes are clipped to the image.
    """
    num_images, num_classes, num_anchors = logits.shape
    device = logits.device
    if nms == "auto":
        nms = "per_group" if device.type == "cpu" else "matrix"

    # Flat index = (image * C + class) * A + anchor; background never a candidate.
    candidates, candidate_scores = _candidate_probabilities(logits.float(), config.score_threshold)
    groups = candidates // num_anchors  # image * C + class

    # Group by (image, class), best score first; a stable sort keeps lower anchors first on ties.
    order = torch.sort(_descending_score_key(groups, candidate_scores), stable=True).indices
    rank = _rank_within_groups(groups[order])
    top = rank < config.topk_per_class
    order, rank = order[top], rank[top]
    candidates, candidate_scores, groups = candidates[order], candidate_scores[order], groups[order]

    images = groups // num_classes
    anchors = candidates % num_anchors
    all_boxes = decode_boxes(locs, dboxes_xywh, scale_xy, scale_wh).reshape(-1, 4)
    candidate_boxes = all_boxes[images * num_anchors + anchors]

    if nms == "per_group":
        keep = _nms_per_group(candidate_boxes, candidate_scores, groups, config.iou_threshold)
    elif nms == "matrix":
        keep = _nms_matrix(candidate_boxes, groups, rank, config.iou_threshold)
    elif nms == "offsets":
        keep = _nms_offsets(candidate_boxes, candidate_scores, groups, config.iou_threshold)
    else:
        raise ValueError(f"unknown NMS strategy {nms!r}")
    kept_boxes, kept_scores, kept_groups, kept_images = (
        candidate_boxes[keep], candidate_scores[keep], groups[keep], images[keep]
    )

    # Best max_detections of each image; a stable sort keeps lower classes first on ties.
    order = torch.sort(_descending_score_key(kept_images, kept_scores), stable=True).indices
    order = order[_rank_within_groups(kept_images[order]) < config.max_detections]
    labels = kept_groups[order] % num_classes
    return clip_boxes(kept_boxes[order]), kept_scores[order], labels, kept_images[order]


class PostProcessor:
    """``PostProcessor(default_boxes, config)(locs, logits, image_sizes=None) -> list[Detections]``.

    Settings come from ``config`` (default: :class:`PostprocessConfig`'s); keyword ``overrides``
    (``score_threshold=0.1``, ...) change single settings of it.
    """

    def __init__(
        self,
        default_boxes: DefaultBoxes,
        config: Optional[PostprocessConfig] = None,
        nms: NmsStrategy = "auto",
        **overrides: float,
    ) -> None:
        self.default_boxes = default_boxes
        self.config = (config or PostprocessConfig()).replace(**overrides)
        self.nms = nms

    def flat(self, locs: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat (boxes, scores, labels, image_index) of the whole batch; see :func:`postprocess_flat`."""
        dboxes = self.default_boxes.to(logits.device)
        return postprocess_flat(locs, logits, dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh, self.config, self.nms)

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
            raise ValueError(f"image_sizes must be ({num_images}, 2) as (width, height), "
                             f"got {tuple(image_sizes.shape)}")
        boxes, scores, labels, image_index = self.flat(locs, logits)
        counts = torch.bincount(image_index, minlength=num_images).tolist()
        per_image_pixels: list[Optional[torch.Tensor]] = [None] * num_images
        if image_sizes is not None:
            per_image_pixels = list(boxes_to_pixels(boxes, image_sizes.to(boxes.device)[image_index]).split(counts))
        return [
            Detections(b, s, l, p)
            for b, s, l, p in zip(boxes.split(counts), scores.split(counts), labels.split(counts), per_image_pixels)
        ]
