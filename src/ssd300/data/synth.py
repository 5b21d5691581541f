"""The built-in synthetic COCO-format dataset: coloured shapes on textured backgrounds.

Designed to be learnable from scratch on a CPU in minutes yet not trivial: each class has its
own form (disc, rectangle, triangle, cross, ring, ...) *and* a typical colour, but colours vary
and some objects take a random colour, so the form matters; objects are medium to large, one to
a few per image, overlapping a little (partly hidden, never mostly); image sizes and aspect
ratios vary; backgrounds are gradients with blotches, noise and thin distractor lines.
Every image's content comes from ``(seed, split, index)``, so a seed reproduces the dataset.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ssd300.errors import UserInputError
from ssd300.files import PathLike, atomic_write, check_output_path

# name, typical hue (degrees), aspect (width / height) range
SHAPES: tuple[tuple[str, float, tuple[float, float]], ...] = (
    ("disc", 0.0, (0.8, 1.25)),
    ("rectangle", 220.0, (0.5, 2.0)),
    ("triangle", 120.0, (0.8, 1.3)),
    ("cross", 45.0, (0.85, 1.15)),
    ("ring", 285.0, (0.8, 1.25)),
    ("star", 175.0, (0.9, 1.1)),
    ("diamond", 330.0, (0.6, 0.9)),
)
MAX_CLASSES = len(SHAPES)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (all sizes relative to the image's shorter side)."""

    num_classes: int = 5
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.2         # object's longer side, fraction of the image's shorter side
    max_size: float = 0.6
    min_width: int = 240
    max_width: int = 480
    min_height: int = 200
    max_height: int = 400
    random_color_prob: float = 0.15   # objects drawn in a random colour: form must decide
    max_covered: float = 0.35     # at most this fraction of an earlier object may be hidden
    jpeg_quality: int = 90

    def check(self) -> None:
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise UserInputError(f"num_classes must be between 1 and {MAX_CLASSES}, got {self.num_classes}",
                                 fields=("num_classes",))
        if not 1 <= self.min_objects <= self.max_objects:
            raise UserInputError(f"objects per image: need 1 <= min_objects ({self.min_objects}) <= max_objects "
                                 f"({self.max_objects})", fields=("min_objects", "max_objects"))
        if not 0.02 <= self.min_size <= self.max_size <= 1.0:
            raise UserInputError(f"object size: need 0.02 <= min_size ({self.min_size}) <= max_size ({self.max_size}) "
                                 "<= 1", fields=("min_size", "max_size"))
        if not (16 <= self.min_width <= self.max_width and 16 <= self.min_height <= self.max_height):
            raise UserInputError("image size range is invalid")


def category_list(num_classes: int) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": SHAPES[i][0], "supercategory": "shape"} for i in range(num_classes)]


# ----------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Two-colour gradient + low-frequency blotches + pixel noise + a few thin lines."""
    c0, c1 = rng.integers(30, 226, size=(2, 3))
    t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height, dtype=np.float32)
    ramp = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    base = np.broadcast_to(ramp[None, :, :], (height, width, 3)) if len(t) == width \
        else np.broadcast_to(ramp[:, None, :], (height, width, 3))
    cells = rng.integers(0, 81, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    blotch_image = Image.fromarray(cells, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    blotch = np.asarray(blotch_image, dtype=np.float32) - 40
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16).astype(np.float32)
    pixels = np.clip(base + blotch + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 5))):
        x0, x1 = rng.integers(0, width, size=2)
        y0, y1 = rng.integers(0, height, size=2)
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 4)))
    return image


