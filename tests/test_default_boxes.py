"""Golden values of the 8732 default boxes, computed by hand from SPEC §2's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ssd300.default_boxes import (
    DefaultBoxes,
    DefaultBoxesConfig,
    default_boxes_300,
    ltrb_to_xywh,
    xywh_to_ltrb,
)

FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
STEPS = (8, 16, 32, 64, 100, 300)
SCALES = (21, 45, 99, 153, 207, 261, 315)
BOXES_PER_CELL = (4, 6, 6, 6, 4, 4)


def _level_slices() -> list[slice]:
    slices, start = [], 0
    for nd, size in zip(BOXES_PER_CELL, FEATURE_SIZES):
        slices.append(slice(start, start + nd * size * size))
        start += nd * size * size
    return slices


def _clamp(values: list[float]) -> list[float]:
    return [min(max(v, 0.0), 1.0) for v in values]


def test_count_and_per_level_counts() -> None:
    boxes = default_boxes_300()
    assert boxes.num_boxes == len(boxes) == 8732
    assert boxes.xywh.shape == boxes.ltrb.shape == (8732, 4)
    assert boxes.xywh.dtype == boxes.ltrb.dtype == torch.float32
    assert boxes.boxes_per_location == BOXES_PER_CELL
    assert [s.stop - s.start for s in _level_slices()] == [5776, 2166, 600, 150, 36, 4]
    assert (boxes.scale_xy, boxes.scale_wh) == (0.1, 0.2)


@pytest.mark.parametrize("level", range(6))
def test_first_and_last_box_of_each_level(level: int) -> None:
    boxes = default_boxes_300().xywh
    fk = 300 / STEPS[level]
    sk = SCALES[level] / 300
    size = FEATURE_SIZES[level]
    # First box: first size (sk, sk) at row 0, column 0.
    first = _clamp([0.5 / fk, 0.5 / fk, sk, sk])
    # Last box: last size (the transposed box of the last ratio) at the last row and column.
    ratio = (2, 3, 3, 3, 2, 2)[level]
    last_center = (size - 1 + 0.5) / fk
    last = _clamp([last_center, last_center, sk / math.sqrt(ratio), sk * math.sqrt(ratio)])
    level_slice = _level_slices()[level]
    torch.testing.assert_close(boxes[level_slice.start], torch.tensor(first), rtol=0, atol=1e-7)
    torch.testing.assert_close(boxes[level_slice.stop - 1], torch.tensor(last), rtol=0, atol=1e-7)


def test_order_is_size_then_row_then_column() -> None:
    boxes = default_boxes_300().xywh
    fk = 300 / 8
    middle = math.sqrt(21 * 45) / 300
    # Level 0, second size (the sqrt(sk*sk') square), row 2, column 5.
    index = 1 * 38 * 38 + 2 * 38 + 5
    expected = torch.tensor([5.5 / fk, 2.5 / fk, middle, middle])
    torch.testing.assert_close(boxes[index], expected, rtol=0, atol=1e-7)
    # Level 1, third size (ratio 2: w = sk*sqrt(2), h = sk/sqrt(2)), row 0, column 1.
    sk = 45 / 300
    index = 5776 + 2 * 19 * 19 + 1
    expected = torch.tensor([1.5 / 18.75, 0.5 / 18.75, sk * math.sqrt(2), sk / math.sqrt(2)])
    torch.testing.assert_close(boxes[index], expected, rtol=0, atol=1e-7)


def test_clamping_and_ltrb_from_clamped_xywh() -> None:
    boxes = default_boxes_300()
    # Level 5 (1x1 map), 6th size: w = 0.87/sqrt(2) ~ 0.615, h = 0.87*sqrt(2) ~ 1.23 -> 1.
    last = boxes.xywh[-1]
    assert last[3].item() == 1.0
    assert last[2].item() == pytest.approx(261 / 300 / math.sqrt(2), abs=1e-7)
    # Level 5, 2nd size: sqrt(261*315)/300 ~ 0.956, not clamped; 1st size 0.87.
    assert boxes.xywh[-3, 2].item() == pytest.approx(math.sqrt(261 * 315) / 300, abs=1e-7)
    assert boxes.xywh.min() >= 0 and boxes.xywh.max() <= 1
    # ltrb derived from the *clamped* xywh: the last box spans the full height exactly.
    assert boxes.ltrb[-1, 1].item() == 0.0 and boxes.ltrb[-1, 3].item() == 1.0
    # ... and may leave [0, 1] (level 4 boxes near the border are wider than their centre offset).
    assert boxes.ltrb.min() < 0
    x, y, w, h = boxes.xywh.unbind(1)
    expected_ltrb = torch.stack((x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h), dim=1)
    assert torch.equal(boxes.ltrb, expected_ltrb)


def test_conversions_round_trip() -> None:
    boxes = default_boxes_300()
    torch.testing.assert_close(ltrb_to_xywh(boxes.ltrb), boxes.xywh, rtol=0, atol=1e-6)
    assert torch.equal(xywh_to_ltrb(boxes.xywh), boxes.ltrb)


def test_cached_and_cheap_to_move() -> None:
    boxes = default_boxes_300()
    assert default_boxes_300() is boxes
    assert boxes.to("cpu") is boxes
    assert boxes.to(torch.device("cpu")) is boxes
    if torch.cuda.is_available():
        on_gpu = boxes.to("cuda")
        assert boxes.to("cuda") is on_gpu and on_gpu.to("cpu") is boxes
        assert torch.equal(on_gpu.xywh.cpu(), boxes.xywh)


def test_custom_config_counts() -> None:
    config = DefaultBoxesConfig()
    assert config.num_boxes == 8732
    small = DefaultBoxes.build(
        DefaultBoxesConfig(feature_sizes=(2, 1), steps=(150, 300), scales=(60, 150, 270),
                           aspect_ratios=((2,), (2, 3)))
    )
    assert small.num_boxes == 4 * 4 + 6 * 1
    with pytest.raises(ValueError, match="one entry per level"):
        DefaultBoxesConfig(feature_sizes=(2, 1))
