"""Draw labelled detection boxes on images (torchvision's drawing utilities).

Used by ``ssd300 detect`` for annotated images and by the demo to show results. Images may be
PIL images, HWC uint8 numpy arrays or CHW tensors (uint8, or float in [0, 1]); the result is
always a CHW uint8 tensor that :func:`save_image` writes as PNG/JPEG.
"""

from __future__ import annotations

import colorsys
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ssd300.data.images import to_uint8_chw
from ssd300.errors import UserInputError
from ssd300.files import atomic_write
from ssd300.fonts import single_font

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

# 0.618... (golden ratio conjugate) spreads consecutive labels' hues far apart, so neighbouring
# class ids get clearly different colours and the same class always gets the same colour.
_GOLDEN = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, saturated RGB colour for a class label."""
    hue = (int(label) * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@functools.lru_cache(maxsize=1)
def _truetype_font() -> str | None:
    """A TrueType font file so labels can be scaled; matplotlib (a dependency) ships DejaVu Sans."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # matplotlib missing or broken: fall back to PIL's small bitmap font
        return None
    return str(path) if path.is_file() else None


ClassNames = Union[Sequence[str], Mapping[int, str]]


def _label_text(label: int, score: float | None, class_names: ClassNames | None) -> str:
    if isinstance(class_names, Mapping):
        name = class_names.get(label, str(label))
    elif class_names is not None and 0 <= label < len(class_names):
        name = class_names[label]
    else:
        name = str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_detections(
    image: ImageLike,
    boxes: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    labels: torch.Tensor | np.ndarray | Sequence[int],
    scores: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    class_names: ClassNames | None = None,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    font_size: int | None = None,
) -> torch.Tensor:
    """Draw boxes (ltrb, in pixels of ``image``) with "<class name> <score>" captions.

    ``class_names[label]`` names a label (a sequence such as ``LabelMap.names``, or a mapping);
    without it the label id is shown. Boxes scoring below ``score_threshold`` are not drawn. Line
    width and font size scale with the image unless given. Returns a new 3xHxW uint8 tensor.
    """
    canvas = to_uint8_chw(image)
    height, width = canvas.shape[1:]
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not isinstance(boxes, torch.Tensor) else boxes)
    boxes_t = boxes_t.detach().float().cpu().reshape(-1, 4)
    labels_t = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    scores_t = None if scores is None else torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if labels_t.numel() != boxes_t.shape[0] or (scores_t is not None and scores_t.numel() != boxes_t.shape[0]):
        raise ValueError("boxes, labels and scores must have one entry per detection")
    if scores_t is not None and score_threshold > 0:
        keep = scores_t >= score_threshold
        boxes_t, labels_t, scores_t = boxes_t[keep], labels_t[keep], scores_t[keep]
    if boxes_t.shape[0] == 0:
        return canvas.clone()
    # Clip to the canvas and keep x1 <= x2, y1 <= y2 (draw_bounding_boxes rejects inverted boxes).
    boxes_t[:, 0::2] = boxes_t[:, 0::2].clamp(0, width - 1)
    boxes_t[:, 1::2] = boxes_t[:, 1::2].clamp(0, height - 1)
    boxes_t[:, 2:] = torch.maximum(boxes_t[:, 2:], boxes_t[:, :2])
    short_side = min(height, width)
    line_width = line_width or max(1, round(short_side / 250))
    font_size = font_size or max(10, round(short_side / 40))
    texts = [
        _label_text(int(label), None if scores_t is None else float(score), class_names)
        for label, score in zip(labels_t.tolist(),
                                scores_t.tolist() if scores_t is not None else [None] * len(labels_t))
    ]
    # PIL draws with one font: the installed one that has most of the names' characters (a CJK
    # font for CJK names), the others drawn as a box rather than as PIL's invisible .notdef.
    font, choice = single_font(texts)
    font = font or _truetype_font()
    texts = [choice.clean(text) for text in texts]
    return draw_bounding_boxes(
        canvas,
        boxes_t,
        labels=texts,
        colors=[class_color(int(label)) for label in labels_t.tolist()],
        width=line_width,
        font=font,
        font_size=font_size if font is not None else None,
        fill_labels=True,
        label_colors="black",
    )


