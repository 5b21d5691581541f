"""Per-image readers' common parts (VOC, YOLO, LabelMe): the columns a split is read into, image
ids for formats without them, and class-name lists.

A per-image reader collects exact float64 boxes per image into :class:`SplitColumns`;
:meth:`SplitColumns.parsed` lays them out as the one flat index every layout shares
(:class:`ssd300.data.annotations.ParsedAnnotations`), converters use the exact columns as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ssd300.data.annotations import ParsedAnnotations
from ssd300.errors import UserInputError, one_line


@dataclass
class SplitColumns:
    """A split read by a per-image reader (VOC, YOLO): per-image columns and exact float64 boxes.

    ``boxes`` (B, 4) ltrb pixels as the files say (unclipped), grouped by image: image ``r`` owns the
    next ``box_counts[r]``. :meth:`parsed` lays it out as the flat index; converters use it as is.
    """

    categories: tuple[tuple[int, str], ...]
    image_ids: np.ndarray        # (N,) int64
    file_names: list[str]        # relative to the split's image folder
    sizes: np.ndarray            # (N, 2) int64 (width, height)
    box_counts: np.ndarray       # (N,) int64
    boxes: np.ndarray            # (B, 4) float64 ltrb
    category_ids: np.ndarray     # (B,) int64
    difficult: Optional[np.ndarray] = None  # (B,) bool, VOC only

    def parsed(self) -> ParsedAnnotations:
        encoded = [name.encode("utf-8", "surrogatepass") for name in self.file_names]
        name_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=name_offsets[1:])
        sizes = np.asarray(self.sizes, dtype=np.int64).reshape(-1, 2)
        counts = np.asarray(self.box_counts, dtype=np.int64)
        box_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=box_offsets[1:])
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4).copy()
        box_sizes = np.repeat(sizes, counts, axis=0).astype(np.float32)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, box_sizes[:, :1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, box_sizes[:, 1:])
        category_ids = np.asarray(self.category_ids, dtype=np.int64)
        unique, first = np.unique(category_ids, return_index=True)
        return ParsedAnnotations(
            categories=tuple((int(c), str(n)) for c, n in self.categories),
            image_ids=np.asarray(self.image_ids, dtype=np.int64), sizes=sizes, name_offsets=name_offsets,
            name_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8), box_offsets=box_offsets, boxes=boxes,
            category_ids=category_ids, category_order=unique[np.argsort(first)],
            num_annotations=len(category_ids), num_crowd=0,
            difficult=None if self.difficult is None else np.asarray(self.difficult, dtype=bool))

    @classmethod
    def from_parsed(cls, parsed: ParsedAnnotations) -> "SplitColumns":
        offsets = parsed.name_offsets.tolist()
        raw = parsed.name_bytes.tobytes()
        names = [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:])]
        return cls(parsed.categories, parsed.image_ids, names, parsed.sizes, np.diff(parsed.box_offsets),
                   parsed.boxes.astype(np.float64), parsed.category_ids, parsed.difficult)


def image_ids_of(file_names: Sequence[str]) -> np.ndarray:
    """Image ids for a format without them: the file stems when all are distinct whole numbers
    (COCO's ``000000397133.jpg`` -> 397133, so ids survive a round trip), else 1..N in order."""
    stems = [Path(name).stem for name in file_names]
    if stems and all(s.isdigit() and len(s) < 18 for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return np.asarray(ids, dtype=np.int64)
    return np.arange(1, len(stems) + 1, dtype=np.int64)


def read_class_list(path: Path) -> list[str]:
    """Class names one per line (``classes.txt``, ``labels.txt``; datumaro's ``labelmap.txt``:
    ``name:colour:parts:actions`` lines, ``#`` comments); blank lines skipped, duplicates refused."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not a readable class list ({one_line(err)})") from None
    names: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name = line.split(":")[0].strip() if path.name == "labelmap.txt" else line.strip()
        if name in names:
            raise UserInputError(f"{path}:{number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise UserInputError(f"{path}: lists no classes")
    return names
