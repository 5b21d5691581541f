"""Geometry and colour of the SSD augmentation, and the shared evaluation transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssd300.data import transforms as T
from ssd300.data.images import open_image


def _random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    lt = rng.uniform(0.0, 0.8, size=(count, 2))
    wh = rng.uniform(0.02, 0.6, size=(count, 2))
    return np.clip(np.concatenate([lt, lt + wh], axis=1), 0.0, 1.0)


def _iou_plain(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _png(array: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    buffer.seek(0)
    return Image.open(buffer)


def test_box_iou_matches_plain_loop():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 20)
    crop = np.array([0.1, 0.2, 0.7, 0.9])
    expected = [_iou_plain(b, crop) for b in boxes]
    np.testing.assert_allclose(T.box_iou_numpy(boxes, crop), expected, rtol=1e-9)


def test_iou_crop_meets_its_constraint_and_keeps_centred_boxes():
    modes_seen = set()
    cropped = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        boxes = _random_boxes(rng, int(rng.integers(1, 6)))
        decision = T.sample_iou_crop(boxes, rng)
        modes_seen.add(decision.min_iou)
        crop = decision.crop
        if decision.min_iou is None:
            np.testing.assert_array_equal(crop, [0, 0, 1, 1])
            assert decision.keep.all()
            continue
        cropped += 1
        w, h = crop[2] - crop[0], crop[3] - crop[1]
        assert 0.3 <= w <= 1.0 and 0.3 <= h <= 1.0
        assert 0.5 <= w / h <= 2.0
        assert crop[0] >= 0 and crop[1] >= 0 and crop[2] <= 1 and crop[3] <= 1
        for box in boxes:  # the constraint holds for every box, kept or not
            assert _iou_plain(box, crop) > decision.min_iou
        for box, kept in zip(boxes, decision.keep):
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            inside = crop[0] < cx < crop[2] and crop[1] < cy < crop[3]
            assert kept == inside
        assert decision.keep.any()
    assert cropped > 100
    assert None in modes_seen and 0.1 in modes_seen and float("-inf") in modes_seen


def test_crop_boxes_matches_plain_per_box_computation():
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 10)
    crop = np.array([0.2, 0.1, 0.8, 0.6])
    out = T.crop_boxes(boxes, crop)
    for box, got in zip(boxes, out):
        w, h = crop[2] - crop[0], crop[3] - crop[1]
        expected = [min(max((box[0] - crop[0]) / w, 0), 1), min(max((box[1] - crop[1]) / h, 0), 1),
                    min(max((box[2] - crop[0]) / w, 0), 1), min(max((box[3] - crop[1]) / h, 0), 1)]
        np.testing.assert_allclose(got, expected, atol=1e-12)


def test_flip_twice_is_identity_for_boxes_and_images():
    boxes = _random_boxes(np.random.default_rng(2), 7)
    flipped = T.flip_boxes(boxes)
    assert not np.allclose(flipped, boxes)
    np.testing.assert_allclose(flipped[:, 0], 1 - boxes[:, 2])
    np.testing.assert_allclose(T.flip_boxes(flipped), boxes, atol=1e-12)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    twice = image.transpose(Image.FLIP_LEFT_RIGHT).transpose(Image.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(image))


def test_train_transform_boxes_stay_in_unit_square_and_are_not_degenerate():
    transform = T.TrainTransform()
    base = np.random.default_rng(4).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        boxes = _random_boxes(rng, int(rng.integers(1, 5)))
        labels = np.arange(1, len(boxes) + 1)
        image, out_boxes, out_labels = transform(_png(base), boxes, labels, rng)
        assert image.shape == (3, 300, 300) and image.dtype == torch.uint8
        assert out_boxes.dtype == np.float32 and len(out_boxes) == len(out_labels) >= 1
        assert (out_boxes >= 0).all() and (out_boxes <= 1).all()
        assert (out_boxes[:, 2] > out_boxes[:, 0]).all() and (out_boxes[:, 3] > out_boxes[:, 1]).all()
        assert set(out_labels.tolist()) <= set(labels.tolist())


PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _painted(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Black image with four non-overlapping boxes painted in known colours."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    fractions = np.array([[0.05, 0.05, 0.40, 0.45], [0.55, 0.10, 0.95, 0.40],
                          [0.10, 0.55, 0.45, 0.95], [0.60, 0.60, 0.90, 0.90]])
    for (l, t, r, b), color in zip(fractions, PALETTE):
        array[int(round(t * height)):int(round(b * height)), int(round(l * width)):int(round(r * width))] = color
    return array, fractions


@pytest.mark.parametrize("fmt,size", [("PNG", (400, 300)), ("JPEG", (2400, 1800))])
def test_image_content_and_boxes_move_together(fmt, size, tmp_path):
    """Paint each box a colour, transform (crop, flip, resize, reduced JPEG decode), check colours."""
    array, boxes = _painted(*size)
    path = tmp_path / f"painted.{fmt.lower()}"
    Image.fromarray(array).save(path, fmt, quality=95)
    transform = T.TrainTransform(color=False)
    checked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image, out_boxes, out_labels = transform(open_image(path), boxes, np.arange(4), rng)
        pixels = image.permute(1, 2, 0).numpy().astype(np.int32)
        for box, label in zip(out_boxes * 300, out_labels):
            l, t, r, b = box
            if r - l < 8 or b - t < 8:
                continue
            # the box interior (a margin away from resampled edges) has the box's colour
            inner = pixels[int(t) + 3:int(np.ceil(b)) - 3, int(l) + 3:int(np.ceil(r)) - 3]
            assert np.abs(inner.mean(axis=(0, 1)) - PALETTE[label]).max() < 12, (seed, label)
            checked += 1
        # and just outside each box is not that colour (the box is tight to the painted region)
        for box, label in zip(out_boxes * 300, out_labels):
            l, t, r, b = box
            if r < 296 and b - t > 10:
                outside = pixels[int((t + b) / 2), min(299, int(np.ceil(r)) + 3)]
                assert np.abs(outside - PALETTE[label]).max() > 60
    assert checked > 60


def test_reduced_jpeg_decode_is_used_for_small_crops(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((3000, 4000, 3), 128, dtype=np.uint8)).save(path)
    from ssd300.data.images import draft_for_crop
    expectations = {(0.3, 0.3): (2000, 1500),   # 1200x900 px crop: at 1/2 still >= 300 px
                    (0.8, 0.9): (500, 375),     # 3200x2700 px crop: 1/8
                    (0.1, 0.1): (4000, 3000)}   # 400x300 px crop: full resolution needed
    for crop, size in expectations.items():
        image = open_image(path)
        draft_for_crop(image, crop, 300)
        image.load()
        assert image.size == size, crop
        assert image.size[0] * crop[0] >= 300 and image.size[1] * crop[1] >= 300
    png = _png(np.zeros((50, 60, 3), dtype=np.uint8))
    draft_for_crop(png, (0.3, 0.3), 300)     # not a JPEG: untouched
    assert png.size == (60, 50)


def test_train_transform_is_deterministic_for_a_generator_state():
    array = np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.1, 0.6, 0.7], [0.5, 0.4, 0.9, 0.9]])
    outputs = [T.TrainTransform()(_png(array), boxes, np.array([1, 2]), np.random.default_rng(9)) for _ in range(2)]
    assert torch.equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    other = T.TrainTransform()(_png(array), boxes, np.array([1, 2]), np.random.default_rng(10))
    assert not torch.equal(outputs[0][0], other[0])


def _apply(array: np.ndarray, matrix, offset) -> np.ndarray:
    """The fused colour map on an HWC array (the transform works on CHW tensors)."""
    return T.apply_color_affine(torch.from_numpy(array).permute(2, 0, 1), matrix, offset).permute(1, 2, 0).numpy()


def _torchvision_sequential(array: np.ndarray, params: T.ColorJitterParams) -> np.ndarray:
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    ops = {"brightness": lambda x: TF.adjust_brightness(x, params.brightness),
           "contrast": lambda x: TF.adjust_contrast(x, params.contrast),
           "saturation": lambda x: TF.adjust_saturation(x, params.saturation),
           "hue": lambda x: TF.adjust_hue(x, params.hue)}
    for name in params.order:
        tensor = ops[name](tensor.float() / 255.0) * 255.0  # float: no rounding between steps
    return tensor.round().clamp(0, 255).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("seed", range(6))
def test_fused_colour_jitter_equals_torchvision_applied_one_by_one(seed):
    """Without a hue shift the fused affine map equals torchvision's sequential ops (values kept
    inside [0, 255] so that the one-time clipping cannot differ)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(90, 166, (24, 32, 3), dtype=np.uint8)
    params = T.ColorJitterParams.sample(rng)
    params = T.ColorJitterParams(params.brightness, params.contrast, params.saturation, 0.0, params.order)
    got = _apply(array, *T.color_affine(params, array.reshape(-1, 3).mean(axis=0)))
    want = _torchvision_sequential(array, params)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_hue_rotation_shifts_hsv_hue_by_the_requested_amount_and_keeps_grey():
    """The YIQ rotation (DALI's hue) moves the HSV hue of coloured pixels by about the shift."""
    import colorsys

    rng = np.random.default_rng(7)
    hsv = np.stack([rng.uniform(0, 1, 200), rng.uniform(0.4, 0.9, 200), rng.uniform(0.4, 0.8, 200)], axis=1)
    rgb = np.array([[round(c * 255) for c in colorsys.hsv_to_rgb(*x)] for x in hsv], dtype=np.uint8)[None]
    hue_before = np.array([colorsys.rgb_to_hsv(*(c / 255))[0] for c in rgb[0]])
    for shift in (-0.05, 0.02, 0.05):
        params = T.ColorJitterParams(1.0, 1.0, 1.0, shift, ("hue", "brightness", "contrast", "saturation"))
        out = _apply(rgb, *T.color_affine(params, rgb.reshape(-1, 3).mean(axis=0)))[0]
        hue_after = np.array([colorsys.rgb_to_hsv(*(c / 255))[0] for c in out])
        delta = (hue_after - hue_before + 0.5) % 1.0 - 0.5
        assert abs(float(np.median(delta)) - shift) < 0.01
        assert (np.sign(delta) == np.sign(shift)).all()
    grey = np.full((4, 4, 3), 120, dtype=np.uint8)
    params = T.ColorJitterParams(1.0, 1.0, 1.0, 0.05, ("hue", "brightness", "contrast", "saturation"))
    np.testing.assert_array_equal(_apply(grey, *T.color_affine(params, np.full(3, 120.0))), grey)
    np.testing.assert_allclose(T.hue_rotation(0.0), np.eye(3), atol=1e-9)


