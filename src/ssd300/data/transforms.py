"""SSD training augmentation (SPEC §6) and the single evaluation/inference preprocessing.

Everything heavy runs on uint8 and at 300x300: the IoU crop is chosen on box coordinates first,
then the JPEG is decoded at a reduced DCT scale when the crop allows it, only the crop is copied
and resized (torch's vectorised uint8 antialiased bilinear), and only then flipped and
colour-jittered (the four colour operations fused into one affine map). Normalisation to float32
happens last, batched on the training device (:func:`normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ssd300.data.images import draft_for_crop, to_rgb, to_uint8_chw

INPUT_SIZE = 300
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The reference's sampler: no crop, a minimum IoU with every box, or no IoU limit (None, -inf).
IOU_CROP_MODES: tuple[Optional[float], ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, float("-inf"))
CROP_SCALE = (0.3, 1.0)
CROP_ASPECT = (0.5, 2.0)
BRIGHTNESS = 0.125   # factor uniform in [1 - 0.125, 1 + 0.125]
CONTRAST = 0.5       # factor uniform in [0.5, 1.5]
SATURATION = 0.5     # factor uniform in [0.5, 1.5]
HUE = 0.05           # shift uniform in [-0.05, 0.05] of a full turn (the reference's ColorJitter)

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------- evaluation


def resize_hwc_uint8(pixels: torch.Tensor, size: int = INPUT_SIZE,
                     box: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """Crop (integer ltrb ``box``) and resize a uint8 (H, W, 3) tensor -> uint8 (3, size, size).

    Bilinear with antialiasing, aspect not kept (as the reference). Uses torch's vectorised uint8
    channels-last kernel (several times faster than PIL's resize, equal to it within 1 level).
    """
    if box is not None:
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
    batch = pixels.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if tuple(batch.shape[-2:]) != (size, size):
        batch = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
    return batch[0]


def resize_uint8(image: ImageLike, size: int = INPUT_SIZE) -> torch.Tensor:
    """Any image :func:`~ssd300.data.images.to_uint8_chw` takes -> uint8 tensor (3, size, size)."""
    return resize_hwc_uint8(to_uint8_chw(image).permute(1, 2, 0), size)


_NORM_CACHE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, device.index if device.index is not None else -1)
    if key not in _NORM_CACHE:
        std = torch.tensor(STD, dtype=torch.float32)
        mean = torch.tensor(MEAN, dtype=torch.float32)
        scale = (1.0 / (255.0 * std)).view(3, 1, 1)
        shift = (mean / std).view(3, 1, 1)
        _NORM_CACHE[key] = (scale.to(device), shift.to(device))
    return _NORM_CACHE[key]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (…, 3, H, W) in [0, 255] on any device -> float32 ``(x / 255 - MEAN) / STD``.

    Float input is taken as already scaled to [0, 1]. Keeps the input's memory format.
    """
    scale, shift = _norm_constants(images.device)
    if images.dtype == torch.uint8:
        return images.float().mul_(scale).sub_(shift)
    return images.float().mul(scale * 255.0).sub_(shift)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, returning float values in [0, 1] (for visualisation)."""
    scale, shift = _norm_constants(images.device)
    return images.add(shift).div_(scale * 255.0).clamp_(0.0, 1.0)


class EvalTransform:
    """The one definition of evaluation/inference preprocessing: resize to 300x300 + normalise.

    ``transform(image)`` gives the model-ready float32 (3, 300, 300). The fast path splits it:
    ``resize_uint8`` on the CPU (workers), then ``normalize`` batched on the device.
    """

    size = INPUT_SIZE

    def resize_uint8(self, image: ImageLike) -> torch.Tensor:
        return resize_uint8(image, self.size)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        return normalize(images)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        return normalize(self.resize_uint8(image))

    def batch(self, images: Sequence[ImageLike], device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Several images -> (N, 3, 300, 300) float32 on ``device``; normalised there."""
        stacked = torch.stack([self.resize_uint8(image) for image in images])
        if device is not None:
            stacked = stacked.to(device)
        return normalize(stacked)


# ----------------------------------------------------------------------------- training geometry


def box_iou_numpy(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of (M, 4) ltrb boxes with one ltrb box -> (M,)."""
    lt = np.maximum(boxes[:, :2], box[:2])
    rb = np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area_a = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    area_b = float(np.prod(box[2:] - box[:2]))
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


@dataclass(frozen=True)
class CropDecision:
    """An accepted crop in normalised ltrb, and which boxes it keeps (their centres are inside)."""

    crop: np.ndarray          # (4,) float64 ltrb in [0, 1]
    keep: np.ndarray          # (M,) bool
    min_iou: Optional[float] = None  # the constraint it met; None for the whole image


def sample_iou_crop(boxes: np.ndarray, rng: np.random.Generator, max_attempts: int = 100) -> CropDecision:
    """The SSD paper's random IoU crop, as the reference runs it.

    Choose a mode from :data:`IOU_CROP_MODES`; ``None`` means the whole image. Otherwise draw one
    crop (width and height uniform in [0.3, 1], width/height in [0.5, 2], uniform position); it is
    accepted when its IoU with *every* box exceeds the mode's minimum and at least one box centre
    lies inside it. Rejected draws pick a new mode. After ``max_attempts`` the whole image is used
    (the reference loops forever; a bound keeps degenerate inputs from hanging a worker).
    """
    whole = CropDecision(np.array([0.0, 0.0, 1.0, 1.0]), np.ones(len(boxes), dtype=bool))
    if len(boxes) == 0:
        return whole
    for _ in range(max_attempts):
        min_iou = IOU_CROP_MODES[int(rng.integers(len(IOU_CROP_MODES)))]
        if min_iou is None:
            return whole
        w, h = rng.uniform(*CROP_SCALE, size=2)
        if not CROP_ASPECT[0] <= w / h <= CROP_ASPECT[1]:
            continue
        left, top = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        crop = np.array([left, top, left + w, top + h])
        if not np.all(box_iou_numpy(boxes, crop) > min_iou):
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = np.all((centres > crop[:2]) & (centres < crop[2:]), axis=1)
        if keep.any():
            return CropDecision(crop, keep, min_iou)
    return whole


def crop_boxes(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Express ltrb boxes (normalised to the image) in the crop's frame, clipped to [0, 1]."""
    size = crop[2:] - crop[:2]
    out = (boxes - np.tile(crop[:2], 2)) / np.tile(size, 2)
    return np.clip(out, 0.0, 1.0)


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Horizontal flip of normalised ltrb boxes."""
    out = boxes.copy()
    out[:, 0] = 1.0 - boxes[:, 2]
    out[:, 2] = 1.0 - boxes[:, 0]
    return out


# ----------------------------------------------------------------------------- training colour

GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as PIL and torchvision
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def hue_rotation(shift: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``shift`` of a full turn (a rotation of the YIQ chroma plane,
    as DALI's ``hsv`` operator does); luma is unchanged."""
    angle = 2.0 * np.pi * shift
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])
    return _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ


