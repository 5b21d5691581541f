"""Batched matching of ground truth to default boxes, offset encoding and decoding (SPEC §3, §5).

Everything works on a whole padded batch at once, on the device of the inputs: ground truth comes
as ``(N, M, 4)`` ltrb boxes in [0, 1] with ``(N, M)`` labels and either a count per image
``(N,)`` (rows ``>= count`` are padding) or a boolean mask ``(N, M)`` of the real rows.

Matching, per image, exactly as the reference:

1. IoU of every ground truth with every default box (ltrb).
2. Each default box takes its best ground truth (the first one on equal IoU).
3. Each ground truth claims its own best default box (the first one on equal IoU): that pair's IoU
   becomes 2.0 and the box is assigned to that ground truth; when several ground truths claim the
   same default box, the later one (higher row index) wins.
4. A default box is positive when its IoU > ``iou_threshold`` (0.5). Positives carry the matched
   ground truth's label and box; negatives get label 0 and their own default box.

Step 3 never relies on the order of an indexed assignment with duplicate indices (undefined on
CUDA): for each positive default box the winning claimant is the highest row index among the
ground truths whose best default box it is, so the result is deterministic on CPU and CUDA.

Speed: on the CPU, IoUs are computed only for the few (ground truth, default box) pairs that can
matter: within each (feature level, box size) block the default boxes form a grid, and a bound on
the IoU that is separable over the grid's columns and rows (:mod:`ssd300.anchor_grid`) leaves a
small window of candidates around each ground truth, typically ~30 of the 8732, with IoUs
bit-identical to ``torchvision.ops.box_iou``. Elsewhere (GPUs, where data-dependent sizes would
force syncs, or degenerate boxes such as zero width, for which the bound does not hold) the dense
(N, M, A) IoU is reduced chunk by chunk with cache-sized temporaries. Either way the ground-truth
row and the offsets are computed only for the (few) positive default boxes.

One deliberate difference from the reference: a negative's box is the default box's own
``xywh`` exactly, whereas the reference converts its ltrb form back to xywh (equal up to float
rounding). Negatives' boxes never reach the loss, and this way their offsets are exactly zero.
"""

from __future__ import annotations

import torch

from ssd300.anchor_grid import AnchorGrid, anchor_grid, coordinate_iou, grid_candidates, usable_for_grid
from ssd300.default_boxes import DefaultBoxes, ltrb_to_xywh, xywh_to_ltrb

# IoU given to padded ground-truth rows: below any real IoU (>= 0), so they never win.
_PADDING_IOU = -1.0
_FORCED_IOU = 2.0
# IoU entries per chunk on CPU: about 1 MiB of float32, so the temporaries stay in cache.
_CPU_CHUNK_ELEMENTS = 1 << 18


def _valid_rows(
    gt_boxes: torch.Tensor, num_boxes: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    n, m = gt_boxes.shape[:2]
    if mask is not None:
        if num_boxes is not None:
            raise ValueError("give either num_boxes or mask, not both")
        if mask.shape != (n, m) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(n, m)}, got {mask.dtype} {tuple(mask.shape)}")
        return mask.to(gt_boxes.device)
    if num_boxes is None:
        return torch.ones((n, m), dtype=torch.bool, device=gt_boxes.device)
    if num_boxes.shape != (n,):
        raise ValueError(f"num_boxes must have shape {(n,)}, got {tuple(num_boxes.shape)}")
    rows = torch.arange(m, device=gt_boxes.device)
    return rows < num_boxes.to(gt_boxes.device)[:, None]


