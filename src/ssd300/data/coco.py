"""The COCO-format detection dataset (COCO 2017 and custom data): folder layout, per-image
targets under a label map, and samples.

The annotation file is read, validated and indexed by :mod:`ssd300.data.annotations`; this module
applies the label map and the skips, and loads images. At run time a missing or undecodable image
is logged with its path and skipped (counted in the batch), or fatal with ``strict=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from ssd300.data.annotations import (
    ParsedAnnotations,
    background_categories,
    label_map_from_categories,
    load_annotations,
)
from ssd300.data.images import DECODE_ERRORS, draft_for_crop, exif_orientation, is_image_file, open_image
from ssd300.data.transforms import INPUT_SIZE, EvalTransform, TrainTransform
from ssd300.errors import UserInputError, one_line
from ssd300.files import PathLike
from ssd300.labels import LabelMap

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- layout


def resolve_split(data_root: PathLike, split: str) -> tuple[Path, Path]:
    """Dataset folder + split ("train" or "val") -> (image_dir, annotation_file).

    Understands the COCO 2017 layout (``train2017/``, ``annotations/instances_train2017.json``)
    and the synthetic/custom layout (``train/``, ``annotations/instances_train.json``). Errors name
    the folder as the field ``data`` (``TrainConfig.data``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_root).expanduser()
    if root.is_file():
        raise UserInputError(
            f"data {root}: is a file; data takes a dataset folder (holding {split}/ or {split}2017/ and "
            f"annotations/instances_{split}.json); for a single COCO-format json give it as {split}_annotations "
            f"with its image folder as {split}_images", fields=("data", f"{split}_annotations", f"{split}_images"))
    if not root.is_dir():
        raise UserInputError(f"data {root}: dataset folder does not exist", fields=("data",))
    candidates = [(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
                  (root / split, root / "annotations" / f"instances_{split}.json")]
    for image_dir, annotation_file in candidates:
        if annotation_file.is_file():
            if not image_dir.is_dir():
                raise UserInputError(f"data {root}: found {annotation_file} but no image folder {image_dir}",
                                     fields=("data",))
            if not any(is_image_file(p) for p in image_dir.iterdir()):
                raise UserInputError(f"data {root}: the {split} split is empty: image folder {image_dir} has no images",
                                     fields=("data",))
            return image_dir, annotation_file
    expected = " or ".join(str(a.relative_to(root)) for _, a in candidates)
    raise UserInputError(f"data {root}: no annotation file for split {split!r} (expected {expected})",
                         fields=("data",))


# ----------------------------------------------------------------------------- the index


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
                 cache_dir: Optional[PathLike] = "auto") -> None:
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
                    # No field named: the error crosses DataLoader workers, which keep only its text.
                    why = "fatal in strict mode" if mismatch else "image is missing or cannot be decoded"
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