def test_color_affine_brightness_and_contrast_formulas():
    mean = np.array([100.0, 50.0, 150.0])
    params = T.ColorJitterParams(1.1, 0.6, 1.0, 0.0, ("brightness", "contrast", "saturation", "hue"))
    matrix, offset = T.color_affine(params, mean)
    grey_after_brightness = float(T.GREY @ (1.1 * mean))
    np.testing.assert_allclose(matrix, 1.1 * 0.6 * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(offset, np.full(3, 0.4 * grey_after_brightness), atol=1e-9)


def test_normalize_matches_plain_formula_and_is_inverted_by_denormalize():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(T.MEAN).view(3, 1, 1)
    std = torch.tensor(T.STD).view(3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(T.normalize(images), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.normalize(images.float() / 255), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.denormalize(T.normalize(images)), images.float() / 255, rtol=1e-5, atol=1e-5)


def test_eval_transform_accepts_pil_tensor_and_numpy_identically():
    array = np.random.default_rng(7).integers(0, 256, (123, 211, 3), dtype=np.uint8)
    transform = T.EvalTransform()
    from_pil = transform(Image.fromarray(array))
    from_numpy = transform(array)
    from_tensor = transform(torch.from_numpy(array).permute(2, 0, 1))
    assert from_pil.shape == (3, 300, 300) and from_pil.dtype == torch.float32
    assert torch.equal(from_pil, from_numpy) and torch.equal(from_pil, from_tensor)
    # the fast path (uint8 resize, then normalise batched) is the same computation
    fast = transform.normalize(torch.stack([transform.resize_uint8(array)] * 2))
    assert torch.equal(fast[1], from_pil)
    assert torch.equal(transform.batch([array, Image.fromarray(array)])[0], from_pil)
    # a uniform image stays uniform: resize does not shift content
    grey = transform.resize_uint8(np.full((50, 80, 3), 77, dtype=np.uint8))
    assert int(grey.min()) == int(grey.max()) == 77


def test_eval_transform_rejects_bad_inputs():
    transform = T.EvalTransform()
    with pytest.raises(ValueError, match="uint8 or float"):
        transform(np.zeros((10, 10, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="channels"):
        transform(torch.zeros((10, 10, 3), dtype=torch.uint8))  # HWC, not CHW
    with pytest.raises(TypeError):
        transform([1, 2, 3])