def draw_detection_result(image: ImageLike, detections: Any, class_names: ClassNames | None = None,
                          score_threshold: float = 0.0) -> torch.Tensor:
    """Draw an object with ``boxes`` (pixels), ``labels`` and ``scores`` attributes.

    Accepts :class:`ssd300.inference.ImageDetections`, whose per-detection ``class_names`` are
    used for the captions, or anything shaped like it.
    """
    names = class_names
    if names is None and getattr(detections, "class_names", None) is not None:
        names = dict(zip(torch.as_tensor(detections.labels).reshape(-1).tolist(), detections.class_names))
    return draw_detections(image, detections.boxes, detections.labels, detections.scores,
                           class_names=names, score_threshold=score_threshold)


# The worst images' three kinds of boxes (:func:`draw_errors`); the report's legend uses the same.
ERROR_COLORS: dict[str, tuple[int, int, int]] = {
    "true positive": (0, 190, 60),      # green
    "false positive": (235, 30, 30),    # red
    "miss": (30, 110, 255),             # blue
}


def draw_errors(image: ImageLike, errors: Any, names: Mapping[int, str]) -> torch.Tensor:
    """One image's :class:`ssd300.diagnostics.ImageErrors` (xywh boxes in its pixels): true
    positives, false positives ("FP c 0.70 on b" where it sits on a missed box of class b) and
    missed boxes, each kind in its :data:`ERROR_COLORS` colour. Returns a 3xHxW uint8 tensor."""
    canvas = to_uint8_chw(image)
    # false positives first, misses last: the few boxes that matter most are drawn on top
    entries: list[tuple[list[float], str, tuple[int, int, int]]] = []
    for item in errors.false_positives:
        text = f"FP {names.get(item['category_id'], item['category_id'])} {item['score']:.2f}"
        if "true_category_id" in item:
            text += f" on {names.get(item['true_category_id'], item['true_category_id'])}"
        entries.append((item["bbox"], text, ERROR_COLORS["false positive"]))
    for item in errors.true_positives:
        entries.append((item["bbox"], f"TP {names.get(item['category_id'], item['category_id'])} {item['score']:.2f}",
                        ERROR_COLORS["true positive"]))
    for item in errors.misses:
        entries.append((item["bbox"], f"miss {names.get(item['category_id'], item['category_id'])}",
                        ERROR_COLORS["miss"]))
    if not entries:
        return canvas.clone()
    height, width = canvas.shape[1:]
    boxes = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _, _ in entries], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    texts = [text for _, text, _ in entries]
    font, choice = single_font(texts)
    font = font or _truetype_font()
    short_side = min(height, width)
    return draw_bounding_boxes(canvas, boxes, labels=[choice.clean(t) for t in texts],
                               colors=[color for _, _, color in entries], width=max(2, round(short_side / 200)),
                               font=font, font_size=max(10, round(short_side / 40)) if font is not None else None,
                               fill_labels=True, label_colors="black")


def save_image(image: torch.Tensor, path: str | os.PathLike[str], quality: int = 90) -> None:
    """Write a 3xHxW uint8 tensor; the format follows the file extension (PNG, JPEG, ...).

    Written atomically (:func:`ssd300.files.atomic_write`): a full disk leaves no half image at
    ``path`` and is a one-line error naming it."""
    array = to_uint8_chw(image).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise UserInputError(f"{path}: unknown image format {path.suffix!r}; use .jpg or .png")
    options = {"quality": quality} if image_format == "JPEG" else {}
    with atomic_write(path) as handle:
        pil.save(handle, format=image_format, **options)
