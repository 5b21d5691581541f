"""Target encoding of 32 images x 7 boxes: per-image loop (reference style) vs the batched BoxCoder.

The baseline matches one image at a time, as SSD reference code does in its data loader:
IoU with the default boxes, best ground truth per default box, each ground truth claims its
best default box in a Python loop, threshold, xywh conversion, offsets.

Usage: .venv/bin/python benchmarks/bench_encode.py [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from ssd300.box_coder import BoxCoder
from ssd300.default_boxes import default_boxes_300

from common import time_call

IMAGES, BOXES = 32, 7


def make_ground_truth(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(IMAGES, BOXES, 2, generator=g) * 0.7
    wh = torch.rand(IMAGES, BOXES, 2, generator=g) * 0.3 + 0.02
    boxes = torch.cat((xy, xy + wh), dim=-1)
    labels = torch.randint(1, 81, (IMAGES, BOXES), generator=g)
    return boxes, labels, torch.full((IMAGES,), BOXES)


def encode_one_image(gt_ltrb, gt_labels, dboxes, threshold=0.5):
    """Reference style: one image, default boxes in ltrb, loop over ground truths for the claims."""
    iou = torchvision.ops.box_iou(gt_ltrb, dboxes.ltrb)
    best_gt_iou, best_gt = iou.max(dim=0)
    best_anchor = iou.max(dim=1).indices
    best_gt_iou.index_fill_(0, best_anchor, 2.0)
    for gt_index in range(best_anchor.shape[0]):
        best_gt[best_anchor[gt_index]] = gt_index
    positive = best_gt_iou > threshold
    labels = torch.zeros(dboxes.num_boxes, dtype=torch.long)
    labels[positive] = gt_labels[best_gt[positive]]
    boxes = dboxes.ltrb.clone()
    boxes[positive] = gt_ltrb[best_gt[positive]]
    xywh = torch.cat((0.5 * (boxes[:, :2] + boxes[:, 2:]), boxes[:, 2:] - boxes[:, :2]), dim=1)
    d = dboxes.xywh
    offsets = torch.cat((10 * (xywh[:, :2] - d[:, :2]) / d[:, 2:], 5 * (xywh[:, 2:] / d[:, 2:]).log()), dim=1)
    return offsets.t(), labels


def per_image(boxes, labels, counts, dboxes):
    results = [encode_one_image(boxes[i, : counts[i]], labels[i, : counts[i]], dboxes) for i in range(IMAGES)]
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dboxes = default_boxes_300()
    coder = BoxCoder(dboxes)
    boxes, labels, counts = make_ground_truth()
    # Same labels both ways (the baseline's negatives differ from ours only by float rounding).
    assert torch.equal(per_image(boxes, labels, counts, dboxes)[1], coder.encode(boxes, labels, counts)[1])
    baseline = time_call(lambda: per_image(boxes, labels, counts, dboxes), args.repeats).median
    ours = time_call(lambda: coder.encode(boxes, labels, counts), args.repeats).median
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| workload | per-image loop (ms) | batched BoxCoder.encode (ms) | speed-up |")
    print("|---|---|---|---|")
    print(f"| {IMAGES} images x {BOXES} boxes, CPU | {baseline * 1e3:.2f} | {ours * 1e3:.2f} "
          f"| {baseline / ours:.1f}x |")


if __name__ == "__main__":
    main()
