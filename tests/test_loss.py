"""SSDLoss against a plain per-image implementation of SPEC §4 (the oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from ssd300.loss import SSDLoss


def oracle_loss(locs, logits, loc_targets, labels) -> torch.Tensor:
    """Reference style: one image at a time, negatives ranked with Python's sorted()."""
    locs, logits, loc_targets = locs.double(), logits.double(), loc_targets.double()
    image_losses = []
    for i in range(labels.shape[0]):
        image_labels = labels[i].tolist()
        positives = [a for a, label in enumerate(image_labels) if label > 0]
        if not positives:
            image_losses.append(0.0)
            continue
        diff = (locs[i] - loc_targets[i]).abs()
        smooth_l1 = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).sum(dim=0).tolist()  # (A,)
        loc = sum(smooth_l1[a] for a in positives)
        ce = (-torch.log_softmax(logits[i], dim=0).gather(0, labels[i][None]).squeeze(0)).tolist()
        negatives_ce = sorted((ce[a] for a, label in enumerate(image_labels) if label == 0), reverse=True)
        keep = min(3 * len(positives), len(image_labels))
        conf = sum(ce[a] for a in positives) + sum(negatives_ce[:keep])
        image_losses.append((loc + conf) / len(positives))
    return torch.tensor(sum(image_losses) / len(image_losses), dtype=torch.float64)


def make_case(seed: int, n: int, num_classes: int, num_anchors: int, positive_rate):
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(n, 4, num_anchors, generator=g) * 2
    logits = torch.randn(n, num_classes, num_anchors, generator=g) * 3
    loc_targets = torch.randn(n, 4, num_anchors, generator=g)
    labels = torch.randint(1, num_classes, (n, num_anchors), generator=g)
    rates = torch.tensor(positive_rate, dtype=torch.float32)[:, None]
    labels = torch.where(torch.rand(n, num_anchors, generator=g) < rates, labels, 0)
    return locs, logits, loc_targets, labels


@pytest.mark.parametrize(
    "seed, num_anchors, positive_rate",
    [
        (0, 8732, [0.002, 0.01, 0.0, 0.05]),  # realistic, one image without positives
        (1, 60, [0.5, 0.9, 0.1, 0.0]),  # 3 * num_pos exceeds the negatives: all are kept
        (2, 8732, [1.0, 0.3, 0.001, 0.02]),  # an image with only positives
    ],
)
def test_equals_oracle(seed: int, num_anchors: int, positive_rate: list[float]) -> None:
    case = make_case(seed, 4, 7, num_anchors, positive_rate)
    got = SSDLoss()(*case)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = oracle_loss(*case)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


def test_no_positives_is_zero_and_finite() -> None:
    locs, logits, loc_targets, labels = make_case(3, 3, 5, 8732, [0.0, 0.0, 0.0])
    locs.requires_grad_(True)
    logits.requires_grad_(True)
    loss = SSDLoss()(locs, logits, loc_targets, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(locs.grad).all()


def test_images_without_positives_count_in_the_mean() -> None:
    case = make_case(4, 2, 5, 500, [0.05, 0.0])
    full = SSDLoss()(*case)
    first_only = SSDLoss()(*(t[:1] for t in case))
    torch.testing.assert_close(full, first_only / 2)


def test_gradient_flows_to_positives_and_hard_negatives_only() -> None:
    locs, logits, loc_targets, labels = make_case(5, 1, 4, 40, [0.1])
    labels.zero_()
    labels[0, :2] = 1  # 2 positives -> 6 hard negatives
    locs.requires_grad_(True)
    logits.requires_grad_(True)
    SSDLoss()(locs, logits, loc_targets, labels).backward()
    assert locs.grad[0, :, :2].abs().sum() > 0 and not locs.grad[0, :, 2:].any()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0]
    hardest = ce[2:].topk(6).indices + 2
    touched = logits.grad[0].abs().sum(dim=0) > 0
    expected = torch.zeros(40, dtype=torch.bool)
    expected[:2] = True
    expected[hardest] = True
    assert torch.equal(touched, expected)


def test_fp32_under_bf16_autocast() -> None:
    case = make_case(6, 2, 9, 8732, [0.01, 0.003])
    want = SSDLoss()(*case)
    locs, logits = case[0].bfloat16().requires_grad_(True), case[1].bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SSDLoss()(locs, logits, case[2], case[3])
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    # Inputs were rounded to bf16; the loss itself is fp32, so it stays close.
    want_rounded = SSDLoss()(case[0].bfloat16().float(), case[1].bfloat16().float(), case[2], case[3])
    torch.testing.assert_close(got, want_rounded)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
