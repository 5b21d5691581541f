"""BoxCoder against a plain per-image implementation of SPEC §3 (the oracle)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ssd300.anchor_grid import coordinate_iou
from ssd300.box_coder import BoxCoder
from ssd300.default_boxes import default_boxes_300

A = 8732


def oracle_match(
    gt_ltrb: torch.Tensor, gt_labels: torch.Tensor, dboxes_ltrb: torch.Tensor,
    dboxes_xywh: torch.Tensor, threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, reference style: loops over ground truths, no batching tricks."""
    num_anchors = dboxes_ltrb.shape[0]
    labels = torch.zeros(num_anchors, dtype=torch.long)
    boxes = dboxes_xywh.clone()
    if gt_ltrb.shape[0] == 0:
        return boxes, labels
    iou = torchvision.ops.box_iou(gt_ltrb, dboxes_ltrb)  # (M, A)
    best_gt_iou, best_gt = iou.max(dim=0)
    best_anchor = iou.max(dim=1).indices
    for gt_index in range(gt_ltrb.shape[0]):  # in order: later ground truths win ties
        anchor = best_anchor[gt_index]
        best_gt_iou[anchor] = 2.0
        best_gt[anchor] = gt_index
    # Only positives change; negatives keep label 0 and their own default box.
    for anchor in torch.nonzero(best_gt_iou > threshold).flatten().tolist():
        l, t, r, b = gt_ltrb[best_gt[anchor]].tolist()
        labels[anchor] = gt_labels[best_gt[anchor]]
        boxes[anchor] = torch.tensor([0.5 * (l + r), 0.5 * (t + b), r - l, b - t])
    return boxes, labels


