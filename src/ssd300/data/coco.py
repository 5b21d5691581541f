"""COCO-format detection datasets (COCO 2017 and custom data): validation, label map, samples.

An annotation file is validated completely before anything else happens, and the first bad
entry is reported in one line naming the file. At run time a missing or undecodable image is
logged with its path and skipped (counted in the batch), or fatal with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from PIL import Image

from ssd300.data.images import DECODE_ERRORS, draft_for_crop, exif_orientation, open_image
from ssd300.data.transforms import INPUT_SIZE, EvalTransform, TrainTransform
from ssd300.errors import UserInputError, one_line
from ssd300.labels import LabelMap, is_background_category

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- layout


def resolve_split(data_root: PathLike, split: str) -> tuple[Path, Path]:
    """``--data`` folder + split ("train" or "val") -> (image_dir, annotation_file).

    Understands the COCO 2017 layout (``train2017/``, ``annotations/instances_train2017.json``)
    and the synthetic/custom layout (``train/``, ``annotations/instances_train.json``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UserInputError(f"--data {root}: dataset folder does not exist")
    candidates = [(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
                  (root / split, root / "annotations" / f"instances_{split}.json")]
    for image_dir, annotation_file in candidates:
        if annotation_file.is_file():
            if not image_dir.is_dir():
                raise UserInputError(f"--data {root}: found {annotation_file} but no image folder {image_dir}")
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in image_dir.iterdir()):
                raise UserInputError(f"--data {root}: image folder {image_dir} has no images")
            return image_dir, annotation_file
    expected = " or ".join(str(a.relative_to(root)) for _, a in candidates)
    raise UserInputError(f"--data {root}: no annotation file for split {split!r} (expected {expected})")


# ----------------------------------------------------------------------------- reading and validation


@dataclass(frozen=True)
class ImageRecord:
    """One image and its training targets (pixel ltrb boxes, contiguous labels): a view built on
    demand from :class:`AnnotationIndex` (the dataset holds no per-image objects)."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray      # (M, 4) float32 ltrb pixels, clipped to the image, crowd excluded
    labels: np.ndarray     # (M,) int64 in 1..K


@dataclass
class DatasetStats:
    """Counts of what was left out while reading the annotation file (reported once)."""

    images: int = 0
    annotations: int = 0
    images_without_boxes: int = 0      # skipped for training
    crowd_boxes: int = 0               # excluded from training targets
    small_boxes: int = 0               # under 1 pixel wide or high after clipping
    background_boxes: int = 0          # of a background category (see labels.is_background_category)

    def summary(self) -> str:
        background = f"{self.background_boxes} background-category boxes, " if self.background_boxes else ""
        return (f"{self.images} images, {self.annotations} annotations; left out: "
                f"{self.crowd_boxes} crowd boxes, {background}{self.small_boxes} boxes under 1 px, "
                f"{self.images_without_boxes} images without usable boxes")


# The keys of a COCO instances json that training and validation use. Parsing keeps only these
# in every object, so segmentations, areas, urls... are freed as soon as each object is parsed:
# on a train2017-sized file the peak drops from ~2.2 GB to ~1.3 GB and parsing gets faster.
# (orjson has no such hook: it builds every object, and peaked higher than json here.)
_USED_KEYS = frozenset({"images", "annotations", "categories", "id", "name", "file_name", "width", "height",
                        "image_id", "category_id", "bbox", "iscrowd"})


def _keep_used_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value for key, value in pairs if key in _USED_KEYS}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def read_annotation_file(path: PathLike) -> dict[str, Any]:
    """Load and validate a COCO instances json; raise UserInputError at the first bad entry.

    The returned dict holds only the keys this package uses (``images``: id, file_name, width,
    height; ``annotations``: id, image_id, category_id, bbox, iscrowd; ``categories``: id, name).
    """
    data = _parse_json(Path(path))
    validate_annotations(data, path)
    return data


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserInputError(f"{path}: annotation file does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None


def _parse_json(path: Path) -> Any:
    return _parse_text(path, _decode(path, _read_bytes(path)))


def _decode(path: Path, raw: bytes) -> str:
    """json.load's own decoding (UTF-8/16/32, BOM), done apart so the bytes can go before parsing."""
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None


def _parse_text(path: Path, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_keep_used_keys)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None


def validate_annotations(data: Any, path: PathLike) -> None:
    """Check keys, types, sizes and cross-references of a COCO instances dict."""
    _validated_columns(data, path)


_MISSING = object()


@dataclass
class _Columns:
    """The used fields of a validated file, one list/array per field."""

    image_ids: list[Any]
    file_names: list[Any]
    widths: np.ndarray            # float64
    heights: np.ndarray
    ann_image_ids: list[Any]
    ann_category_ids: list[Any]
    bboxes: np.ndarray            # (M, 4) float64 xywh
    crowd: np.ndarray             # (M,) bool


def _types(values: list[Any]) -> set[type]:
    return set(map(type, values))


def _extract_columns(data: dict[str, Any]) -> _Columns:
    """Column-wise extraction; raises (anything) on entries a valid file cannot have."""
    images, annotations = data["images"], data["annotations"]
    if not _types(images) <= {dict} or not _types(annotations) <= {dict}:
        raise TypeError("an entry is not an object")
    bboxes = [a.get("bbox", _MISSING) for a in annotations]
    if not _types(bboxes) <= {list} or not set(map(len, bboxes)) <= {4} or \
            not _types(list(itertools.chain.from_iterable(bboxes))) <= {int, float}:
        raise TypeError("a bbox is not 4 numbers")
    return _Columns(
        image_ids=[img.get("id", _MISSING) for img in images],
        file_names=[img.get("file_name", _MISSING) for img in images],
        widths=np.array([img.get("width", _MISSING) for img in images], dtype=np.float64),
        heights=np.array([img.get("height", _MISSING) for img in images], dtype=np.float64),
        ann_image_ids=[a.get("image_id", _MISSING) for a in annotations],
        ann_category_ids=[a.get("category_id", _MISSING) for a in annotations],
        bboxes=np.array(bboxes, dtype=np.float64).reshape(-1, 4),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool),
    )


