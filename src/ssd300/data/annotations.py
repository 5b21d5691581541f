"""COCO instances json: reading, validation, the label map of its categories, the flat index
of its images and boxes, and the cache of that index.

An annotation file is validated completely before anything else happens, and the first bad entry
is reported in one line naming the file. :func:`load_annotations` is the entry point: bytes ->
validated :class:`ParsedAnnotations` (flat arrays), cached by content hash for big files.
The dataset (:mod:`ssd300.data.coco`) applies a label map and the skips on top of that.
:func:`read_json` is the one reader of json inputs; :func:`read_ground_truth` is the evaluator's
copy of a file (annotation ids renumbered). Over 500 lines on purpose: reading, validation, the two
parsers (typed and json) and the index share the private column type and checks, which must stay
one definition so that both parsers accept and refuse the same files.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import GenericAlias
from typing import Any, Callable, Optional, Union

import numpy as np

from ssd300.errors import UserInputError, one_line
from ssd300.files import PathLike, atomic_write
from ssd300.files import cache_dir as package_cache_dir
from ssd300.labels import LabelMap, is_background_category

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reading and validation

# The keys of a COCO instances json that training and validation use. Parsing keeps only these
# in every object, so segmentations, areas, urls... are freed as soon as each object is parsed:
# on a train2017-sized file the peak drops from ~2.2 GB to ~1.3 GB and parsing gets faster.
# (orjson has no such hook: it builds every object, and peaked higher than json here.)
_USED_KEYS = frozenset({"images", "annotations", "categories", "id", "name", "file_name", "width", "height",
                        "image_id", "category_id", "bbox", "iscrowd"})


# The evaluator's ground truth also needs each annotation's area (COCO's small/medium/large ranges).
_GROUND_TRUTH_KEYS = _USED_KEYS | {"area"}


def _keeping(keys: frozenset[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {key: value for key, value in pairs if key in keys}

    return keep


_KEEPERS = {keys: _keeping(keys) for keys in (_USED_KEYS, _GROUND_TRUTH_KEYS)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def read_json(path: PathLike, keys: Optional[frozenset[str]] = None) -> Any:
    """The one reader of this package's json inputs (annotation files for the dataset, validation
    and the evaluator's ground truth; results files): bytes, then json's own decoding (UTF-8 with or
    without a BOM, UTF-16/32), then parsing. Errors are one line naming the file (and for malformed
    json the line and column). ``keys``: keep only these keys in every object (the rest is freed as
    soon as each object is parsed)."""
    path = Path(path)
    return _parse_text(path, _decode(path, _read_bytes(path)), keys)


def read_annotation_file(path: PathLike) -> dict[str, Any]:
    """Load and validate a COCO instances json; raise UserInputError at the first bad entry.

    The returned dict holds only the keys this package uses (``images``: id, file_name, width,
    height; ``annotations``: id, image_id, category_id, bbox, iscrowd; ``categories``: id, name).
    Repeated annotation ids are a warning (:func:`warn_repeated_ids`).
    """
    data = read_json(path, _USED_KEYS)
    warn_repeated_ids(path, _validated_columns(data, path).repeated_ids())
    return data


def warn_repeated_ids(path: PathLike, repeated: int) -> None:
    """Repeated annotation ids: said, not refused. Ids only name annotations (training never uses
    them, and the evaluation renumbers them: :func:`read_ground_truth`), and files merged from
    several labelling batches repeat them while every box is right; other COCO tools would keep
    one box per id, hence the warning."""
    if repeated:
        log.warning("%s: %d annotations repeat an annotation id used earlier in the file; every box is kept "
                    "(the evaluation numbers annotations itself), but other COCO tools keep one box per id",
                    path, repeated)


def read_ground_truth(source: Union[PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """The ground truth for the COCO evaluator (pycocotools or faster-coco-eval): a file read by
    :func:`read_json` and validated like every annotation file, or a caller's dict (validated too).

    Returns new objects (the file and the caller's dict are left as they are) holding what bbox
    evaluation uses, with annotation ids renumbered 1..n in file order: both evaluators take id 0
    for "unmatched" and keep one annotation per id, so ids from 0 (labelme), repeated or missing
    ids would give wrong metrics silently. An annotation without a numeric ``area`` gets its box's.
    """
    if isinstance(source, Mapping):
        data: Any = source
        name: PathLike = "ground truth"
    else:
        data, name = read_json(source, _GROUND_TRUTH_KEYS), source
    columns = _validated_columns(data, name)
    annotations = []
    for number, (ann, (_, _, w, h), crowd) in enumerate(
            zip(data["annotations"], columns.bboxes.tolist(), columns.crowd.tolist()), start=1):
        area = ann.get("area")
        annotations.append({"id": number, "image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": list(ann["bbox"]), "area": area if _is_number(area) else w * h,
                            "iscrowd": int(crowd)})
    return {"images": [{key: img[key] for key in ("id", "file_name", "width", "height")} for img in data["images"]],
            "annotations": annotations,
            "categories": [{"id": cat["id"], "name": cat["name"]} for cat in data["categories"]]}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserInputError(f"{path}: annotation file does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None


def _decode(path: Path, raw: bytes) -> str:
    """json.load's own decoding (UTF-8/16/32, BOM), done apart so the bytes can go before parsing."""
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None


def _parse_text(path: Path, text: str, keys: Optional[frozenset[str]] = None) -> Any:
    try:
        return json.loads(text, object_pairs_hook=None if keys is None else _KEEPERS.get(keys, _keeping(keys)))
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
    ann_ids: list[Any]            # _MISSING where an annotation has none

    def repeated_ids(self) -> int:
        """How many annotations carry an id that an earlier one has (missing ids are not counted)."""
        ids = [i for i in self.ann_ids if i is not _MISSING]
        try:
            return len(ids) - len(set(ids))
        except TypeError:  # an unhashable id (a list...): compare their json text
            return len(ids) - len({json.dumps(i, sort_keys=True) for i in ids})


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
    for key in ("width", "height"):  # numpy would turn "640" into 640.0
        if not _types([img.get(key, _MISSING) for img in images]) <= {int, float}:
            raise TypeError(f"a {key} is not a number")
    return _Columns(
        image_ids=[img.get("id", _MISSING) for img in images],
        file_names=[img.get("file_name", _MISSING) for img in images],
        widths=np.array([img.get("width", _MISSING) for img in images], dtype=np.float64),
        heights=np.array([img.get("height", _MISSING) for img in images], dtype=np.float64),
        ann_image_ids=[a.get("image_id", _MISSING) for a in annotations],
        ann_category_ids=[a.get("category_id", _MISSING) for a in annotations],
        bboxes=np.array(bboxes, dtype=np.float64).reshape(-1, 4),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool),
        ann_ids=[a.get("id", _MISSING) for a in annotations],
    )


