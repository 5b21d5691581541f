"""COCO-format detection datasets (COCO 2017 and custom data): validation, label map, samples.

An annotation file is validated completely before anything else happens, and the first bad
entry is reported in one line naming the file. At run time a missing or undecodable image is
logged with its path and skipped (counted in the batch), or fatal with ``strict=True``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ssd300.data.images import DECODE_ERRORS, draft_for_crop, open_image
from ssd300.data.transforms import INPUT_SIZE, EvalTransform, TrainTransform
from ssd300.errors import UserInputError, one_line
from ssd300.labels import LabelMap

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


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ImageRecord:
    """One image and its training targets (pixel ltrb boxes, contiguous labels)."""

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

    def summary(self) -> str:
        return (f"{self.images} images, {self.annotations} annotations; left out: "
                f"{self.crowd_boxes} crowd boxes, {self.small_boxes} boxes under 1 px, "
                f"{self.images_without_boxes} images without usable boxes")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def read_annotation_file(path: PathLike) -> dict[str, Any]:
    """Load and validate a COCO instances json; raise UserInputError at the first bad entry."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: annotation file does not exist")
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: not a readable JSON file ({err})") from None
    validate_annotations(data, path)
    return data


def validate_annotations(data: Any, path: PathLike) -> None:
    """Check keys, types, sizes and cross-references of a COCO instances dict."""
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


def label_map_from_annotations(data: dict[str, Any]) -> LabelMap:
    """Labels 1..K in the json's category order (COCO's own order for COCO 2017)."""
    return LabelMap.from_categories((int(c["id"]), str(c["name"])) for c in data["categories"])


def build_records(data: dict[str, Any], label_map: LabelMap, *, skip_empty: bool,
                  stats: DatasetStats) -> list[ImageRecord]:
    """Group annotations by image, convert xywh -> clipped ltrb pixels, drop crowd and tiny boxes."""
    to_label = label_map.category_id_to_label()
    per_image: dict[int, list[tuple[list[float], int]]] = {}
    for ann in data["annotations"]:
        stats.annotations += 1
        if ann.get("iscrowd", 0):
            stats.crowd_boxes += 1
            continue
        if ann["category_id"] not in to_label:
            raise UserInputError(f"category id {ann['category_id']} is not in the model's label map")
        per_image.setdefault(ann["image_id"], []).append((ann["bbox"], to_label[ann["category_id"]]))
    records = []
    for img in data["images"]:
        stats.images += 1
        width, height = int(round(img["width"])), int(round(img["height"]))
        entries = per_image.get(img["id"], [])
        boxes = np.zeros((len(entries), 4), dtype=np.float32)
        labels = np.zeros(len(entries), dtype=np.int64)
        for j, ((x, y, w, h), label) in enumerate(entries):
            boxes[j] = (x, y, x + w, y + h)
            labels[j] = label
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        usable = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        stats.small_boxes += int((~usable).sum())
        boxes, labels = boxes[usable], labels[usable]
        if len(boxes) == 0:
            stats.images_without_boxes += 1
            if skip_empty:
                continue
        records.append(ImageRecord(int(img["id"]), str(img["file_name"]), width, height, boxes, labels))
    return records


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
    it). ``strict=True`` raises UserInputError instead.
    """

    def __init__(self, image_dir: PathLike, annotation_file: PathLike, *, train: bool,
                 label_map: Optional[LabelMap] = None, seed: int = 0, strict: bool = False,
                 transform: Optional[Callable[..., Any]] = None) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise UserInputError(f"{self.image_dir}: image folder does not exist")
        data = read_annotation_file(self.annotation_file)
        self.label_map = label_map if label_map is not None else label_map_from_annotations(data)
        self.train = train
        self.seed = int(seed)
        self.strict = strict
        self.stats = DatasetStats()
        self.records = build_records(data, self.label_map, skip_empty=train, stats=self.stats)
        if not self.records:
            raise UserInputError(f"{self.annotation_file}: no images with usable boxes" if train
                                 else f"{self.annotation_file}: no images")
        self._check_images_present()
        self.transform = transform if transform is not None else (TrainTransform() if train else EvalTransform())
        left_out = self.stats.crowd_boxes + self.stats.small_boxes + self.stats.images_without_boxes
        (log.warning if left_out else log.info)("%s: %s", self.annotation_file, self.stats.summary())

    def _check_images_present(self) -> None:
        """A wrong image folder fails now, not as thousands of skips: the first files must exist."""
        probe = self.records[:5]
        if not any((self.image_dir / r.file_name).is_file() for r in probe):
            raise UserInputError(f"{self.image_dir}: none of the images listed in {self.annotation_file.name} "
                                 f"is there (e.g. {probe[0].file_name})")

    @classmethod
    def from_root(cls, data_root: PathLike, split: str, **kwargs: Any) -> "CocoDetection":
        image_dir, annotation_file = resolve_split(data_root, split)
        kwargs.setdefault("train", split == "train")
        return cls(image_dir, annotation_file, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def path_of(self, index: int) -> Path:
        return self.image_dir / self.records[index].file_name

    def sample_rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, index))

    def __getitem__(self, key: Union[int, tuple[int, int], tuple[int, int, bool]]) -> Optional[Sample]:
        index, epoch, is_padding = _unpack_key(key)
        skipped: list[str] = []
        # In training a broken image is replaced by the next ones (bounded, so a folder of broken
        # files still ends with an error instead of spinning).
        attempts = min(len(self.records), 16) if self.train else 1
        for offset in range(attempts):
            i = (index + offset) % len(self.records)
            try:
                sample = self._load(i, epoch)
            except DECODE_ERRORS as err:
                reason = f"{self.path_of(i)}: {one_line(err, limit=200)}"
                if self.strict:
                    raise UserInputError(f"{reason} (image is missing or cannot be decoded)") from None
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
        record = self.records[index]
        image = open_image(self.path_of(index))
        size = (record.width, record.height)
        if self.train:
            scale = np.array([record.width, record.height] * 2, dtype=np.float32)
            boxes = record.boxes / scale
            pixels, boxes, labels = self.transform(image, boxes, record.labels, self.sample_rng(index, epoch))
            return Sample(pixels, torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                          torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), record.image_id, size)
        # Same as inference: a big JPEG is decoded at the smallest DCT scale still >= 300 px.
        draft_for_crop(image, (1.0, 1.0), INPUT_SIZE)
        pixels = self.transform.resize_uint8(image)
        scale = np.array([record.width, record.height] * 2, dtype=np.float32)
        return Sample(pixels, torch.from_numpy(record.boxes / scale), torch.from_numpy(record.labels.copy()),
                      record.image_id, size)


class _SkippedSample(list):
    """Marker for an evaluation image that failed: the collate counts it and drops it."""


def _unpack_key(key: Any) -> tuple[int, int, bool]:
    if isinstance(key, tuple):
        if len(key) == 3:
            return int(key[0]), int(key[1]), bool(key[2])
        return int(key[0]), int(key[1]), False
    return int(key), 0, False

