"""The CPU matcher's candidate search: which (ground truth, default box) pairs can matter.

Within each (feature level, box size) block the default boxes form a grid: every box of a block
has the same width and height, its left and right edges depend on the column only and its top
and bottom edges on the row only. An upper bound of the IoU that is separable over the grid's
columns and rows (:func:`grid_candidates`) leaves a small window of candidates around each
ground truth, typically ~30 of the 8732, whose IoUs :mod:`ssd300.box_coder` reduces exactly as
the dense (N, M, A) IoU would be. The bound needs real boxes of positive size
(:func:`usable_for_grid`); elsewhere the box coder takes its dense path.

:func:`coordinate_iou` is the one IoU arithmetic of matching (this search and the dense path),
bit-identical to ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd300.default_boxes import DefaultBoxes


def coordinate_iou(left, top, right, bottom, o_left, o_top, o_right, o_bottom) -> torch.Tensor:
    """IoU from broadcastable coordinate tensors, with ``torchvision.ops.box_iou``'s arithmetic
    (same operations in the same order, so the values are bit-identical to it)."""
    area = (right - left) * (bottom - top)
    other_area = (o_right - o_left) * (o_bottom - o_top)
    inter = (torch.minimum(right, o_right) - torch.maximum(left, o_left)).clamp_(min=0)
    inter *= (torch.minimum(bottom, o_bottom) - torch.maximum(top, o_top)).clamp_(min=0)
    union = (area + other_area) - inter
    return inter.div_(union)


@dataclass(frozen=True)
class AnchorGrid:
    """The default boxes as B blocks (one per feature level and box size) of f x f boxes.

    Within a block every box has the same width and height (up to float rounding), its left and
    right edges depend on the column only and its top and bottom edges on the row only, so IoU
    bounds are separable. Edges are (B, F) tables padded to the largest f with a far value.
    """

    start: torch.Tensor  # (B,) index of the block's first default box
    size: torch.Tensor  # (B,) f
    fk: torch.Tensor  # (B,) centres are about (index + 0.5) / fk (only used to pick probes)
    col_left: torch.Tensor  # (B, F) non-decreasing
    row_top: torch.Tensor  # (B, F) non-decreasing
    width_min: torch.Tensor  # (B,) smallest and largest right - left of the block
    width_max: torch.Tensor
    height_min: torch.Tensor
    height_max: torch.Tensor


def anchor_grid(dboxes: DefaultBoxes) -> AnchorGrid | None:
    """The block layout of ``dboxes``, or None when the boxes are not such a grid (checked bitwise)."""
    config = dboxes.config
    blocks = []
    start = 0
    for level, f in enumerate(config.feature_sizes):
        for _ in range(config.boxes_per_location[level]):
            if start + f * f > dboxes.num_boxes:
                return None
            box = dboxes.ltrb[start : start + f * f].view(f, f, 4)  # row, column, coordinate
            left, right, top, bottom = box[0, :, 0], box[0, :, 2], box[:, 0, 1], box[:, 0, 3]
            separable = (
                torch.equal(box[..., 0], left.expand(f, f)) and torch.equal(box[..., 2], right.expand(f, f))
                and torch.equal(box[..., 1], top[:, None].expand(f, f))
                and torch.equal(box[..., 3], bottom[:, None].expand(f, f))
            )
            if not separable or not (bool((left[1:] >= left[:-1]).all()) and bool((top[1:] >= top[:-1]).all())):
                return None
            blocks.append((start, f, config.figure_size / config.steps[level], left, right - left, top, bottom - top))
            start += f * f
    if start != dboxes.num_boxes:
        return None
    width = max(b[1] for b in blocks)

    def padded(k: int) -> torch.Tensor:
        out = torch.full((len(blocks), width), torch.inf)  # never a first or last line
        for i, block in enumerate(blocks):
            out[i, : block[1]] = block[k]
        return out

    col_left, row_top = padded(3), padded(5)
    return AnchorGrid(
        start=torch.tensor([b[0] for b in blocks]),
        size=torch.tensor([b[1] for b in blocks]),
        fk=torch.tensor([b[2] for b in blocks], dtype=torch.float32),
        col_left=col_left,
        row_top=row_top,
        width_min=torch.stack([b[4].min() for b in blocks]),
        width_max=torch.stack([b[4].max() for b in blocks]),
        height_min=torch.stack([b[6].min() for b in blocks]),
        height_max=torch.stack([b[6].max() for b in blocks]),
    )


# Slack on the bounds, relative for IoUs and absolute for coordinates in [0, 1]: far above
# float32 rounding (a few ulps, < 1e-7), so no default box that could qualify is left out.
_BOUND_SLACK = 1e-5
_COORD_SLACK = 1e-6


def usable_for_grid(gt_boxes: torch.Tensor, valid: torch.Tensor) -> bool:
    """The bounds of :func:`grid_candidates` need real boxes to be finite with positive size."""
    left, top, right, bottom = gt_boxes.unbind(-1)
    proper = torch.isfinite(gt_boxes).all(-1) & (right - left > 0) & (bottom - top > 0)
    return bool((proper | ~valid).all())


def _line_window(
    edges: torch.Tensor, size_min: torch.Tensor, size_max: torch.Tensor, size: torch.Tensor,
    low: torch.Tensor, high: torch.Tensor, floor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last line (B, V) of every block whose overlap with [low, high] can reach
    ``floor`` times the larger extent; empty windows have last < first.

    overlap = min(high, e + s) - max(low, e) = min(s, high - low, e + s - low, high - e) for a
    line starting at e with extent s, so overlap >= need holds on an interval of the sorted e.
    """
    need = floor * torch.maximum(high - low, size_min[:, None]) - _COORD_SLACK  # (B, V)
    first = torch.searchsorted(edges, low + need - size_max[:, None])
    last = torch.searchsorted(edges, high - need, right=True) - 1
    fits = need <= torch.minimum(high - low, size_max[:, None])
    last = torch.where(fits, last.minimum(size[:, None] - 1), -1)
    # A bound at or below 0 keeps every line (overlaps are clamped at 0).
    everything = need <= 0
    first = torch.where(everything, 0, first)
    last = torch.where(everything, size[:, None] - 1, last)
    return first, last


