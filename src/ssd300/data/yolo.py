"""YOLO layout: ``images/<split>/`` + ``labels/<split>/<stem>.txt`` (or Roboflow's ``<split>/images``,
``<split>/labels``), one ``class cx cy w h`` line per box, normalised to the image size.

Class names: ``data.yaml``'s ``names`` (a list, or a dict {index: name} with indices 0..K-1), else
``classes.txt`` (one per line), in the dataset folder; class index ``k`` is category id ``k + 1``.
Image sizes come from the image headers (pixels as stored; EXIF orientation is not applied). An image
without a label file has no boxes. Image ids: the file stems when all are whole numbers, else 1..N in
file-name order.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ssd300.data.split_columns import SplitColumns, image_ids_of, read_class_list
from ssd300.data.images import is_image_file
from ssd300.errors import UserInputError, one_line

NORMALISED_TOLERANCE = 1e-3  # cx, cy, w, h outside [0, 1] by more than this: not normalised


def images_dir_of(labels_dir: Path) -> Path:
    """``.../labels/<split>`` -> ``.../images/<split>``; ``<split>/labels`` -> ``<split>/images``."""
    parts = list(labels_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            return Path(*parts)
    raise UserInputError(f"{labels_dir}: a YOLO labels folder must be named labels/<split> or <split>/labels")


def read_yolo_names(root: Path) -> tuple[Path, list[str]]:
    """(the file, class names) from ``root/data.yaml`` or ``root/classes.txt``."""
    yaml_file = root / "data.yaml"
    if yaml_file.is_file():
        import yaml

        try:
            data: Any = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise UserInputError(f"{yaml_file}: not readable YAML ({one_line(err)})") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise UserInputError(f"{yaml_file}: 'names' keys must be the class indices 0..{len(names) - 1}, "
                                     f"got {sorted(names, key=str)}")
            names = [names[k] for k in range(len(names))]
        if not isinstance(names, list) or not names:
            raise UserInputError(f"{yaml_file}: needs 'names': a list of class names or a dict {{index: name}}")
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise UserInputError(f"{yaml_file}: 'names' lists a class twice")
        if isinstance(data.get("nc"), int) and data["nc"] != len(names):
            raise UserInputError(f"{yaml_file}: 'nc' is {data['nc']} but 'names' has {len(names)} classes")
        return yaml_file, names
    classes = root / "classes.txt"
    if classes.is_file():
        return classes, read_class_list(classes)
    raise UserInputError(f"{root}: a YOLO dataset needs data.yaml ('names') or classes.txt to name its classes")


def _parse_label_file(path: Path, text: str, num_classes: int, names_file: Path) -> list[list[float]]:
    """Lines ``class cx cy w h`` -> [[class, cx, cy, w, h], ...]; the first bad line raises, naming it."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{number}"
        if len(tokens) != 5:
            hint = " (a segmentation label? only boxes are read)" if len(tokens) > 5 else ""
            raise UserInputError(f"{where}: expected 5 values 'class cx cy w h', got {len(tokens)}{hint}")
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise UserInputError(f"{where}: not numbers: {line.strip()!r}") from None
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise UserInputError(f"{where}: class {tokens[0]} is not a class index of {names_file.name} "
                                 f"(0..{num_classes - 1})")
        box = values[1:]
        if not all(math.isfinite(v) for v in box):
            raise UserInputError(f"{where}: coordinates must be finite numbers, got {line.strip()!r}")
        if box[2] < 0 or box[3] < 0:
            raise UserInputError(f"{where}: negative width or height: {line.strip()!r}")
        if not all(-NORMALISED_TOLERANCE <= v <= 1 + NORMALISED_TOLERANCE for v in box):
            raise UserInputError(f"{where}: coordinates must be normalised to [0, 1] by the image size, "
                                 f"got {line.strip()!r}")
        rows.append(values)
    return rows


def read_yolo_split(labels_dir: Path) -> SplitColumns:
    """A YOLO labels folder -> the split's columns (float64 ltrb pixels from the normalised values)."""
    from PIL import Image, UnidentifiedImageError

    labels_dir = Path(labels_dir)
    image_dir = images_dir_of(labels_dir)
    if not image_dir.is_dir():
        raise UserInputError(f"{labels_dir}: no image folder {image_dir} beside it")
    names_file, classes = read_yolo_names(labels_dir.parent.parent)
    images = sorted(entry.name for entry in _scan(image_dir) if is_image_file(entry.name))
    if not images:
        raise UserInputError(f"{image_dir}: has no images")
    sizes = np.zeros((len(images), 2), dtype=np.int64)
    counts = np.zeros(len(images), dtype=np.int64)
    values: list[list[float]] = []
    label_names = {entry.name for entry in _scan(labels_dir)}
    for r, name in enumerate(images):
        try:
            with Image.open(image_dir / name) as opened:
                sizes[r] = opened.size
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise UserInputError(f"{image_dir / name}: the image's size cannot be read ({one_line(err)})") from None
        label = Path(name).stem + ".txt"
        if label not in label_names:
            continue
        path = labels_dir / label
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise UserInputError(f"{path}: not a readable label file ({one_line(err)})") from None
        rows = _parse_label_file(path, text, len(classes), names_file)
        counts[r] = len(rows)
        values.extend(rows)
    table = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    scale = np.repeat(sizes, counts, axis=0).astype(np.float64)
    cx, cy, w, h = (table[:, 1] * scale[:, 0], table[:, 2] * scale[:, 1], table[:, 3] * scale[:, 0],
                    table[:, 4] * scale[:, 1])
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return SplitColumns(categories=tuple((k + 1, n) for k, n in enumerate(classes)), image_ids=image_ids_of(images),
                        file_names=images, sizes=sizes, box_counts=counts, boxes=boxes,
                        category_ids=table[:, 0].astype(np.int64) + 1)


def _scan(folder: Path) -> list[Any]:
    try:
        return [entry for entry in os.scandir(folder) if entry.is_file()]
    except OSError as err:
        raise UserInputError(f"{folder}: cannot be listed ({one_line(err)})") from None
