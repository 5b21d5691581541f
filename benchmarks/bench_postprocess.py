"""Post-processing of a batch of 8: per-image per-class loops vs the batched PostProcessor.

Two kinds of scores: "realistic" (a few objects per image, ~300 anchors over the 0.05 score
threshold) and "untrained" (random normal logits, ~20,000 candidates per image).

Baselines, run in the same process:
* reference style: per image, softmax + decode; per class: threshold, sort, top 200, greedy NMS
  written as a Python while-loop (one IoU computation per kept box), as SSD reference code does;
* per-class torchvision: the same loops but with torchvision.ops.nms per (image, class);
* ours without candidate skipping: the same PostProcessor with the softmax taken over every
  default box (the step that skips boxes where no class can pass the threshold switched off), to
  show that the skipping is not slower, also when it skips almost nothing (untrained scores).

Usage: .venv/bin/python benchmarks/bench_postprocess.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch
import torchvision

import ssd300.postprocess as postprocess
from ssd300.box_coder import BoxCoder
from ssd300.default_boxes import default_boxes_300
from ssd300.postprocess import PostProcessor

from common import time_call

BATCH, CLASSES, ANCHORS = 8, 81, 8732


def realistic_outputs(seed: int = 0, objects: int = 5, anchors_per_object: int = 60):
    """Background dominates except around a few objects, whose nearby anchors are confident."""
    g = torch.Generator().manual_seed(seed)
    dboxes = default_boxes_300()
    logits = torch.randn(BATCH, CLASSES, ANCHORS, generator=g)
    logits[:, 0] += 9.0
    locs = torch.randn(BATCH, 4, ANCHORS, generator=g) * 0.5
    for i in range(BATCH):
        for _ in range(objects):
            xy = torch.rand(2, generator=g) * 0.6
            wh = torch.rand(2, generator=g) * 0.35 + 0.05
            box = torch.cat((xy, xy + wh))[None]
            near = torchvision.ops.box_iou(box, dboxes.ltrb)[0].topk(anchors_per_object).indices
            cls = int(torch.randint(1, CLASSES, (1,), generator=g))
            logits[i, cls, near] = 11.0 + torch.randn(anchors_per_object, generator=g)
            other = int(torch.randint(1, CLASSES, (1,), generator=g))  # a confusable class
            logits[i, other, near[::3]] = 10.0 + torch.randn(len(near[::3]), generator=g)
    return locs, logits


def untrained_outputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 4, ANCHORS, generator=g), torch.randn(BATCH, CLASSES, ANCHORS, generator=g)


def _iou_one_to_many(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    lt = torch.max(box[:2], boxes[:, :2])
    rb = torch.min(box[2:], boxes[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def reference_style(locs, logits, coder, threshold=0.05, iou=0.45, topk=200, max_out=200, torchvision_nms=False):
    results = []
    for i in range(locs.shape[0]):
        boxes = coder.decode(locs[i : i + 1])[0]
        scores = torch.softmax(logits[i], dim=0)
        out_boxes, out_scores, out_labels = [], [], []
        for cls in range(1, scores.shape[0]):
            class_scores = scores[cls]
            mask = class_scores > threshold
            cand_boxes, cand_scores = boxes[mask], class_scores[mask]
            if cand_scores.numel() == 0:
                continue
            order = cand_scores.sort(descending=True, stable=True).indices[:topk]
            cand_boxes, cand_scores = cand_boxes[order], cand_scores[order]
            if torchvision_nms:
                kept = torchvision.ops.nms(cand_boxes, cand_scores, iou)
            else:
                remaining, kept_list = torch.arange(len(order)), []
                while remaining.numel() > 0:
                    best = remaining[0]
                    kept_list.append(int(best))
                    overlaps = _iou_one_to_many(cand_boxes[best], cand_boxes[remaining])
                    remaining = remaining[overlaps <= iou]
                kept = torch.tensor(kept_list, dtype=torch.long)
            out_boxes.append(cand_boxes[kept])
            out_scores.append(cand_scores[kept])
            out_labels.append(torch.full((len(kept),), cls, dtype=torch.long))
        if not out_scores:
            results.append((torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)))
            continue
        b, s, l = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
        best = s.sort(descending=True, stable=True).indices[:max_out]
        results.append((b[best], s[best], l[best]))
    return results


def softmax_every_box(logits: torch.Tensor, score_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``postprocess._candidate_probabilities`` returns, without skipping any default box."""
    num_images, num_classes, num_anchors = logits.shape
    rows = torch.softmax(logits, dim=1).transpose(1, 2).reshape(-1, num_classes)
    above = rows > score_threshold
    above[:, 0] = False
    row, cls = above.nonzero(as_tuple=True)
    flat = ((row // num_anchors) * num_classes + cls) * num_anchors + row % num_anchors
    return flat, rows[row, cls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dboxes = default_boxes_300()
    coder = BoxCoder(dboxes)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"batch {BATCH}\n")
    print("| scores | candidates/image | reference style (s) | per-class torchvision (s) | ours: per_group (s) "
          "| ours: matrix (s) | ours: offsets (s) | speed-up vs reference style | vs per-class torchvision "
          "| ours without candidate skipping (s) | skipping speed-up (interleaved) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (locs, logits) in (("realistic", realistic_outputs()), ("untrained", untrained_outputs())):
        candidates = (torch.softmax(logits, 1)[:, 1:] > 0.05).sum().item() / BATCH
        reference = time_call(lambda: reference_style(locs, logits, coder), args.baseline_repeats).median
        per_class = time_call(lambda: reference_style(locs, logits, coder, torchvision_nms=True), args.repeats).median
        ours = {}
        for strategy in ("per_group", "matrix", "offsets"):
            post = PostProcessor(dboxes, nms=strategy)
            with torch.no_grad():
                ours[strategy] = time_call(lambda: post(locs, logits), args.repeats).median
        skipped, every = postprocess._candidate_probabilities(logits, 0.05)[0], softmax_every_box(logits, 0.05)[0]
        assert abs(len(skipped) - len(every)) <= 1e-3 * len(every)  # the same candidates (up to rounding)
        # Skipping vs not, measured round by round so that machine load and caches hit both alike.
        post = PostProcessor(dboxes)
        with_skipping, without = [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                with_skipping.append(time_call(lambda: post(locs, logits), 1).median)
                with mock.patch.object(postprocess, "_candidate_probabilities", softmax_every_box):
                    without.append(time_call(lambda: post(locs, logits), 1).median)
        skipping_speedup = statistics.median(without) / statistics.median(with_skipping)
        no_skipping = statistics.median(without)
        best = ours["per_group"]  # the CPU default ("auto")
        print(f"| {name} | {candidates:,.0f} | {reference:.3f} | {per_class:.4f} | {ours['per_group']:.4f} | "
              f"{ours['matrix']:.4f} | {ours['offsets']:.4f} | {reference / best:.1f}x | {per_class / best:.1f}x "
              f"| {no_skipping:.4f} | {skipping_speedup:.2f}x |")


if __name__ == "__main__":
    main()
