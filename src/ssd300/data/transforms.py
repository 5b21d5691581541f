"""SSD training augmentation (SPEC §6) and the single evaluation/inference preprocessing.

Everything heavy runs on uint8 and at 300x300: the IoU crop is chosen on box coordinates first,
then the JPEG is decoded at a reduced DCT scale when the crop allows it, cropped and resized in
one PIL call, and only then flipped and colour-jittered. Normalisation to float32 happens last,
ideally batched on the training device (:func:`normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ssd300.data.images import draft_for_crop, to_rgb

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


def _as_pil_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got {tuple(array.shape)}")
        if array.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image tensor, got {array.dtype}")
        array = array.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
        return Image.fromarray(array, "RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an HWC RGB array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), "RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}")


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_uint8(image: ImageLike, size: int = INPUT_SIZE) -> torch.Tensor:
    """PIL image / uint8 CHW tensor / HWC uint8 RGB array -> uint8 tensor (3, size, size).

    Bilinear with antialiasing (PIL), aspect ratio not kept, as the reference.
    """
    pil = _as_pil_rgb(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return pil_to_uint8_tensor(pil)


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


def _lut_point(image: Image.Image, lut: np.ndarray) -> Image.Image:
    table = np.clip(np.rint(lut), 0, 255).astype(np.uint8).tolist()
    return image.point(table * len(image.getbands()))


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    return _lut_point(image, np.arange(256, dtype=np.float64) * factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    # Blend with the mean grey level, as torchvision's adjust_contrast.
    histogram = np.asarray(image.convert("L").histogram(), dtype=np.float64)
    mean = float((histogram * np.arange(256)).sum() / max(histogram.sum(), 1.0))
    return _lut_point(image, np.arange(256, dtype=np.float64) * factor + (1.0 - factor) * mean)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    grey = image.convert("L").convert("RGB")
    return Image.blend(grey, image, factor)  # grey + factor * (image - grey), clipped


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by ``shift`` of a full turn (PIL's HSV stores hue in 0..255, so it wraps)."""
    offset = int(round(shift * 255.0)) % 256
    if offset == 0:
        return image
    h, s, v = image.convert("HSV").split()
    h = h.point([(i + offset) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue in a random order (as torchvision's ColorJitter)."""
    factors = {
        "brightness": rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
        "contrast": rng.uniform(1 - CONTRAST, 1 + CONTRAST),
        "saturation": rng.uniform(1 - SATURATION, 1 + SATURATION),
        "hue": rng.uniform(-HUE, HUE),
    }
    ops = {"brightness": adjust_brightness, "contrast": adjust_contrast,
           "saturation": adjust_saturation, "hue": adjust_hue}
    for index in rng.permutation(4):
        name = ("brightness", "contrast", "saturation", "hue")[int(index)]
        image = ops[name](image, float(factors[name]))
    return image


# ----------------------------------------------------------------------------- training transform


class TrainTransform:
    """SSD training augmentation: IoU crop, horizontal flip (p=0.5), colour jitter, resize 300x300.

    Call with a *lazily opened* PIL image (``ssd300.data.images.open_image``) so the crop can set a
    reduced-size JPEG decode, its normalised ltrb boxes (M, 4) and labels (M,), and the sample's
    own ``numpy.random.Generator``. Returns (uint8 image (3, 300, 300), boxes (K, 4) float32 in
    [0, 1], labels (K,) int64); normalise with :func:`normalize` (batched, on the device).
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
        if self.crop:
            decision = sample_iou_crop(boxes, rng)
        else:
            decision = CropDecision(np.array([0.0, 0.0, 1.0, 1.0]), np.ones(len(boxes), dtype=bool))
        crop = decision.crop
        if self.reduced_decode:
            draft_for_crop(image, (crop[2] - crop[0], crop[3] - crop[1]), self.size)
        image = to_rgb(image)
        width, height = image.size
        pixel_box = (crop[0] * width, crop[1] * height, crop[2] * width, crop[3] * height)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=pixel_box)
        boxes = crop_boxes(boxes[decision.keep], crop)
        labels = labels[decision.keep]
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = flip_boxes(boxes)
        if self.color:
            image = color_jitter(image, rng)
        return pil_to_uint8_tensor(image), boxes.astype(np.float32), labels
