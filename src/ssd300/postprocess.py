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

Two implementations of the same rules, on purpose (decoding, :func:`clip_boxes` and the settings
are shared; measured in ``benchmarks/bench_postprocess.py``):

* eager, :func:`postprocess_flat` / :class:`PostProcessor`: threshold first, then one stable sort
  with bit-packed keys, ``searchsorted`` ranks and exact per-group NMS. The threshold skips the
  softmax of almost every default box, which is most of its speed; none of these ops traces.
* exportable, :func:`flat_detections` + :func:`pad_per_image` (:class:`ExportablePostprocess`):
  top-k per class first (fixed shapes), one NMS over all groups moved apart on a 2-D grid
  (:func:`nms_over_groups`), fixed-size padded outputs; tensor ops only, so it traces for ONNX
  (legacy and dynamo), ``torch.export`` and TorchScript. Top-k then threshold is the same set as
  threshold then top-k; run eagerly it is slower (the softmax of every box), which is why the
  eager path does not use it. Both give the same detections (tests/test_export.py).

Note: the reference's own NMS suppresses a box when IoU >= threshold, torchvision (and we) when
IoU > threshold; only an IoU exactly equal to the threshold is treated differently.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
import torchvision
from torch import nn

from ssd300.box_coder import decode_boxes
from ssd300.default_boxes import DefaultBoxes, default_boxes_300
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
            return UserInputError(f"{field_name} must be {rule}, got {value!r}", fields=(field_name,))

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


def filter_by_class_thresholds(detections: Sequence[Detections], thresholds: Mapping[int, float]) -> list[Detections]:
    """Each image's detections scoring at least their class's threshold (``{label: threshold}``,
    e.g. an evaluation's F1-best ones, :mod:`ssd300.diagnostics`); labels without one keep all.
    Applied after post-processing, so NMS saw the same candidates as without it."""
    if not thresholds:
        return list(detections)
    out = []
    for det in detections:
        table = torch.zeros(int(det.labels.max()) + 1 if len(det) else 1, dtype=det.scores.dtype,
                            device=det.scores.device)
        for label, value in thresholds.items():
            if 0 <= int(label) < table.numel():
                table[int(label)] = float(value)
        keep = det.scores >= table[det.labels] if len(det) else torch.zeros(0, dtype=torch.bool)
        out.append(Detections(det.boxes[keep], det.scores[keep], det.labels[keep],
                              None if det.boxes_pixels is None else det.boxes_pixels[keep]))
    return out


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


# ----------------------------------------------------------------------------- exportable path


def nms_over_groups(boxes: torch.Tensor, scores: torch.Tensor, column: torch.Tensor, row: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
    """NMS within each (row, column) group in one ``torchvision.ops.nms`` call (exportable).

    Groups are moved apart on a 2-D grid (column along x, row along y) instead of along one axis
    as ``batched_nms`` does: the largest shift is then ~2 * max(C, N) rather than ~2 * N * C,
    which keeps float32 IoUs near-exact (at a shift of 1300 float32 has only ~1e-4 resolution).
    """
    spacing = (boxes.max() - boxes.min()).clamp(min=0) + 1
    shift = torch.stack((column, row, column, row), dim=1).to(boxes.dtype) * spacing
    return torchvision.ops.nms(boxes + shift, scores, iou_threshold)


def flat_detections(
    locs: torch.Tensor,
    logits: torch.Tensor,
    dboxes_xywh: torch.Tensor,
    scale_xy: float = 0.1,
    scale_wh: float = 0.2,
    config: PostprocessConfig = PostprocessConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode + per-class NMS for a whole batch with exportable tensor ops only.

    Same rules as :func:`postprocess_flat` (see the module docstring for why there are two).
    Returns flat ``boxes (M, 4)`` (clipped, :func:`clip_boxes`), ``scores (M,)``, ``labels (M,)``,
    ``image_index (M,)`` of the kept detections of the batch in descending score order
    (``max_detections`` is applied by :func:`pad_per_image`).
    """
    _, num_classes, num_anchors = logits.shape
    boxes = decode_boxes(locs, dboxes_xywh, scale_xy, scale_wh)  # (N, A, 4)
    probs = torch.softmax(logits.float(), dim=1)[:, 1:, :]  # (N, C-1, A), background dropped
    k = min(config.topk_per_class, num_anchors)
    # Top-k per class, then the threshold: the same set as "threshold, then top-k".
    cand_scores, cand_anchor = probs.topk(k, dim=2)  # (N, C-1, k)
    cand_scores = cand_scores.reshape(-1)
    keep = torch.nonzero(cand_scores > config.score_threshold).reshape(-1)
    per_image = (num_classes - 1) * k
    image_index = torch.div(keep, per_image, rounding_mode="floor")
    labels = torch.div(keep % per_image, k, rounding_mode="floor") + 1
    scores = cand_scores[keep]
    anchors = cand_anchor.reshape(-1)[keep]
    boxes = boxes.reshape(-1, 4)[image_index * num_anchors + anchors]
    kept = nms_over_groups(boxes, scores, labels, image_index, config.iou_threshold)
    return clip_boxes(boxes[kept]), scores[kept], labels[kept], image_index[kept]


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


class ExportablePostprocess(nn.Module):
    """``(locs, logits) -> (boxes (N,K,4), scores (N,K), labels (N,K), num_detections (N,))``, the
    exportable post-processing of the full-detector files (fp32 and INT8), K = ``max_detections``."""

    dboxes_xywh: torch.Tensor  # a buffer

    def __init__(self, config: Optional[PostprocessConfig] = None,
                 default_boxes: Optional[DefaultBoxes] = None) -> None:
        super().__init__()
        dboxes = default_boxes or default_boxes_300()
        self.register_buffer("dboxes_xywh", dboxes.xywh.clone(), persistent=False)
        self.scale_xy, self.scale_wh = float(dboxes.scale_xy), float(dboxes.scale_wh)
        self.config = config or PostprocessConfig()

    def forward(self, locs: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = flat_detections(locs, logits, self.dboxes_xywh, self.scale_xy, self.scale_wh, self.config)
        # arange(N) built from the input, so that a traced graph keeps the batch size dynamic.
        image_ids = torch.ones_like(locs[:, 0, 0], dtype=torch.int64).cumsum(0) - 1
        return pad_per_image(*flat, image_ids, self.config.max_detections)


def padded_to_detections(outputs: Sequence[torch.Tensor]) -> list[Detections]:
    """A full detector's padded outputs (boxes, scores, labels, num_detections) -> per-image
    :class:`Detections` (normalised ltrb boxes, best first)."""
    boxes, scores, labels, counts = outputs
    return [Detections(boxes[i, :n].float(), scores[i, :n].float(), labels[i, :n].long())
            for i, n in enumerate(counts.long().tolist())]