@dataclass(frozen=True)
class ColorJitterParams:
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[str, ...]

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "ColorJitterParams":
        names = ("brightness", "contrast", "saturation", "hue")
        values = (rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS), rng.uniform(1 - CONTRAST, 1 + CONTRAST),
                  rng.uniform(1 - SATURATION, 1 + SATURATION), rng.uniform(-HUE, HUE))
        order = tuple(names[int(i)] for i in rng.permutation(4))
        brightness, contrast, saturation, hue = (float(v) for v in values)
        return cls(brightness, contrast, saturation, hue, order)


def color_affine(params: ColorJitterParams, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The four colour operations, in ``params.order``, composed into one affine map y = A x + b.

    brightness: y = f x; contrast: y = f x + (1 - f) * mean grey of the current image (as
    torchvision); saturation: y = f x + (1 - f) * grey(x); hue: YIQ rotation. The mean grey the
    contrast needs is tracked through the earlier operations from the input's mean colour, so the
    only difference from applying them one by one is that values are clipped once, at the end.
    """
    matrix, offset = np.eye(3), np.zeros(3)
    mean = np.asarray(mean_rgb, dtype=np.float64)
    for name in params.order:
        if name == "brightness":
            step, shift = params.brightness * np.eye(3), np.zeros(3)
        elif name == "contrast":
            grey = float(GREY @ (matrix @ mean + offset))
            step, shift = params.contrast * np.eye(3), np.full(3, (1.0 - params.contrast) * grey)
        elif name == "saturation":
            step = params.saturation * np.eye(3) + (1.0 - params.saturation) * np.outer(np.ones(3), GREY)
            shift = np.zeros(3)
        else:
            step, shift = hue_rotation(params.hue), np.zeros(3)
        matrix, offset = step @ matrix, step @ offset + shift
    return matrix, offset


def apply_color_affine(image: torch.Tensor, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, H, W): y = A x + b per pixel, rounded and clipped once."""
    flat = image.reshape(3, -1).float()
    out = torch.addmm(torch.as_tensor(offset, dtype=torch.float32).view(3, 1),
                      torch.as_tensor(matrix, dtype=torch.float32), flat)
    return out.round_().clamp_(0, 255).to(torch.uint8).view(image.shape)


def color_jitter(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a random order (torchvision ColorJitter's ranges
    and order) on a uint8 (3, H, W) tensor, fused into one affine colour transform."""
    params = ColorJitterParams.sample(rng)
    mean = image.reshape(3, -1).float().mean(dim=1).double().numpy()
    return apply_color_affine(image, *color_affine(params, mean))


# ----------------------------------------------------------------------------- training transform


class TrainTransform:
    """SSD training augmentation: IoU crop, horizontal flip (p=0.5), colour jitter, resize 300x300.

    Call with a *lazily opened* PIL image (``ssd300.data.images.open_image``) so the crop can set a
    reduced-size JPEG decode, its normalised ltrb boxes (M, 4) and labels (M,), and the sample's
    own ``numpy.random.Generator``. Returns (uint8 image (3, 300, 300), boxes (K, 4) float32 in
    [0, 1], labels (K,) int64); normalise with :func:`normalize` (batched, on the device).
    Order of work: choose the crop on the boxes, decode (reduced when the crop allows), crop,
    resize to 300x300, flip, colour - so everything after the decode touches 300x300 uint8 only,
    and the four colour operations are one fused affine map.
    """

    def __init__(self, size: int = INPUT_SIZE, *, crop: bool = True, flip: bool = True,
                 color: bool = True, reduced_decode: bool = True) -> None:
        self.size = size
        self.crop = crop
        self.flip = flip
        self.color = color
        self.reduced_decode = reduced_decode

    def __call__(self, image: Image.Image, boxes: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        whole = CropDecision(np.array([0.0, 0.0, 1.0, 1.0]), np.ones(len(boxes), dtype=bool))
        decision = sample_iou_crop(boxes, rng) if self.crop else whole
        crop = decision.crop
        if self.reduced_decode:
            draft_for_crop(image, (crop[2] - crop[0], crop[3] - crop[1]), self.size)
        rgb = to_rgb(image)
        width, height = rgb.size
        # Whole pixels (no resampling of the crop); the boxes follow the rounded crop.
        left, top = int(round(crop[0] * width)), int(round(crop[1] * height))
        right = max(int(round(crop[2] * width)), left + 1)
        bottom = max(int(round(crop[3] * height)), top + 1)
        pixel_crop = np.array([left / width, top / height, right / width, bottom / height])
        out_boxes = crop_boxes(boxes, pixel_crop)
        keep = decision.keep & (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
        if not keep.any() and decision is not whole:  # rounding emptied the crop: use the image
            left, top, right, bottom = 0, 0, width, height
            out_boxes, keep = boxes.copy(), whole.keep
        out_boxes, labels = out_boxes[keep], labels[keep]
        # np.asarray shares PIL's bytes (read-only); copying only the crop gives torch a writable array
        region = np.array(np.asarray(rgb)[top:bottom, left:right])
        result = resize_hwc_uint8(torch.from_numpy(region), self.size).contiguous()   # (3, S, S)
        if self.flip and rng.random() < 0.5:
            result = result.flip(-1)
            out_boxes = flip_boxes(out_boxes)
        if self.color:
            result = color_jitter(result, rng)
        return result, out_boxes.astype(np.float32), labels