def _color(rng: np.random.Generator, hue: float, random_prob: float) -> tuple[int, int, int]:
    if rng.random() < random_prob:
        h = rng.uniform(0, 1)
    else:
        h = (hue / 360.0 + rng.uniform(-0.06, 0.06)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: tuple[float, float, float, float],
                color: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Draw a shape that fills ``box`` (l, t, r, b) so that its tight bounding box is ``box``."""
    l, t, r, b = box
    w, h = r - l, b - t
    cx, cy = (l + r) / 2, (t + b) / 2
    if name == "disc":
        draw.ellipse(box, fill=color)
    elif name == "rectangle":
        draw.rectangle(box, fill=color)
    elif name == "triangle":
        apex = l + w * rng.uniform(0.3, 0.7)
        draw.polygon([(apex, t), (r, b), (l, b)], fill=color)
    elif name == "cross":
        arm = rng.uniform(0.28, 0.4)
        draw.rectangle((cx - w * arm / 2, t, cx + w * arm / 2, b), fill=color)
        draw.rectangle((l, cy - h * arm / 2, r, cy + h * arm / 2), fill=color)
    elif name == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(min(w, h) * rng.uniform(0.14, 0.22))))
    elif name == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((math.cos(angle) * radius, math.sin(angle) * radius))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        sx, sy = w / (max(xs) - min(xs)), h / (max(ys) - min(ys))
        draw.polygon([(l + (x - min(xs)) * sx, t + (y - min(ys)) * sy) for x, y in points], fill=color)
    elif name == "diamond":
        draw.polygon([(cx, t), (r, cy), (cx, b), (l, cy)], fill=color)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(name)


def _covered_fraction(box: np.ndarray, other: np.ndarray) -> float:
    """Fraction of ``other``'s area that ``box`` covers."""
    lt = np.maximum(box[:2], other[:2])
    rb = np.minimum(box[2:], other[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    return inter / float(np.prod(other[2:] - other[:2]))


def render_image(rng: np.random.Generator, config: SynthConfig) -> tuple[Image.Image, list[tuple[list[float], int]]]:
    """One image and its objects as ([x, y, w, h] pixels, category id)."""
    width = int(rng.integers(config.min_width, config.max_width + 1))
    height = int(rng.integers(config.min_height, config.max_height + 1))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[np.ndarray] = []
    objects: list[tuple[list[float], int]] = []
    shorter = min(width, height)
    for _ in range(wanted * 10):
        if len(objects) == wanted:
            break
        label = int(rng.integers(config.num_classes))
        name, hue, (a_lo, a_hi) = SHAPES[label]
        size = rng.uniform(config.min_size, config.max_size) * shorter
        aspect = math.exp(rng.uniform(math.log(a_lo), math.log(a_hi)))
        w, h = (size, size / aspect) if aspect >= 1 else (size * aspect, size)
        w, h = max(8.0, min(w, width - 2.0)), max(8.0, min(h, height - 2.0))
        l = float(rng.uniform(0, width - w))
        t = float(rng.uniform(0, height - h))
        box = np.array([l, t, l + w, t + h])
        if any(_covered_fraction(box, other) > config.max_covered for other in placed):
            continue
        # Integer pixel corners so the drawn shape and its annotation agree exactly.
        li, ti = int(round(l)), int(round(t))
        ri, bi = int(round(l + w)) - 1, int(round(t + h)) - 1
        _draw_shape(draw, name, (li, ti, ri, bi), _color(rng, hue, config.random_color_prob), rng)
        placed.append(box)
        objects.append(([float(li), float(ti), float(ri - li + 1), float(bi - ti + 1)], label + 1))
    return image, objects


# ----------------------------------------------------------------------------- dataset


def _write_split(out_dir: Path, split: str, split_index: int, count: int, seed: int, config: SynthConfig) -> None:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        rng = np.random.default_rng((seed, split_index, index))
        image, objects = render_image(rng, config)
        file_name = f"{index + 1:06d}.jpg"
        with atomic_write(image_dir / file_name) as handle:  # a full disk: one line naming the image
            image.save(handle, "JPEG", quality=config.jpeg_quality)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for (x, y, w, h), category in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    info = {"description": "ssd300 synthetic shapes", "seed": seed, "split": split, "count": count,
            "config": asdict(config)}
    data = {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": category_list(config.num_classes)}
    annotation_dir = out_dir / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    target = annotation_dir / f"instances_{split}.json"
    with atomic_write(target, "w") as handle:  # the json last and atomically: its presence means the split is complete
        handle.write(json.dumps(data))


def _already_written(out_dir: Path, split: str, count: int, seed: int, config: SynthConfig) -> bool:
    target = out_dir / "annotations" / f"instances_{split}.json"
    try:
        info = json.loads(target.read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    same = info.get("seed") == seed and info.get("count") == count and info.get("config") == asdict(config)
    return same and len(list((out_dir / split).glob("*.jpg"))) >= count


def generate_synthetic_dataset(out_dir: PathLike, num_train: int = 2000, num_val: int = 200, seed: int = 0,
                               *, config: SynthConfig | None = None, overwrite: bool = False,
                               **knobs: Any) -> Path:
    """Write ``out_dir/{train,val}/*.jpg`` and ``out_dir/annotations/instances_{train,val}.json``.

    ``knobs`` override :class:`SynthConfig` fields (e.g. ``num_classes=4, max_objects=6``).
    A split that already exists with the same seed, size and knobs is kept (same seed, same bytes).
    Anything else in a non-empty ``out_dir`` (another dataset, other files) is never replaced
    without ``overwrite``: a one-line UserInputError names the folder. Returns ``out_dir``, the
    dataset folder to train on (``TrainConfig.data``).

    A count of 0 is allowed and writes an empty split: its image folder with no images and an
    annotation file with no images or annotations but the categories (a valid COCO file). Training
    refuses an empty train split in one line; ``num_train=0`` suits evaluation only, ``num_val=0``
    training without evaluation (``TrainConfig.evaluation=()``).
    """
    if config is None:
        unknown = set(knobs) - set(SynthConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown synthetic dataset options: {sorted(unknown)}")
        config = SynthConfig(**knobs)
    config.check()
    if num_train < 0 or num_val < 0:
        raise UserInputError(f"image counts must be >= 0, got num_train {num_train}, num_val {num_val}",
                             fields=("num_train", "num_val"))
    out = Path(out_dir).expanduser()
    try:
        check_output_path(out, "out_dir", folder=True)
    except UserInputError as err:
        raise UserInputError(str(err), fields=("out_dir",)) from None
    splits = (("train", num_train), ("val", num_val))
    pending = [(i, split, count) for i, (split, count) in enumerate(splits)
               if not _already_written(out, split, count, seed, config)]
    if pending and not overwrite and out.is_dir() and any(out.iterdir()):
        held = "a different dataset" if (out / "annotations").is_dir() else "other files"
        raise UserInputError(f"out_dir {out} is not empty (it holds {held}); pass overwrite to write the "
                             "synthetic dataset into it anyway, or pick an empty folder",
                             fields=("out_dir", "overwrite"))
    out.mkdir(parents=True, exist_ok=True)
    for split_index, split, count in pending:
        _write_split(out, split, split_index, count, seed, config)
    return out
