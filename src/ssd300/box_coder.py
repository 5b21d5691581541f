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

Step 3 is done with ``scatter_reduce(amax)`` of row indices, which is order-independent, so
the result is deterministic on CPU and CUDA (a plain indexed assignment with duplicate indices is
not).

One deliberate difference from the reference: a negative's box is the default box's own
``xywh`` exactly, whereas the reference converts its ltrb form back to xywh (equal up to float
rounding). Negatives' boxes never reach the loss, and this way their offsets are exactly zero.
"""

from __future__ import annotations

import torch

from ssd300.default_boxes import DefaultBoxes, ltrb_to_xywh, xywh_to_ltrb

# IoU given to padded ground-truth rows: below any real IoU (>= 0), so they never win.
_PADDING_IOU = -1.0
_FORCED_IOU = 2.0


def batched_box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of (N, M, 4) ltrb boxes with (A, 4) ltrb boxes -> (N, M, A).

    Same arithmetic, in the same order, as ``torchvision.ops.box_iou``, so the values are
    bit-identical to it.
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    lt = torch.max(boxes[..., None, :2], others[:, :2])
    rb = torch.min(boxes[..., None, 2:], others[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[..., None] + other_area - inter
    return inter / union


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


class BoxCoder:
    """Matches padded ground truth to the default boxes and converts boxes <-> offsets."""

    def __init__(self, default_boxes: DefaultBoxes, iou_threshold: float = 0.5) -> None:
        self.default_boxes = default_boxes
        self.iou_threshold = float(iou_threshold)

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
        num_anchors = dboxes.num_boxes

        iou = batched_box_iou(gt_boxes, dboxes.ltrb)  # (N, M, A)
        iou = iou.masked_fill_(~valid[..., None], _PADDING_IOU)

        # Each default box's best ground truth, and each ground truth's best default box.
        best_gt_iou, best_gt = iou.max(dim=1)  # (N, A)
        best_anchor = iou.argmax(dim=2)  # (N, M)

        # Claims: the highest valid row index claiming an anchor wins (order-independent).
        rows = torch.arange(m, device=device).expand(n, m)
        claimant = torch.full((n, num_anchors), -1, dtype=torch.long, device=device)
        claimant.scatter_reduce_(1, best_anchor, torch.where(valid, rows, -1), reduce="amax")
        claimed = claimant >= 0
        best_gt = torch.where(claimed, claimant, best_gt)
        best_gt_iou = best_gt_iou.masked_fill(claimed, _FORCED_IOU)

        positive = best_gt_iou > self.iou_threshold
        labels = torch.where(positive, gt_labels.long().gather(1, best_gt), 0)
        matched_ltrb = gt_boxes.gather(1, best_gt[..., None].expand(n, num_anchors, 4))
        boxes = torch.where(positive[..., None], ltrb_to_xywh(matched_ltrb), dboxes.xywh)
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

        ``loc_targets`` is coordinate-major like the model's ``locs``.
        """
        boxes, labels = self.match(gt_boxes, gt_labels, num_boxes, mask=mask)
        return self.offsets(boxes), labels

    def offsets(self, boxes_xywh: torch.Tensor) -> torch.Tensor:
        """(N, A, 4) xywh boxes -> (N, 4, A) offsets relative to the default boxes.

        gxy = (g_xy - d_xy) / (scale_xy * d_wh), gwh = log(g_wh / d_wh) / scale_wh, computed as
        the reference does (multiplying by the inverse variances).
        """
        dboxes = self.default_boxes.to(boxes_xywh.device)
        d_xy, d_wh = dboxes.xywh[:, :2], dboxes.xywh[:, 2:]
        gxy = (1.0 / dboxes.scale_xy) * (boxes_xywh[..., :2] - d_xy) / d_wh
        gwh = (1.0 / dboxes.scale_wh) * (boxes_xywh[..., 2:] / d_wh).log()
        return torch.cat((gxy, gwh), dim=-1).transpose(1, 2).contiguous()

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