def _columns_certainly_valid(columns: _Columns, data: dict[str, Any], category_ids: set[int]) -> bool:
    """The per-entry checks below, column-wise: True only when every entry passes them."""
    ids = columns.image_ids
    if not _types(ids) <= {int} or len(set(ids)) != len(ids):
        return False
    if not _types(columns.file_names) <= {str} or not all(columns.file_names):
        return False
    if not all(_types([img[k] for img in data["images"]]) <= {int, float} for k in ("width", "height")):
        return False
    sizes = np.concatenate([columns.widths, columns.heights])
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        return False
    try:
        if not (set(ids).issuperset(columns.ann_image_ids) and category_ids.issuperset(columns.ann_category_ids)):
            return False
    except TypeError:  # an unhashable id: the per-entry check reports it as today
        return False
    boxes = columns.bboxes
    return bool(np.isfinite(boxes).all() and (boxes[:, 2:] >= 0).all())


def _validated_columns(data: Any, path: PathLike) -> _Columns:
    """Validate (fast, column-wise; entry by entry when that finds a problem, to name the first
    bad entry) and return the used fields as columns."""
    def fail(message: str) -> UserInputError:
        return UserInputError(f"{path}: {message}")

    if not isinstance(data, dict):
        raise fail("top level must be a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise fail(f"missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise fail(f"'{key}' must be a list")
    if not data["categories"]:
        raise fail("'categories' is empty")
    category_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        where = _describe("categories", i, cat)
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise fail(f"{where}: needs 'id' and 'name'")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise fail(f"{where}: 'id' must be an integer")
        if cat["id"] in category_ids:
            raise fail(f"{where}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])
    try:
        columns: Optional[_Columns] = _extract_columns(data)
    except (TypeError, ValueError, AttributeError, OverflowError):
        columns = None
    if columns is not None and _columns_certainly_valid(columns, data, category_ids):
        return columns
    _check_entries(data, fail, category_ids)  # raises at the first bad entry
    return _extract_columns(data)


def _check_entries(data: dict[str, Any], fail: Callable[[str], UserInputError], category_ids: set[int]) -> None:
    """Entry by entry, in file order: the first problem raises, naming the entry."""
    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        where = _describe("images", i, img)
        if not isinstance(img, dict):
            raise fail(f"{where}: must be an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise fail(f"{where}: missing key '{key}'")
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise fail(f"{where}: 'id' must be an integer")
        if img["id"] in image_ids:
            raise fail(f"{where}: duplicate image id {img['id']}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise fail(f"{where}: 'file_name' must be a non-empty string")
        for key in ("width", "height"):
            if not _is_number(img[key]) or img[key] <= 0:
                raise fail(f"{where}: '{key}' must be a positive number, got {img[key]!r}")
        image_ids.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        where = _describe("annotations", i, ann)
        if not isinstance(ann, dict):
            raise fail(f"{where}: must be an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise fail(f"{where}: missing key '{key}'")
        if ann["image_id"] not in image_ids:
            raise fail(f"{where}: refers to unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in category_ids:
            raise fail(f"{where}: refers to unknown category_id {ann['category_id']!r}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise fail(f"{where}: 'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise fail(f"{where}: 'bbox' has a negative width or height: {bbox!r}")


def background_categories(categories: Sequence[tuple[int, str]]) -> dict[int, str]:
    """{id: name} of the categories that mean background (id 0, "background", labelme's "_background_")."""
    return {int(cid): str(name) for cid, name in categories if is_background_category(cid, name)}


def label_map_from_categories(categories: Sequence[tuple[int, str]], path: PathLike = "annotation file") -> LabelMap:
    """Labels 1..K in the file's category order (COCO's own order for COCO 2017); background
    categories (:func:`background_categories`) are the background, not object classes."""
    background = background_categories(categories)
    objects = [(int(cid), str(name)) for cid, name in categories if int(cid) not in background]
    if not objects:
        raise UserInputError(f"{path}: no object categories (every category is background: "
                             f"{', '.join(repr(n) for n in background.values())})")
    return LabelMap.from_categories(objects)


def label_map_from_annotations(data: dict[str, Any], path: PathLike = "annotation file") -> LabelMap:
    """:func:`label_map_from_categories` of a COCO instances dict."""
    return label_map_from_categories([(int(c["id"]), str(c["name"])) for c in data["categories"]], path)


# ----------------------------------------------------------------------------- the flat index


@dataclass(frozen=True)
class ParsedAnnotations:
    """A validated file in flat arrays, before the label map and the skips are applied.

    ``boxes``/``category_ids`` hold every non-crowd annotation, grouped by image in the file's
    image order (file order within an image): image ``r``'s are ``box_offsets[r]:box_offsets[r + 1]``.
    Boxes are ltrb pixels (float32) clipped to the image. ``category_order`` lists the category ids
    of non-crowd annotations in order of first appearance (to name the first unknown one).
    """

    categories: tuple[tuple[int, str], ...]
    image_ids: np.ndarray        # (N,) int64
    sizes: np.ndarray            # (N, 2) int64 (width, height), rounded to whole pixels
    name_offsets: np.ndarray     # (N + 1,) int64 into name_bytes
    name_bytes: np.ndarray       # uint8, every file name in UTF-8, back to back
    box_offsets: np.ndarray      # (N + 1,) int64
    boxes: np.ndarray            # (B, 4) float32
    category_ids: np.ndarray     # (B,) int64
    category_order: np.ndarray   # (C',) int64
    num_annotations: int
    num_crowd: int


def parse_annotations(data: dict[str, Any], path: PathLike) -> ParsedAnnotations:
    """Validate ``data`` (see :func:`validate_annotations`) and lay it out in flat arrays."""
    columns = _validated_columns(data, path)
    try:
        image_ids = np.asarray(columns.image_ids, dtype=np.int64)
        ann_image_ids = np.asarray(columns.ann_image_ids, dtype=np.int64)
        ann_category_ids = np.asarray(columns.ann_category_ids, dtype=np.int64)
    except OverflowError:
        raise UserInputError(f"{path}: image and category ids must fit in 64 bits") from None
    # round() per value as before (half to even, like np.rint)
    sizes = np.stack([np.rint(columns.widths), np.rint(columns.heights)], axis=1).astype(np.int64)
    encoded = [name.encode("utf-8", "surrogatepass") for name in columns.file_names]
    name_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=name_offsets[1:])
    name_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    del encoded

    keep = ~columns.crowd
    order = np.argsort(image_ids, kind="stable")
    row_of_box = order[np.searchsorted(image_ids[order], ann_image_ids[keep])]
    grouped = np.argsort(row_of_box, kind="stable")       # by image row, file order within an image
    xywh = columns.bboxes[keep][grouped]
    ltrb = xywh.copy()
    ltrb[:, 2:] += xywh[:, :2]                             # x + w in float64, as Python floats do
    boxes = ltrb.astype(np.float32)
    counts = np.bincount(row_of_box, minlength=len(image_ids))
    box_sizes = np.repeat(sizes, counts, axis=0).astype(np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, box_sizes[:, :1])
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, box_sizes[:, 1:])
    box_offsets = np.zeros(len(image_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=box_offsets[1:])
    kept_categories = ann_category_ids[keep]
    unique, first = np.unique(kept_categories, return_index=True)
    return ParsedAnnotations(
        categories=tuple((int(c["id"]), str(c["name"])) for c in data["categories"]),
        image_ids=image_ids, sizes=sizes, name_offsets=name_offsets, name_bytes=name_bytes,
        box_offsets=box_offsets, boxes=boxes, category_ids=kept_categories[grouped],
        category_order=unique[np.argsort(first)], num_annotations=len(columns.ann_image_ids),
        num_crowd=int(columns.crowd.sum()))


@dataclass(frozen=True)
class AnnotationIndex:
    """A dataset's images and targets in a few flat arrays.

    A DataLoader worker forked from the main process reads these arrays without writing to them,
    so its pages stay shared (copy-on-write): with one Python object per image, reference counting
    alone made every worker copy the whole record set over an epoch.
    Dataset position ``i`` is image row ``rows[i]``; that image's usable boxes/labels are
    ``box_offsets[row]:box_offsets[row + 1]``.
    """

    image_ids: np.ndarray        # (N,) int64, every image of the file
    sizes: np.ndarray            # (N, 2) int64 (width, height)
    name_offsets: np.ndarray     # (N + 1,) int64
    name_bytes: np.ndarray       # uint8
    box_offsets: np.ndarray      # (N + 1,) int64
    boxes: np.ndarray            # (B, 4) float32 ltrb pixels (crowd and boxes under 1 px left out)
    labels: np.ndarray           # (B,) int64 in 1..K
    rows: np.ndarray             # (L,) int64 dataset position -> image row

    def __len__(self) -> int:
        return len(self.rows)

    def image_id(self, index: int) -> int:
        return int(self.image_ids[self.rows[index]])

    def size(self, index: int) -> tuple[int, int]:
        width, height = self.sizes[self.rows[index]]
        return int(width), int(height)

    def file_name(self, index: int) -> str:
        row = self.rows[index]
        start, end = self.name_offsets[row], self.name_offsets[row + 1]
        return self.name_bytes[start:end].tobytes().decode("utf-8", "surrogatepass")

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (M, 4) float32 ltrb pixels, labels (M,) int64): read-only views."""
        row = self.rows[index]
        start, end = self.box_offsets[row], self.box_offsets[row + 1]
        return self.boxes[start:end], self.labels[start:end]

    def record(self, index: int) -> ImageRecord:
        boxes, labels = self.targets(index)
        width, height = self.size(index)
        return ImageRecord(self.image_id(index), self.file_name(index), width, height, boxes.copy(), labels.copy())


def build_index(parsed: ParsedAnnotations, label_map: LabelMap, *, skip_empty: bool,
                stats: DatasetStats) -> AnnotationIndex:
    """Map categories to labels, drop boxes of background categories and under 1 px, and
    (``skip_empty``) images left without boxes."""
    to_label = label_map.category_id_to_label()
    background = background_categories(parsed.categories)
    for category_id in parsed.category_order.tolist():
        if category_id not in to_label and category_id not in background:
            raise UserInputError(f"category id {category_id} is not in the model's label map")
    num_images = len(parsed.image_ids)
    boxes = parsed.boxes
    is_background = np.isin(parsed.category_ids, np.array(sorted(background), dtype=np.int64))
    big_enough = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    usable = big_enough & ~is_background
    stats.background_boxes += int(is_background.sum())
    row_of_box = np.repeat(np.arange(num_images), np.diff(parsed.box_offsets))
    counts = np.bincount(row_of_box[usable], minlength=num_images)
    empty = counts == 0
    stats.images += num_images
    stats.annotations += parsed.num_annotations
    stats.crowd_boxes += parsed.num_crowd
    stats.small_boxes += int((~big_enough & ~is_background).sum())
    stats.images_without_boxes += int(empty.sum())
    known = np.array(sorted(to_label), dtype=np.int64)
    label_of = np.array([to_label[c] for c in known.tolist()], dtype=np.int64)
    box_offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=box_offsets[1:])
    rows = np.flatnonzero(~empty) if skip_empty else np.arange(num_images)
    fields = dict(image_ids=parsed.image_ids, sizes=parsed.sizes, name_offsets=parsed.name_offsets,
                  name_bytes=parsed.name_bytes, box_offsets=box_offsets, boxes=np.ascontiguousarray(boxes[usable]),
                  labels=label_of[np.searchsorted(known, parsed.category_ids[usable])], rows=rows.astype(np.int64))
    return AnnotationIndex(**{name: _read_only(array) for name, array in fields.items()})


# ----------------------------------------------------------------------------- the index cache

CACHE_FORMAT = 1                      # bump whenever parse_annotations' output changes
CACHE_MIN_BYTES = 16 * 2**20          # smaller files parse faster than the cache would load
_ARRAY_FIELDS = ("image_ids", "sizes", "name_offsets", "name_bytes", "box_offsets", "boxes", "category_ids",
                 "category_order")


def default_cache_dir() -> Path:
    """``$SSD300_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssd300/annotation-index`` (``~/.cache/...``)."""
    if os.environ.get("SSD300_CACHE_DIR"):
        return Path(os.environ["SSD300_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "ssd300" / "annotation-index"


def load_annotations(path: PathLike, cache_dir: Union[PathLike, None, str] = "auto") -> ParsedAnnotations:
    """Read, validate and index a COCO instances json (UserInputError at the first bad entry).

    Files of ``CACHE_MIN_BYTES`` or more are cached as their index (an .npz of ~30 MB for
    train2017) in ``cache_dir`` ("auto": :func:`default_cache_dir`; ``None``: no cache), named by
    the file's content hash: a later load of the same content skips parsing and validation, and
    any change of content is a different entry, so a stale index is never used. Nothing is
    written next to the annotation file; an unwritable cache folder only means no caching.
    """
    path = Path(path)
    raw = _read_bytes(path)
    size, entry, digest = len(raw), None, ""
    if cache_dir is not None and size >= CACHE_MIN_BYTES:
        folder = default_cache_dir() if cache_dir == "auto" else Path(cache_dir)
        digest = hashlib.blake2b(raw, digest_size=20).hexdigest()
        entry = folder / f"{digest}.v{CACHE_FORMAT}.npz"
        cached = _load_cached(entry, digest, size)
        if cached is not None:
            log.info("%s: index read from the cache %s", path, entry)
            return cached
    # Each stage's input is dropped as soon as the next exists (bytes -> text -> objects -> arrays):
    # with all of them alive the peak would be ~0.5 GB higher on train2017.
    text = _decode(path, raw)
    del raw
    data = _parse_text(path, text)
    del text
    parsed = parse_annotations(data, path)
    del data
    if entry is not None:
        _store_cached(parsed, entry, digest, size)
    return parsed


def _load_cached(entry: Path, digest: str, size: int) -> Optional[ParsedAnnotations]:
    try:
        with np.load(entry, allow_pickle=False) as saved:
            meta = json.loads(saved["meta"].tobytes().decode("utf-8"))
            if (meta.get("format"), meta.get("digest"), meta.get("size")) != (CACHE_FORMAT, digest, size):
                return None
            arrays = {name: saved[name] for name in _ARRAY_FIELDS}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as err:
        # a truncated or foreign file: parse again (and replace it)
        log.warning("ignoring unreadable annotation index cache %s (%s)", entry, one_line(err))
        return None
    return ParsedAnnotations(categories=tuple((int(c), str(n)) for c, n in meta["categories"]),
                             num_annotations=int(meta["num_annotations"]), num_crowd=int(meta["num_crowd"]),
                             **arrays)


def _store_cached(parsed: ParsedAnnotations, entry: Path, digest: str, size: int) -> None:
    """Write atomically (temp file + rename in the cache folder); any OSError: no cache, said once."""
    meta = {"format": CACHE_FORMAT, "digest": digest, "size": size, "categories": list(parsed.categories),
            "num_annotations": parsed.num_annotations, "num_crowd": parsed.num_crowd}
    tmp: Optional[Path] = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=entry.parent, prefix=entry.name, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                     **{name: getattr(parsed, name) for name in _ARRAY_FIELDS})
        os.replace(tmp, entry)
        tmp = None
    except OSError as err:
        log.info("annotation index not cached in %s (%s)", entry.parent, one_line(err))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


class _RecordView(Sequence[ImageRecord]):
    """``dataset.records[i]``: an :class:`ImageRecord` built from the index when asked for."""

    def __init__(self, index: AnnotationIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._index.record(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._index.record(i)


# ----------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One preprocessed image. ``image`` is uint8 (3, 300, 300); boxes normalised ltrb."""

    image: torch.Tensor
    boxes: torch.Tensor        # (K, 4) float32
    labels: torch.Tensor       # (K,) int64
    image_id: int
    image_size: tuple[int, int]  # (width, height) of the original image
    is_padding: bool = False   # a distributed sampler's duplicate (evaluation drops it)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images that failed


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format dataset: an images folder + an instances json.

    ``train=True``: SSD augmentation, images without usable boxes skipped; ``train=False``:
    :class:`EvalTransform` (resize only), every image kept. Index with an int, or with
    ``(index, epoch)`` as our samplers do: each sample's randomness comes from
    ``(seed, epoch, index)``, so results do not depend on the number of workers or ranks.
    A missing/undecodable image is logged and reported in ``Sample.skipped``; in training the
    next image takes its place, in evaluation ``__getitem__`` returns ``None`` (the collate drops
    it). ``strict=True`` raises UserInputError instead. ``cache_dir``: where a big annotation
    file's index is cached (see :func:`load_annotations`; ``None`` disables it).
    """

    def __init__(self, image_dir: PathLike, annotation_file: PathLike, *, train: bool,
                 label_map: Optional[LabelMap] = None, seed: int = 0, strict: bool = False,
                 transform: Optional[Callable[..., Any]] = None,
                 cache_dir: Union[PathLike, None, str] = "auto") -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise UserInputError(f"{self.image_dir}: image folder does not exist")
        parsed = load_annotations(self.annotation_file, cache_dir=cache_dir)
        self.label_map = label_map if label_map is not None else label_map_from_categories(parsed.categories,
                                                                                            self.annotation_file)
        self.train = train
        self.seed = int(seed)
        self.strict = strict
        self.stats = DatasetStats()
        self.index = build_index(parsed, self.label_map, skip_empty=train, stats=self.stats)
        for cid, name in background_categories(parsed.categories).items():
            log.warning("%s: category %d %r is treated as the background, not as an object class "
                        "(%d of its annotations dropped)", self.annotation_file, cid, name, self.stats.background_boxes)
        del parsed
        if len(self.index) == 0:
            raise UserInputError(f"{self.annotation_file}: no images with usable boxes" if train
                                 else f"{self.annotation_file}: no images")
        self._check_images_present()
        self.transform: Any = transform if transform is not None else (TrainTransform() if train else EvalTransform())
        left_out = (self.stats.crowd_boxes + self.stats.small_boxes + self.stats.images_without_boxes
                    + self.stats.background_boxes)
        (log.warning if left_out else log.info)("%s: %s", self.annotation_file, self.stats.summary())

    @property
    def records(self) -> Sequence[ImageRecord]:
        """Per-image view of :attr:`index` (each item built when asked for)."""
        return _RecordView(self.index)

    def _check_images_present(self) -> None:
        """A wrong image folder fails now, not as thousands of skips: the first files must exist."""
        probe = [self.index.file_name(i) for i in range(min(5, len(self.index)))]
        if not any((self.image_dir / name).is_file() for name in probe):
            raise UserInputError(f"{self.image_dir}: none of the images listed in {self.annotation_file.name} "
                                 f"is there (e.g. {probe[0]})")

    @classmethod
    def from_root(cls, data_root: PathLike, split: str, **kwargs: Any) -> "CocoDetection":
        image_dir, annotation_file = resolve_split(data_root, split)
        kwargs.setdefault("train", split == "train")
        return cls(image_dir, annotation_file, **kwargs)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_ids(self) -> list[int]:
        return self.index.image_ids[self.index.rows].tolist()

    def path_of(self, index: int) -> Path:
        return self.image_dir / self.index.file_name(index)

    def sample_rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, index))

    def __getitem__(self, key: Union[int, tuple[int, int], tuple[int, int, bool]]) -> Optional[Sample]:
        index, epoch, is_padding = _unpack_key(key)
        skipped: list[str] = []
        # In training a broken image is replaced by the next ones (bounded, so a folder of broken
        # files still ends with an error instead of spinning).
        attempts = min(len(self.index), 16) if self.train else 1
        for offset in range(attempts):
            i = (index + offset) % len(self.index)
            try:
                sample = self._load(i, epoch)
            except DECODE_ERRORS as err:  # ImageSizeMismatch included (a ValueError)
                mismatch = isinstance(err, ImageSizeMismatch)
                reason = f"{self.path_of(i)}: {err if mismatch else one_line(err, limit=200)}"
                if self.strict:
                    why = "--strict-images" if mismatch else "image is missing or cannot be decoded"
                    raise UserInputError(f"{reason} ({why})") from None
                log.warning("skipping image %s", reason)
                skipped.append(reason)
                continue
            sample.skipped = skipped
            sample.is_padding = is_padding
            return sample
        if self.train:
            raise UserInputError(f"{self.image_dir}: {attempts} images in a row could not be read, e.g. {skipped[-1]}")
        return _SkippedSample(skipped)  # type: ignore[return-value]

    def _load(self, index: int, epoch: int) -> Sample:
        image = open_image(self.path_of(index))
        width, height = self.index.size(index)
        check_image_size(image, width, height)  # before any draft changes image.size
        pixel_boxes, labels = self.index.targets(index)
        boxes = pixel_boxes / np.array([width, height] * 2, dtype=np.float32)
        image_id = self.index.image_id(index)
        if self.train:
            pixels, boxes, labels = self.transform(image, boxes, labels, self.sample_rng(index, epoch))
            return Sample(pixels, torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                          torch.from_numpy(np.array(labels, dtype=np.int64)), image_id, (width, height))
        # Same as inference: a big JPEG is decoded at the smallest DCT scale still >= 300 px.
        draft_for_crop(image, (1.0, 1.0), INPUT_SIZE)
        pixels = self.transform.resize_uint8(image)
        return Sample(pixels, torch.from_numpy(boxes), torch.from_numpy(labels.copy()), image_id, (width, height))


SIZE_MISMATCH = "not the size the annotation file gives"


class ImageSizeMismatch(ValueError):
    """The decoded image is not ``width`` x ``height`` of the json: its boxes would be misaligned."""


def check_image_size(image: Image.Image, width: int, height: int) -> None:
    """Raise :class:`ImageSizeMismatch` unless ``image`` (opened, header read) is ``width`` x ``height``.

    The pixels are used as stored (COCO's convention: no EXIF rotation), so a phone photo whose
    EXIF orientation tag rotates it by 90/270 degrees and whose json gives the displayed (swapped)
    size was labelled on the rotated picture: its boxes do not fit the stored pixels.
    """
    if image.size == (width, height):
        return
    message = f"decoded size {image.width}x{image.height} is {SIZE_MISMATCH} ({width}x{height})"
    orientation = exif_orientation(image)
    if orientation in (5, 6, 7, 8) and image.size == (height, width):
        message += (f"; its EXIF orientation {orientation} rotates it by 90/270 degrees, so it was labelled "
                    "as displayed: store the pixels rotated (e.g. PIL.ImageOps.exif_transpose) or fix the json")
    raise ImageSizeMismatch(message)


def skipped_summary(reasons: list[str]) -> str:
    """One line for the epoch/evaluation summary: how many images were skipped, how many of them
    for a size that contradicts the json, and the first reason."""
    mismatched = sum(SIZE_MISMATCH in r for r in reasons)
    detail = f" ({mismatched} {SIZE_MISMATCH})" if mismatched else ""
    return f"{len(reasons)} images skipped{detail}, e.g. {reasons[0]}"


class _SkippedSample(list):
    """Marker for an evaluation image that failed: the collate counts it and drops it."""


def _unpack_key(key: Any) -> tuple[int, int, bool]:
    if isinstance(key, tuple):
        if len(key) == 3:
            return int(key[0]), int(key[1]), bool(key[2])
        return int(key[0]), int(key[1]), False
    return int(key), 0, False