def random_boxes(generator: torch.Generator, count: int) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * 0.8
    wh = torch.rand(count, 2, generator=generator) * (1 - xy) * 0.9 + 0.02
    return torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=1)


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded batch with different counts, zero-box images, border/whole-image boxes, ties."""
    g = torch.Generator().manual_seed(seed)
    dboxes = default_boxes_300()
    counts = [0, 1, 3, 7, 5, 0, 2, 6]
    m = max(counts)
    boxes = torch.rand(len(counts), m, 4, generator=g)  # padding is garbage on purpose
    labels = torch.randint(1, 81, (len(counts), m), generator=g)
    for i, count in enumerate(counts):
        boxes[i, :count] = random_boxes(g, count)
    boxes[1, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # the whole image
    boxes[2, 1] = torch.tensor([0.0, 0.3, 0.2, 1.0])  # touches left and bottom borders
    boxes[2, 2] = torch.tensor([0.7, 0.0, 1.0, 0.25])  # touches right and top borders
    # Ties: two ground truths with the same best default box (a default box exactly, twice),
    # and a third one slightly shifted that still prefers that default box.
    anchor = dboxes.ltrb[100].clamp(0, 1)
    boxes[3, 2] = anchor
    boxes[3, 4] = anchor
    boxes[3, 5] = anchor + torch.tensor([0.001, 0.0, 0.001, 0.0])
    boxes[4, 0] = boxes[4, 3]  # identical boxes with different labels
    return boxes, labels, torch.tensor(counts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_equals_oracle(seed: int) -> None:
    dboxes = default_boxes_300()
    boxes, labels, counts = make_batch(seed)
    got_boxes, got_labels = BoxCoder(dboxes).match(boxes, labels, counts)
    assert got_boxes.shape == (8, A, 4) and got_labels.shape == (8, A)
    assert got_labels.dtype == torch.long
    for i, count in enumerate(counts.tolist()):
        want_boxes, want_labels = oracle_match(boxes[i, :count], labels[i, :count], dboxes.ltrb, dboxes.xywh)
        assert torch.equal(got_labels[i], want_labels), f"image {i}"
        assert torch.equal(got_boxes[i], want_boxes), f"image {i}"


def dense_coder(iou_threshold: float = 0.5) -> BoxCoder:
    """A coder that always takes the dense path (IoU with all 8732 default boxes)."""
    coder = BoxCoder(default_boxes_300(), iou_threshold)
    coder._grids["cpu"] = None
    return coder


def varied_batch(seed: int, n: int = 6, m: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiny, huge, thin, partly outside the image and duplicated boxes, random counts."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, m, 2, generator=g) * 1.2 - 0.1
    size = torch.exp(torch.rand(n, m, 2, generator=g) * 7 - 6.5)  # 0.0015 .. 1.65
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=-1)
    boxes[:, 1] = boxes[:, 0]  # exact duplicates
    boxes[:, 2] = default_boxes_300().ltrb[torch.randint(0, A, (n,), generator=g)]  # default boxes exactly
    labels = torch.randint(1, 81, (n, m), generator=g)
    return boxes, labels, torch.randint(0, m + 1, (n,), generator=g)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_candidate_path_equals_dense_path(threshold: float) -> None:
    # The default boxes form a grid, so the CPU matches from a window of candidates per ground
    # truth; it must agree exactly with the dense IoU over every default box.
    coder = BoxCoder(default_boxes_300(), threshold)
    assert coder._grid(torch.device("cpu")) is not None
    for seed in range(4):
        boxes, labels, counts = varied_batch(seed)
        got, want = coder.match(boxes, labels, counts), dense_coder(threshold).match(boxes, labels, counts)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), f"seed {seed}"


def test_degenerate_boxes_equal_oracle() -> None:
    # Zero-width, inverted and non-finite rows disable the candidate bounds: dense path, same answer.
    dboxes = default_boxes_300()
    boxes, labels, counts = make_batch(7)
    boxes[3, 1] = torch.tensor([0.4, 0.4, 0.4, 0.6])  # zero width
    boxes[4, 2] = torch.tensor([0.6, 0.2, 0.5, 0.3])  # inverted
    got_boxes, got_labels = BoxCoder(dboxes).match(boxes, labels, counts)
    for i, count in enumerate(counts.tolist()):
        want_boxes, want_labels = oracle_match(boxes[i, :count], labels[i, :count], dboxes.ltrb, dboxes.xywh)
        assert torch.equal(got_labels[i], want_labels), f"image {i}"
        assert torch.equal(got_boxes[i], want_boxes), f"image {i}"


def test_ties_later_ground_truth_wins() -> None:
    dboxes = default_boxes_300()
    anchor = dboxes.ltrb[100].clamp(0, 1)
    boxes = torch.stack((anchor, anchor, anchor))[None]
    labels = torch.tensor([[5, 6, 7]])
    _, got = BoxCoder(dboxes).match(boxes, labels, torch.tensor([3]))
    assert got[0, 100] == 7
    _, got = BoxCoder(dboxes).match(boxes, labels, torch.tensor([2]))  # third row is padding
    assert got[0, 100] == 6


def test_images_without_boxes_are_all_background() -> None:
    dboxes = default_boxes_300()
    coder = BoxCoder(dboxes)
    boxes, labels = torch.rand(3, 4, 4), torch.ones(3, 4, dtype=torch.long)
    got_boxes, got_labels = coder.match(boxes, labels, torch.zeros(3, dtype=torch.long))
    assert not got_labels.any()
    assert torch.equal(got_boxes, dboxes.xywh.expand(3, A, 4))
    targets, _ = coder.encode(boxes[:, :0], labels[:, :0], torch.zeros(3, dtype=torch.long))
    assert targets.shape == (3, 4, A) and not targets.any()


def test_mask_equals_counts_and_allows_holes() -> None:
    coder = BoxCoder(default_boxes_300())
    boxes, labels, counts = make_batch(3)
    mask = torch.arange(boxes.shape[1]) < counts[:, None]
    by_counts = coder.match(boxes, labels, counts)
    by_mask = coder.match(boxes, labels, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(by_counts, by_mask))
    # A hole in the middle: same as the image without that row.
    mask[3, 1] = False
    keep = [0, 2, 3, 4, 5, 6]
    got_boxes, got_labels = coder.match(boxes, labels, mask=mask)
    want_boxes, want_labels = coder.match(boxes[3:4, keep], labels[3:4, keep])
    assert torch.equal(got_labels[3], want_labels[0]) and torch.equal(got_boxes[3], want_boxes[0])


def test_encode_offsets_and_round_trip() -> None:
    dboxes = default_boxes_300()
    coder = BoxCoder(dboxes)
    boxes, labels, counts = make_batch(4)
    targets, target_labels = coder.encode(boxes, labels, counts)
    matched, matched_labels = coder.match(boxes, labels, counts)
    assert torch.equal(target_labels, matched_labels)
    assert targets.shape == (8, 4, A)
    # SPEC §3 formulas, written out.
    d = dboxes.xywh
    gxy = (matched[..., :2] - d[:, :2]) / (0.1 * d[:, 2:])
    gwh = torch.log(matched[..., 2:] / d[:, 2:]) / 0.2
    torch.testing.assert_close(targets, torch.cat((gxy, gwh), -1).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # Negatives regress to zero; decode inverts encode on positives.
    negative = target_labels == 0
    assert not targets.transpose(1, 2)[negative].any()
    decoded = coder.decode(targets)
    positive = ~negative
    assert positive.sum() > 20
    want = torch.cat((matched[..., :2] - 0.5 * matched[..., 2:], matched[..., :2] + 0.5 * matched[..., 2:]), -1)
    torch.testing.assert_close(decoded[positive], want[positive], rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded[negative], dboxes.ltrb.expand(8, A, 4)[negative], rtol=0, atol=1e-6)


def test_decode_formula() -> None:
    dboxes = default_boxes_300()
    locs = torch.randn(2, 4, A, generator=torch.Generator().manual_seed(0))
    d = dboxes.xywh
    xy = 0.1 * locs[:, :2].transpose(1, 2) * d[:, 2:] + d[:, :2]
    wh = torch.exp(0.2 * locs[:, 2:].transpose(1, 2)) * d[:, 2:]
    want = torch.cat((xy - wh / 2, xy + wh / 2), -1)
    torch.testing.assert_close(BoxCoder(dboxes).decode(locs), want, rtol=0, atol=1e-6)


def test_matching_iou_is_bitwise_torchvision() -> None:
    g = torch.Generator().manual_seed(1)
    gt = random_boxes(g, 9)
    dboxes = default_boxes_300()
    iou = coordinate_iou(*(c[:, None] for c in gt.unbind(-1)), *dboxes.ltrb.t().contiguous())
    assert torch.equal(iou, torchvision.ops.box_iou(gt, dboxes.ltrb))


def test_bad_shapes_raise() -> None:
    coder = BoxCoder(default_boxes_300())
    with pytest.raises(ValueError, match="gt_boxes"):
        coder.match(torch.rand(2, 4), torch.ones(2, dtype=torch.long), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="num_boxes"):
        coder.match(torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match="either"):
        coder.match(torch.rand(2, 3, 4), torch.ones(2, 3, dtype=torch.long), torch.tensor([1, 1]),
                    mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    coder = BoxCoder(default_boxes_300())
    boxes, labels, counts = make_batch(5)
    cpu = coder.match(boxes, labels, counts)
    gpu = coder.match(boxes.cuda(), labels.cuda(), counts.cuda())
    assert torch.equal(cpu[1], gpu[1].cpu())
    torch.testing.assert_close(cpu[0], gpu[0].cpu(), rtol=0, atol=1e-6)
