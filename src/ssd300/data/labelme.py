"""LabelMe json files (one per image: ``shapes`` with ``label``, ``points``, ``shape_type``;
``imagePath``, ``imageWidth``, ``imageHeight``) -> split columns, for ``ssd300 convert``.

Rectangles keep their two corners exactly; polygons become their bounding boxes; circles (centre +
a point on the circle) their bounding squares; other shapes (line, point, linestrip, mask) are
skipped and counted. Classes in order of first appearance over the sorted files (ids 1..K).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ssd300.data.split_columns import SplitColumns, image_ids_of
from ssd300.errors import UserInputError, one_line


def _box(shape: dict[str, Any]) -> list[float] | None:
    points = np.asarray(shape["points"], dtype=np.float64).reshape(-1, 2)
    kind = shape.get("shape_type") or "polygon"
    if kind == "rectangle" and len(points) == 2 or kind == "polygon" and len(points) >= 3:
        (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
        return [float(left), float(top), float(right), float(bottom)]
    if kind == "circle" and len(points) == 2:
        (cx, cy), edge = points
        r = math.hypot(edge[0] - cx, edge[1] - cy)
        return [float(cx - r), float(cy - r), float(cx + r), float(cy + r)]
    return None


def read_labelme_folder(folder: Path) -> tuple[SplitColumns, int]:
    """(columns, shapes skipped) of every ``*.json`` in ``folder`` (sorted by name)."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise UserInputError(f"{folder}: no LabelMe .json files")
    names: list[str] = []
    sizes: list[tuple[int, int]] = []
    counts: list[int] = []
    boxes: list[list[float]] = []
    labels: list[str] = []
    classes: dict[str, int] = {}
    skipped = 0
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            image_path = str(data["imagePath"]).replace("\\", "/")
            size = (int(data["imageWidth"]), int(data["imageHeight"]))
            shapes = data.get("shapes") or []
            found = []
            for k, shape in enumerate(shapes):
                try:
                    box = _box(shape)
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"shapes[{k}]: {one_line(err)}") from None
                if box is None:
                    skipped += 1
                    continue
                if not all(math.isfinite(v) for v in box):
                    raise ValueError(f"shapes[{k}]: points must be finite numbers")
                found.append((str(shape["label"]), box))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserInputError(f"{path}: not a LabelMe annotation ({one_line(err)})") from None
        if size[0] <= 0 or size[1] <= 0:
            raise UserInputError(f"{path}: imageWidth and imageHeight must be positive, got {size}")
        names.append(image_path)
        sizes.append(size)
        counts.append(len(found))
        for label, box in found:
            classes.setdefault(label, len(classes) + 1)
            labels.append(label)
            boxes.append(box)
    columns = SplitColumns(
        categories=tuple((cid, name) for name, cid in classes.items()), image_ids=image_ids_of(names),
        file_names=names, sizes=np.asarray(sizes, dtype=np.int64), box_counts=np.asarray(counts, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        category_ids=np.asarray([classes[n] for n in labels], dtype=np.int64))
    return columns, skipped
