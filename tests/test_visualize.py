"""Drawing detections: input conversions, box pixels in class colours, captions, file output."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.visualize import class_color, draw_detection_result, draw_detections, save_image, to_uint8_chw


def _grey(h: int = 120, w: int = 160) -> torch.Tensor:
    return torch.full((3, h, w), 128, dtype=torch.uint8)


def test_to_uint8_chw_accepts_pil_numpy_and_tensors():
    array = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    expected = torch.from_numpy(array).permute(2, 0, 1)
    assert torch.equal(to_uint8_chw(Image.fromarray(array)), expected)
    assert torch.equal(to_uint8_chw(array), expected)
    assert torch.equal(to_uint8_chw(expected), expected)
    assert torch.equal(to_uint8_chw(expected.float() / 255), expected)
    grey = to_uint8_chw(array[:, :, 0])
    assert grey.shape == (3, 7, 9) and torch.equal(grey[1], expected[0])
    with pytest.raises(ValueError):
        to_uint8_chw(torch.zeros(3, 4, 4, dtype=torch.int32))


def test_class_colors_are_stable_and_distinct():
    colors = [class_color(i) for i in range(1, 81)]
    assert class_color(5) == class_color(5)
    assert len(set(colors)) == 80


def test_box_outline_is_drawn_in_class_colour_and_inside_untouched():
    image = _grey()
    out = draw_detections(image, [[20, 30, 100, 90]], [3], [0.9], class_names=["bg", "a", "b", "cat"], line_width=2)
    assert out.shape == image.shape and out.dtype == torch.uint8
    color = torch.tensor(class_color(3), dtype=torch.uint8)
    # The right edge (x = 100, 99 with width 2) at a row below the caption is the class colour.
    assert torch.equal(out[:, 70, 100], color) and torch.equal(out[:, 70, 99], color)
    # The inside (below the caption) and outside of the box are unchanged; the input is not modified.
    assert torch.equal(out[:, 70, 60], image[:, 70, 60])
    assert torch.equal(out[:, 5, 5], image[:, 5, 5])
    assert torch.equal(image, _grey())
    # The caption fills a background rectangle in the class colour just inside the top-left corner.
    caption = out[:, 33:40, 23:60].reshape(3, -1).T
    assert (caption == color).all(dim=1).any()


def test_score_threshold_filters_and_empty_input_returns_a_copy():
    image = _grey()
    out = draw_detections(image, [[10, 10, 50, 50]], [1], [0.2], score_threshold=0.5)
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()
    empty = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert torch.equal(empty, image)


def test_out_of_image_boxes_are_clipped_not_rejected():
    out = draw_detections(_grey(), [[-20.0, -5.0, 500.0, 60.0]], [2], [0.7], line_width=1)
    color = torch.tensor(class_color(2), dtype=torch.uint8)
    assert torch.equal(out[:, 40, 159], color)  # right edge clipped to the last column


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        draw_detections(_grey(), [[0, 0, 5, 5]], [1, 2])


def test_draw_detection_result_uses_per_detection_names(tmp_path):
    detections = SimpleNamespace(boxes=torch.tensor([[10.0, 10.0, 80.0, 80.0]]), labels=torch.tensor([7]),
                                 scores=torch.tensor([0.5]), class_names=["zebra"])
    out = draw_detection_result(Image.new("RGB", (160, 120), (128, 128, 128)), detections)
    assert torch.equal(out[:, 50, 80], torch.tensor(class_color(7), dtype=torch.uint8))
    path = tmp_path / "sub" / "out.png"
    save_image(out, path)
    assert torch.equal(to_uint8_chw(Image.open(path)), out)