def _best_matches(
    gt_boxes: torch.Tensor, valid: torch.Tensor, anchors_ltrb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU maxima both ways -> (best IoU of each default box (N, A), best default box of each gt (N, M)).

    ``anchors_ltrb`` is coordinate-major, (4, A).

    On ties the first default box wins, like ``argmax``. The (N, M, A) IoU is computed in chunks
    of default boxes small enough to stay in the CPU cache (one chunk on GPUs); the chunk results
    are combined exactly. The per-default-box maximum uses ``amax`` (PyTorch's max-with-index
    reduction over a middle dimension is many times slower on CPU); which ground truth it was is
    recomputed afterwards for the few positives only (:func:`_best_gt_of`). Padding rows give
    IoU 0 here, so the best IoU of a default box in an image without boxes is 0.
    """
    n, m = valid.shape
    num_anchors = anchors_ltrb.shape[1]
    if gt_boxes.device.type == "cpu":
        chunk = max(256, _CPU_CHUNK_ELEMENTS // max(1, n * m))
    else:
        chunk = num_anchors
    # Padding rows become an empty box outside the image: IoU 0 with every default box, so they
    # never decide a positive; their own best default box is ignored by the caller.
    outside = torch.tensor([2.0, 2.0, 2.0, 2.0], device=gt_boxes.device)
    gt = [c[..., None] for c in torch.where(valid[..., None], gt_boxes, outside).unbind(-1)]  # (N, M, 1)
    anchors = anchors_ltrb.unbind(0)  # (A,) contiguous rows
    best_ious = []
    best_anchor_iou = best_anchor = None
    for start in range(0, num_anchors, chunk):
        stop = min(start + chunk, num_anchors)
        iou = coordinate_iou(*gt, *(c[start:stop] for c in anchors))
        best_ious.append(iou.amax(dim=1))
        chunk_iou, chunk_anchor = iou.max(dim=2)  # (N, M); first index on ties
        chunk_anchor += start
        if best_anchor_iou is None:
            best_anchor_iou, best_anchor = chunk_iou, chunk_anchor
        else:
            better = chunk_iou > best_anchor_iou  # strict: an earlier chunk keeps ties
            assert best_anchor is not None
            best_anchor_iou = torch.where(better, chunk_iou, best_anchor_iou)
            best_anchor = torch.where(better, chunk_anchor, best_anchor)
    assert best_anchor is not None  # at least one chunk
    return torch.cat(best_ious, dim=1), best_anchor


def _best_gt_of(
    gt_boxes: torch.Tensor, valid: torch.Tensor, anchors_ltrb: torch.Tensor, images: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Best ground-truth row (first on ties) of the given (image, default box) pairs -> (P,)."""
    gt = gt_boxes[images].unbind(-1)  # (P, M) each
    anchor = [c[:, None] for c in anchors_ltrb[anchors].unbind(-1)]  # (P, 1) each
    iou = coordinate_iou(*gt, *anchor).masked_fill_(~valid[images], _PADDING_IOU)
    return _first_true(iou == iou.amax(dim=1, keepdim=True))


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row of a (P, M) bool tensor (rows must have one).

    Weighted ``amax`` instead of ``argmax``: PyTorch's index reductions over short rows are slow
    on CPU.
    """
    m = flags.shape[1]
    weights = torch.arange(m, 0, -1, device=flags.device, dtype=torch.int32)
    return (m - (flags * weights).amax(dim=1)).long()


def _last_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of a (P, M) bool tensor (0 for rows without one)."""
    weights = torch.arange(1, flags.shape[1] + 1, device=flags.device, dtype=torch.int32)
    return ((flags * weights).amax(dim=1) - 1).clamp_(min=0).long()


def _offsets(boxes_xywh: torch.Tensor, anchors_xywh: torch.Tensor, dboxes: DefaultBoxes) -> torch.Tensor:
    """(..., 4) xywh boxes relative to (..., 4) default boxes -> (..., 4) offsets.

    gxy = (g_xy - d_xy) / (scale_xy * d_wh), gwh = log(g_wh / d_wh) / scale_wh, computed as the
    reference does (multiplying by the inverse variances).
    """
    d_xy, d_wh = anchors_xywh[..., :2], anchors_xywh[..., 2:]
    gxy = (1.0 / dboxes.scale_xy) * (boxes_xywh[..., :2] - d_xy) / d_wh
    gwh = (1.0 / dboxes.scale_wh) * (boxes_xywh[..., 2:] / d_wh).log()
    return torch.cat((gxy, gwh), dim=-1)


class BoxCoder:
    """Matches padded ground truth to the default boxes and converts boxes <-> offsets."""

    def __init__(self, default_boxes: DefaultBoxes, iou_threshold: float = 0.5) -> None:
        self.default_boxes = default_boxes
        self.iou_threshold = float(iou_threshold)
        self._grids: dict = {}

    def _grid(self, device: torch.device) -> AnchorGrid | None:
        """The default boxes' block layout, for the CPU only (elsewhere the dense path avoids syncs)."""
        if device.type != "cpu":
            return None
        if "cpu" not in self._grids:
            self._grids["cpu"] = anchor_grid(self.default_boxes.to("cpu"))
        return self._grids["cpu"]

    def _match_candidates(
        self, gt_boxes: torch.Tensor, valid: torch.Tensor, grid: AnchorGrid, dboxes: DefaultBoxes
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-4 from the candidate pairs only -> (best default box (N, M), -1 on padding rows;
        positives' images and default boxes, sorted by image then default box)."""
        n, m = valid.shape
        num_anchors = dboxes.num_boxes
        gt_images, gt_rows = valid.nonzero(as_tuple=True)
        gt_row, anchor, iou = grid_candidates(
            gt_boxes[gt_images, gt_rows], grid, dboxes.ltrb, self.iou_threshold
        )
        num_gt = gt_images.shape[0]
        # Each gt's best default box, the first one on equal IoU (its candidates hold all of them).
        best_iou = iou.new_full((num_gt,), -1.0).scatter_reduce_(0, gt_row, iou, "amax")
        at_best = torch.where(iou == best_iou[gt_row], anchor, num_anchors)
        best = anchor.new_full((num_gt,), num_anchors).scatter_reduce_(0, gt_row, at_best, "amin")
        best_anchor = torch.full((n, m), -1, dtype=torch.long)
        best_anchor[gt_images, gt_rows] = best
        # Positives: IoU above the threshold with some gt, or claimed (forced IoU 2.0).
        flat = (gt_images[gt_row] * num_anchors + anchor)[iou > self.iou_threshold]
        if _FORCED_IOU > self.iou_threshold:
            flat = torch.cat((flat, gt_images * num_anchors + best))
        flat = torch.unique(flat)  # sorted
        return best_anchor, flat // num_anchors, flat % num_anchors

    def match(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        num_boxes: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SPEC §3 matching -> (matched boxes in xywh (N, A, 4), labels (N, A) int64).

        ``gt_boxes`` (N, M, 4) ltrb in [0, 1]; ``gt_labels`` (N, M) int64; ``num_boxes`` (N,)
        real rows per image, or ``mask`` (N, M) bool (all rows are real when neither is given).
        """
        gt_boxes, images, anchors, matched_gt, labels = self._match_sparse(gt_boxes, gt_labels, num_boxes, mask)
        dboxes = self.default_boxes.to(gt_boxes.device)
        boxes = dboxes.xywh.expand(gt_boxes.shape[0], -1, -1).clone()
        boxes[images, anchors] = ltrb_to_xywh(gt_boxes[images, matched_gt])
        return boxes, labels

    def encode(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        num_boxes: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match and convert to regression targets -> (loc_targets (N, 4, A), labels (N, A)).

        ``loc_targets`` is coordinate-major like the model's ``locs``; negatives' targets are 0
        (their box is their own default box). Only the positives' offsets are computed.
        """
        gt_boxes, images, anchors, matched_gt, labels = self._match_sparse(gt_boxes, gt_labels, num_boxes, mask)
        n, num_anchors = labels.shape
        dboxes = self.default_boxes.to(gt_boxes.device)
        offsets = _offsets(ltrb_to_xywh(gt_boxes[images, matched_gt]), dboxes.xywh[anchors], dboxes)
        loc_targets = gt_boxes.new_zeros((n, 4, num_anchors))
        loc_targets[images, :, anchors] = offsets
        return loc_targets, labels

    def _match_sparse(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        num_boxes: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Matching -> (float gt boxes, positives' image, anchor and gt row indices, labels (N, A))."""
        if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes must be (N, M, 4), got {tuple(gt_boxes.shape)}")
        if gt_labels.shape != gt_boxes.shape[:2]:
            raise ValueError(f"gt_labels must be {tuple(gt_boxes.shape[:2])}, got {tuple(gt_labels.shape)}")
        device = gt_boxes.device
        dboxes = self.default_boxes.to(device)
        gt_boxes = gt_boxes.float()
        valid = _valid_rows(gt_boxes, num_boxes, mask)
        if gt_boxes.shape[1] == 0:  # no room for any box: one padding row keeps shapes valid
            gt_boxes = gt_boxes.new_zeros((gt_boxes.shape[0], 1, 4))
            gt_labels = gt_labels.new_zeros((gt_labels.shape[0], 1))
            valid = valid.new_zeros((valid.shape[0], 1))
        n, m = gt_labels.shape

        grid = self._grid(device)
        if grid is not None and usable_for_grid(gt_boxes, valid):
            best_anchor, images, anchors = self._match_candidates(gt_boxes, valid, grid, dboxes)
        else:
            best_gt_iou, best_anchor = _best_matches(gt_boxes, valid, dboxes.ltrb_columns())
            # Claims: each ground truth claims its best default box (that pair's IoU becomes 2.0).
            claimed = torch.zeros(best_gt_iou.shape, dtype=torch.bool, device=device)
            claim_images, claim_rows = valid.nonzero(as_tuple=True)
            claimed[claim_images, best_anchor[claim_images, claim_rows]] = True
            positive = (best_gt_iou > self.iou_threshold) | (claimed & (_FORCED_IOU > self.iou_threshold))
            images, anchors = positive.nonzero(as_tuple=True)

        # Only positives need their ground-truth row: the last claimant if claimed (later ground
        # truths win ties, decided without relying on scatter order), else the best IoU row.
        claims = (best_anchor[images] == anchors[:, None]) & valid[images]  # (P, M)
        matched_gt = torch.where(
            claims.any(dim=1),
            _last_true(claims),
            _best_gt_of(gt_boxes, valid, dboxes.ltrb, images, anchors),
        )
        labels = torch.zeros((n, dboxes.num_boxes), dtype=torch.long, device=device)
        labels[images, anchors] = gt_labels[images, matched_gt].long()
        return gt_boxes, images, anchors, matched_gt, labels

    def decode(self, locs: torch.Tensor) -> torch.Tensor:
        """(N, 4, A) offsets -> (N, A, 4) boxes in normalised ltrb (SPEC §5)."""
        dboxes = self.default_boxes.to(locs.device)
        return decode_boxes(locs, dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh)


def decode_boxes(locs: torch.Tensor, dboxes_xywh: torch.Tensor, scale_xy: float, scale_wh: float) -> torch.Tensor:
    """(N, 4, A) offsets -> (N, A, 4) ltrb boxes (SPEC §5).

    xy = scale_xy * loc_xy * d_wh + d_xy, wh = exp(scale_wh * loc_wh) * d_wh, then to ltrb.
    """
    locs = locs.float().transpose(1, 2)
    d_xy, d_wh = dboxes_xywh[:, :2], dboxes_xywh[:, 2:]
    xy = (scale_xy * locs[..., :2]) * d_wh + d_xy
    wh = (scale_wh * locs[..., 2:]).exp() * d_wh
    return xywh_to_ltrb(torch.cat((xy, wh), dim=-1))
