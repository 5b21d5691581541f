"""Opening image files as RGB, whatever their mode, with optional reduced-size JPEG decoding, and
the one coercion of in-memory images (PIL, numpy, tensors) to uint8 RGB tensors.

COCO boxes refer to the stored pixel grid, so datasets use the pixels as stored (no EXIF
orientation; a size that contradicts the json is caught in ``data.coco``); inference on files
(``ssd300 detect``, ``Detector``) shows the picture as a viewer would, with EXIF orientation.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image

from ssd300.files import PathLike

# The one list of image file suffixes: what detect reads from a folder, what a dataset folder must
# hold, what calibration takes. Every suffix here is a format Pillow decodes.
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


def is_image_file(path: PathLike) -> bool:
    """Whether ``path``'s suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES

# Errors PIL raises for unreadable, truncated or hostile files.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError,
)


def open_image(path: Union[PathLike, BinaryIO]) -> Image.Image:
    """Open lazily (header only): pixels are decoded on first access, so a draft can still be set."""
    with warnings.catch_warnings():
        # Palette images with transparency warn on convert; that is expected and harmless here.
        warnings.simplefilter("ignore", UserWarning)
        return Image.open(path)


EXIF_ORIENTATION_TAG = 0x0112
# Pillow's transposition for each EXIF orientation (as ImageOps.exif_transpose applies them).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored, 5..8 = rotated by 90/270 degrees) from the header
    already read; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block is no reason to lose the image
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as displayed after applying ``orientation``."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """The image as displayed (what a photo viewer shows) for an EXIF ``orientation``."""
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def draft_for_crop(image: Image.Image, crop_size: tuple[float, float], out_size: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that still leaves the crop
    at least ``out_size`` pixels in each direction, so small crops of big photos decode cheaply.

    ``crop_size`` is the crop's (width, height) as fractions of the image. No-op for non-JPEGs.
    """
    if image.format != "JPEG" or getattr(image, "decoderconfig", None):
        return
    cw, ch = crop_size
    want = (max(1, math.ceil(out_size / max(cw, 1e-6))), max(1, math.ceil(out_size / max(ch, 1e-6))))
    image.draft(None, want)


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode and convert any PIL mode (L, LA, P, PA, RGBA, CMYK, I;16, I, F, 1, YCbCr) to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mode = image.mode
        if mode == "RGB":
            image.load()
            return image
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # High-bit-depth grayscale: rescale to 8 bits instead of clipping at 255.
            array = np.asarray(image, dtype=np.float32)
            top = float(array.max()) if array.size else 0.0
            scale = 255.0 / top if top > 255.0 else 1.0
            gray = np.clip(array * scale, 0, 255).astype(np.uint8)
            return Image.fromarray(gray, "L").convert("RGB")
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")


def to_uint8_chw(image: Union[Image.Image, np.ndarray, torch.Tensor]) -> torch.Tensor:
    """The one image coercer: PIL image (any mode) / HxW or HxWxC numpy array / CxHxW or HxW tensor
    -> uint8 RGB (3, H, W) tensor on the CPU.

    Arrays and tensors may be uint8, or float in [0, 1] (scaled and rounded to 0..255); 1 channel
    is repeated, a 4th (alpha) dropped. No copy where none is needed: a PIL image or HWC array
    comes back as a channels-last view of its pixels.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"expected an HxW or HxWxC image array, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 2:
            tensor = tensor[None]
        if tensor.dim() != 3:
            raise ValueError(f"expected a CxHxW image tensor, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"not an image: a {type(image).__name__}; pass a PIL image, a numpy array or a tensor")
    if tensor.is_floating_point():
        tensor = (tensor.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 or float in [0, 1], got {tensor.dtype}")
    channels = tensor.shape[0]
    if channels == 1:
        return tensor.expand(3, -1, -1)
    if channels == 4:
        return tensor[:3]
    if channels != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {channels} (shape {tuple(tensor.shape)})")
    return tensor