def _columns_certainly_valid(columns: _Columns, category_ids: set[int]) -> bool:
    """The per-entry checks below, column-wise: True only when every entry passes them."""
    ids = columns.image_ids
    if not _types(ids) <= {int} or len(set(ids)) != len(ids):
        return False
    if not _types(columns.file_names) <= {str} or not all(columns.file_names):
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


def _failing(path: PathLike) -> Callable[[str], UserInputError]:
    def fail(message: str) -> UserInputError:
        return UserInputError(f"{path}: {message}")

    return fail


def _validated_columns(data: Any, path: PathLike) -> _Columns:
    """Validate (fast, column-wise; entry by entry when that finds a problem, to name the first
    bad entry) and return the used fields as columns."""
    fail = _failing(path)
    if not isinstance(data, dict):
        raise fail("top level must be a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise fail(f"missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise fail(f"'{key}' must be a list")
    category_ids = _category_ids(data["categories"], fail)
    try:
        columns: Optional[_Columns] = _extract_columns(data)
    except (TypeError, ValueError, AttributeError, OverflowError):
        columns = None
    if columns is not None and _columns_certainly_valid(columns, category_ids):
        return columns
    _check_entries(data, fail, category_ids)  # raises at the first bad entry
    return _extract_columns(data)


def _category_ids(categories: list[Any], fail: Callable[[str], UserInputError]) -> set[int]:
    if not categories:
        raise fail("'categories' is empty")
    category_ids: set[int] = set()
    for i, cat in enumerate(categories):
        where = _describe("categories", i, cat)
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise fail(f"{where}: needs 'id' and 'name'")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise fail(f"{where}: 'id' must be an integer")
        if cat["id"] in category_ids:
            raise fail(f"{where}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])
    return category_ids


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
    repeated_ids: int = 0        # annotations whose id an earlier one has (see warn_repeated_ids)
    # (B,) bool: VOC's ``difficult`` boxes (ignored in evaluation, dropped from training unless kept);
    # None when the format has no such flag (COCO: crowd annotations are left out of ``boxes``)
    difficult: Optional[np.ndarray] = None


def parse_annotations(data: dict[str, Any], path: PathLike) -> ParsedAnnotations:
    """Validate ``data`` (see :func:`validate_annotations`) and lay it out in flat arrays."""
    return _index(_validated_columns(data, path), data["categories"], path)


def _index(columns: _Columns, categories: list[dict[str, Any]], path: PathLike) -> ParsedAnnotations:
    """Validated columns -> the flat arrays."""
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
        categories=tuple((int(c["id"]), str(c["name"])) for c in categories),
        image_ids=image_ids, sizes=sizes, name_offsets=name_offsets, name_bytes=name_bytes,
        box_offsets=box_offsets, boxes=boxes, category_ids=kept_categories[grouped],
        category_order=unique[np.argsort(first)], num_annotations=len(columns.ann_image_ids),
        num_crowd=int(columns.crowd.sum()), repeated_ids=columns.repeated_ids())


# ----------------------------------------------------------------------------- the index cache

CACHE_FORMAT = 2                      # bump whenever parse_annotations' output changes
CACHE_MIN_BYTES = 16 * 2**20          # smaller files parse faster than the cache would load
_ARRAY_FIELDS = ("image_ids", "sizes", "name_offsets", "name_bytes", "box_offsets", "boxes", "category_ids",
                 "category_order")


def load_annotations(path: PathLike, cache_dir: Union[PathLike, None] = "auto") -> ParsedAnnotations:
    """Read, validate and index a COCO instances json (UserInputError at the first bad entry).

    Files of ``CACHE_MIN_BYTES`` or more are cached as their index (an .npz of ~30 MB for
    train2017) in ``cache_dir`` ("auto": ``ssd300.files.cache_dir("annotation-index")``; ``None``:
    no cache), named by the file's content hash: a later load of the same content skips parsing
    and validation, and any change of content is a different entry, so a stale index is never
    used. Nothing is written next to the annotation file; an unwritable cache folder only means
    no caching. Repeated annotation ids are a warning (:func:`warn_repeated_ids`), cached or not.

    Parsing: msgspec's typed decoding of the used fields when it is installed (a dependency; about
    5x faster than json at train2017 scale, and it never builds the segmentations); a file it does
    not take (anything unusual, or invalid) goes the standard way (:func:`read_json`), which gives
    the same index or names the first bad entry.
    """
    path = Path(path)
    raw = _read_bytes(path)
    size, entry, digest = len(raw), None, ""
    if cache_dir is not None and size >= CACHE_MIN_BYTES:
        folder = package_cache_dir("annotation-index") if cache_dir == "auto" else Path(cache_dir)
        digest = hashlib.blake2b(raw, digest_size=20).hexdigest()
        entry = folder / f"{digest}.v{CACHE_FORMAT}.npz"
        cached = _load_cached(entry, digest, size)
        if cached is not None:
            log.info("%s: index read from the cache %s", path, entry)
            warn_repeated_ids(path, cached.repeated_ids)
            return cached
    parsed, document = None, _decode_typed(raw)
    if document is not None:
        del raw  # each stage's input goes as soon as the next exists (bytes -> objects -> columns -> arrays)
        checked = _typed_columns(document, path)
        del document
        if checked is not None:
            parsed = _index(checked[1], checked[0], path)
        else:  # not a valid file: the standard path names the problem (no cache for a file read twice)
            raw, entry = _read_bytes(path), None
    if parsed is None:
        # Each stage's input is dropped as soon as the next exists (bytes -> text -> objects -> arrays):
        # with all of them alive the peak would be ~0.5 GB higher on train2017.
        text = _decode(path, raw)
        del raw
        data = _parse_text(path, text, _USED_KEYS)
        del text
        parsed = parse_annotations(data, path)
        del data
    warn_repeated_ids(path, parsed.repeated_ids)
    if entry is not None:
        _store_cached(parsed, entry, digest, size)
    return parsed


@functools.lru_cache(maxsize=1)
def _typed_decoder() -> Any:
    """msgspec's decoder of the used fields (unknown keys are skipped unbuilt); None without msgspec."""
    try:
        import msgspec
    except ImportError:
        return None

    image = msgspec.defstruct("Image", [("id", int), ("file_name", str), ("width", float), ("height", float)],
                              gc=False)
    annotation = msgspec.defstruct(
        "Annotation", [("image_id", int), ("category_id", int), ("bbox", tuple[float, float, float, float]),
                       ("iscrowd", Union[int, bool], 0), ("id", Union[int, str, None], None)], gc=False)
    document = msgspec.defstruct("Document", [("images", GenericAlias(list, (image,))),
                                              ("annotations", GenericAlias(list, (annotation,))),
                                              ("categories", list[dict[str, Any]])])
    return msgspec.json.Decoder(document)


def _decode_typed(raw: bytes) -> Any:
    """msgspec's typed decoding of the used fields (a UTF-8 BOM skipped, as json's decoding does), or
    None: no msgspec, or a file the typed schema does not take (then the standard path gives the
    index or the error). Numbers decode as json's do (an int in a float field is the same float)."""
    decoder = _typed_decoder()
    if decoder is None:
        return None
    import msgspec

    try:
        return decoder.decode(memoryview(raw)[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
    except msgspec.DecodeError:  # ValidationError included
        return None


def _typed_columns(document: Any, path: Path) -> Optional[tuple[list[dict[str, Any]], _Columns]]:
    """(categories, columns) of a typed document when every check passes, else None."""
    categories, images, annotations = document.categories, document.images, document.annotations
    try:
        category_ids = _category_ids(categories, _failing(path))
    except UserInputError:
        return None
    columns = _Columns(
        image_ids=[img.id for img in images], file_names=[img.file_name for img in images],
        widths=np.fromiter((img.width for img in images), dtype=np.float64, count=len(images)),
        heights=np.fromiter((img.height for img in images), dtype=np.float64, count=len(images)),
        ann_image_ids=[a.image_id for a in annotations], ann_category_ids=[a.category_id for a in annotations],
        bboxes=np.fromiter(itertools.chain.from_iterable(a.bbox for a in annotations), dtype=np.float64,
                           count=4 * len(annotations)).reshape(-1, 4),
        crowd=np.fromiter((bool(a.iscrowd) for a in annotations), dtype=bool, count=len(annotations)),
        ann_ids=[_MISSING if a.id is None else a.id for a in annotations])
    return (categories, columns) if _columns_certainly_valid(columns, category_ids) else None


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
                             repeated_ids=int(meta["repeated_ids"]), **arrays)


def _store_cached(parsed: ParsedAnnotations, entry: Path, digest: str, size: int) -> None:
    """Write atomically (:func:`ssd300.files.atomic_write`); a failure only means no cache, said once."""
    meta = {"format": CACHE_FORMAT, "digest": digest, "size": size, "categories": list(parsed.categories),
            "num_annotations": parsed.num_annotations, "num_crowd": parsed.num_crowd,
            "repeated_ids": parsed.repeated_ids}
    try:
        with atomic_write(entry) as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
                     **{name: getattr(parsed, name) for name in _ARRAY_FIELDS})
    except (OSError, UserInputError) as err:  # UserInputError: a full disk, said in one line
        log.info("annotation index not cached in %s (%s)", entry.parent, one_line(err))