def grid_candidates(
    gt: torch.Tensor, grid: AnchorGrid, anchors_ltrb: torch.Tensor, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (gt, default box) pair that can matter for matching, with its exact IoU.

    ``gt`` (V, 4) real ground-truth boxes (finite, positive width and height); ``anchors_ltrb``
    (A, 4). Returns (gt row (P,), default box (P,), IoU (P,)), the IoU with
    ``torchvision.ops.box_iou``'s arithmetic.

    A pair matters when its IoU could exceed ``iou_threshold`` (a positive) or could be the gt's
    best IoU (its claim). For boxes, IoU <= overlap_x / max(w_gt, w_box) and likewise in y (the
    union is at least the larger area, the intersection at most overlap_x times the smaller
    height), a bound that is separable over a block's columns and rows. A lower bound of the
    gt's best IoU comes from a few probe default boxes (the cell under the gt's centre in every
    block). Kept: the window of rows x columns of each block whose bounds reach min(that lower
    bound, threshold), a few default boxes around the gt instead of all 8732.
    """
    num_gt = gt.shape[0]
    left, top, right, bottom = (c[None, :] for c in gt.unbind(1))  # (1, V)

    # Lower bound of each gt's best IoU: exact IoU with the probe of every block.
    last = grid.size[:, None] - 1
    # The cell holding the centre: column j spans [j / fk, (j + 1) / fk).
    probe_col = (((left + right) * 0.5) * grid.fk[:, None]).long().clamp_(min=0).minimum(last)
    probe_row = (((top + bottom) * 0.5) * grid.fk[:, None]).long().clamp_(min=0).minimum(last)
    probes = grid.start[:, None] + probe_row * grid.size[:, None] + probe_col  # (B, V)
    probe_boxes = anchors_ltrb.index_select(0, probes.view(-1)).view(*probes.shape, 4)
    probe_iou = coordinate_iou(left, top, right, bottom, *probe_boxes.unbind(-1))
    floor = probe_iou.amax(dim=0, keepdim=True).clamp_(max=iou_threshold)
    floor = floor - floor.abs() * _BOUND_SLACK  # (1, V)

    first_col, last_col = _line_window(grid.col_left, grid.width_min, grid.width_max, grid.size, left, right, floor)
    first_row, last_row = _line_window(grid.row_top, grid.height_min, grid.height_max, grid.size, top, bottom, floor)
    num_cols = (last_col - first_col + 1).clamp_(min=0).view(-1)  # (B * V,)
    num_rows = (last_row - first_row + 1).clamp_(min=0).view(-1)

    # Enumerate the windows: pair k of window w is (row first_row + k // num_cols, col first_col + k % num_cols).
    counts = num_cols * num_rows
    windows = counts.nonzero().squeeze(1)
    counts = counts[windows]
    starts = counts.cumsum(0) - counts
    total = int(starts[-1] + counts[-1]) if windows.numel() else 0
    # Window of each pair: mark each window's first pair, count the marks.
    marks = torch.zeros(total, dtype=torch.long)
    marks[starts] = 1
    nth = marks.cumsum_(0).sub_(1)
    window = windows[nth]
    within = torch.arange(total) - starts[nth]
    window_cols = num_cols[window]
    block = window // num_gt
    row = first_row.view(-1)[window] + within // window_cols
    col = first_col.view(-1)[window] + within % window_cols
    anchor = grid.start[block] + row * grid.size[block] + col
    gt_row = window % num_gt
    iou = coordinate_iou(*gt.index_select(0, gt_row).unbind(1), *anchors_ltrb.index_select(0, anchor).unbind(1))
    return gt_row, anchor, iou
