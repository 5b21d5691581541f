"""Optional DALI training pipeline (extra ``dali``: ``pip install 'ssd300[dali]'``).

The same SSD augmentation as :class:`ssd300.data.transforms.TrainTransform`, with DALI
operators: ``random_bbox_crop`` (the reference's IoU sampler) + ``decoders.image_slice``
(decode only the crop), ``bb_flip``, ``resize`` to 300x300, ``hsv`` + ``brightness_contrast``,
and ``crop_mirror_normalize`` (mirror, HWC -> CHW). Without a GPU (``device_id=None``) every
stage runs on the CPU; with a GPU, decoding is "mixed" (nvJPEG) and image stages run on it.

Files, boxes and labels come from our :class:`~ssd300.data.coco.CocoDetection` (so validation,
the label map and the counted skips are the same as on the PyTorch path) through an
``external_source``; the loader yields the same :class:`~ssd300.data.loaders.Batch` with uint8
images that ``batch.to(device)`` normalises. Files DALI's decoder does not read as Pillow does (GIF,
TIFF, 16/32-bit, truncated: see ``_dali_decodes``) are decoded by Pillow on the Python side, so the
same images are used or skipped as by the PyTorch loader. Randomness is DALI's, seeded by ``seed + rank``;
it is reproducible for a seed but is not the same stream as the PyTorch path.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from typing import Any, Iterator, Optional

import numpy as np
import torch

from PIL import Image

from ssd300.data.coco import CocoDetection, ImageSizeMismatch, check_image_size
from ssd300.data.images import DECODE_ERRORS, to_rgb
from ssd300.data.loaders import Batch, EpochSampler
from ssd300.data.transforms import (BRIGHTNESS, CONTRAST, CROP_ASPECT, CROP_SCALE, HUE, INPUT_SIZE,
                                    SATURATION)
from ssd300.errors import UserInputError, one_line
from ssd300.optional import available, install_hint

log = logging.getLogger(__name__)

IOU_THRESHOLDS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]  # with allow_no_crop: the reference's 7 modes

# What DALI's decoder reads exactly as Pillow does (checked against Pillow in the tests); any other
# file the PyTorch loader reads (GIF, TIFF, PPM, 16/32-bit, CMYK, alpha, palettes) is decoded on
# the Python side. A raw DALI error would name no file and leave the pipeline unusable.
_DALI_MODES = {"JPEG": ("L", "RGB"), "PNG": ("L", "RGB"), "BMP": ("RGB",), "WEBP": ("RGB",)}
_PNG_END = b"IEND\xaeB`\x82"


def _dali_decodes(image: Image.Image, data: bytes) -> bool:
    """Whether DALI's decoder reads this (header-opened) file as Pillow would: a format and mode it
    handles, and a file that is complete as far as its end shows (a truncated JPEG or PNG goes to
    Pillow, which skips it as the PyTorch loader does; trailing bytes after the end marker too)."""
    if image.mode not in _DALI_MODES.get(image.format or "", ()):
        return False
    if image.format == "JPEG":
        return data.endswith(b"\xff\xd9")
    if image.format == "PNG":  # 8 bits per channel (Pillow reads 16-bit RGB as "RGB" too, rounding its own way)
        return data[24:25] == b"\x08" and data.endswith(_PNG_END)
    if image.format == "BMP":
        return len(data) == int.from_bytes(data[2:6], "little")
    return len(data) == int.from_bytes(data[4:8], "little") + 8  # WebP: the RIFF size


def dali_available() -> bool:
    return available("nvidia.dali")  # False also for a broken CUDA runtime behind it


def _require_dali() -> Any:
    try:
        import nvidia.dali as dali
    except Exception as err:
        raise UserInputError(f"dali needs NVIDIA DALI: {install_hint('nvidia.dali')} ({err})",
                             fields=("dali",)) from None
    return dali


class _EpochSource:
    """Per-iteration batches of (encoded file bytes, boxes, labels, image id, size) for DALI.

    DALI asks for batches ahead of use, so the metadata that never enters the pipeline (skipped
    files) is queued here in the same order and popped as the batches come out.
    """

    def __init__(self, dataset: CocoDetection, sampler: EpochSampler, batch_size: int) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.order: list[int] = []
        self.skipped: deque[list[str]] = deque()
        self.pending: deque[list[str]] = deque()  # file names of batches fed to DALI, not yet out
        self.error: Optional[UserInputError] = None

    def start_epoch(self) -> None:
        self.order = [key[0] for key in self.sampler]
        self.skipped.clear()
        self.pending.clear()
        self.error = None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _read(self, index: int) -> Optional[bytes]:
        """The bytes DALI decodes for image ``index``, or None when it is skipped (logged, counted,
        fatal with ``strict``) for the same reasons and with the same text as the PyTorch loader."""
        path = self.dataset.path_of(index)
        width, height = self.dataset.index.size(index)
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:  # header only, as the PyTorch loader's check
                check_image_size(image, width, height)
                if _dali_decodes(image, data):
                    return data
                # Not for DALI's decoder (GIF, int32 TIFF, 16-bit PNG, a JPEG without its end
                # marker, ...): decoded here exactly as the PyTorch loader does (a truncated file
                # fails as there) and handed to DALI as an uncompressed BMP (one copy of the pixels).
                buffer = io.BytesIO()
                to_rgb(image).save(buffer, format="BMP")
                return buffer.getvalue()
        except DECODE_ERRORS as err:  # ImageSizeMismatch included (a ValueError)
            mismatch = isinstance(err, ImageSizeMismatch)
            reason = f"{path}: {err if mismatch else one_line(err, limit=200)}"
            if self.dataset.strict:
                why = "fatal in strict mode" if mismatch else "image is missing or cannot be decoded"
                self.error = UserInputError(f"{reason} ({why})")
                raise self.error from None
        log.warning("skipping image %s", reason)
        self._current_skips.append(reason)
        return None

    def __call__(self, iteration: int) -> tuple[list[np.ndarray], ...]:
        if iteration >= len(self):
            raise StopIteration
        self._current_skips: list[str] = []
        files, boxes, labels, ids, sizes = [], [], [], [], []
        names: list[str] = []
        start = iteration * self.batch_size
        for position in range(start, start + self.batch_size):
            index = self.order[position]
            data = None
            attempts = min(len(self.dataset), 16)
            for offset in range(attempts):  # a broken file: the next one replaces it (as the PyTorch loader)
                data = self._read((index + offset) % len(self.dataset))
                if data is not None:
                    index = (index + offset) % len(self.dataset)
                    break
            if data is None:
                self.error = UserInputError(f"{self.dataset.image_dir}: {attempts} images in a row could not be "
                                            f"read, e.g. {self._current_skips[-1]}")
                raise self.error
            names.append(str(self.dataset.path_of(index)))
            annotation_index = self.dataset.index
            width, height = annotation_index.size(index)
            pixel_boxes, image_labels = annotation_index.targets(index)
            files.append(np.frombuffer(data, dtype=np.uint8))
            boxes.append(np.ascontiguousarray(pixel_boxes / np.array([width, height] * 2, dtype=np.float32)))
            labels.append(image_labels.astype(np.int32))
            ids.append(np.array([annotation_index.image_id(index)], dtype=np.int64))
            sizes.append(np.array([width, height], dtype=np.int64))
        self.skipped.append(self._current_skips)
        self.pending.append(names)
        return files, boxes, labels, ids, sizes


def build_dali_pipeline(source: _EpochSource, batch_size: int, *, num_threads: int, device_id: Optional[int],
                        seed: int, prefetch_queue_depth: int = 2) -> Any:
    """The SSD training augmentation as a DALI pipeline (CPU-only when ``device_id`` is None)."""
    dali = _require_dali()
    fn, types = dali.fn, dali.types
    gpu = device_id is not None
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                         prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True)
    with pipe:
        files, boxes, labels, ids, sizes = fn.external_source(
            source=source, num_outputs=5, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT32,
                                                              types.INT64, types.INT64])
        images, boxes, labels = ssd_augmentation(files, boxes, labels, gpu=gpu)
        pipe.set_outputs(images, boxes, labels, ids, sizes)
    return pipe


def ssd_augmentation(files: Any, boxes: Any, labels: Any, *, gpu: bool) -> tuple[Any, Any, Any]:
    """The SSD training augmentation as DALI graph nodes: encoded files + normalised ltrb boxes +
    labels -> uint8 CHW 300x300 images, boxes, labels (call inside a ``with pipe:`` block)."""
    dali = _require_dali()
    fn, types = dali.fn, dali.types
    crop_begin, crop_size, boxes, labels = fn.random_bbox_crop(
        boxes, labels, device="cpu", aspect_ratio=list(CROP_ASPECT), thresholds=IOU_THRESHOLDS,
        scaling=list(CROP_SCALE), bbox_layout="xyXY", allow_no_crop=True, num_attempts=1)
    images = fn.decoders.image_slice(files, crop_begin, crop_size, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, adjust_orientation=False)
    flip = fn.random.coin_flip(probability=0.5)
    boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip, device="cpu")
    images = fn.resize(images, resize_x=INPUT_SIZE, resize_y=INPUT_SIZE,
                       min_filter=types.INTERP_TRIANGULAR, mag_filter=types.INTERP_LINEAR)
    hue_degrees = HUE * 360.0
    images = fn.hsv(images, dtype=types.UINT8,
                    hue=fn.random.uniform(range=[-hue_degrees, hue_degrees]),
                    saturation=fn.random.uniform(range=[1 - SATURATION, 1 + SATURATION]))
    images = fn.brightness_contrast(images,
                                    brightness=fn.random.uniform(range=[1 - BRIGHTNESS, 1 + BRIGHTNESS]),
                                    contrast=fn.random.uniform(range=[1 - CONTRAST, 1 + CONTRAST]))
    images = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")
    return images, boxes, labels


class DaliTrainLoader:
    """Iterates a DALI pipeline as ``Batch`` objects; ``set_epoch`` as the PyTorch loader."""

    def __init__(self, dataset: CocoDetection, batch_size: int, *, num_threads: int, seed: int,
                 device_id: Optional[int] = None, rank: int = 0, world_size: int = 1) -> None:
        if not getattr(dataset, "train", False):
            raise ValueError("the DALI loader is for training datasets (train=True)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device_id = device_id
        self.sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size,
                                    drop_uneven=True)
        if len(self.sampler) < batch_size:
            raise UserInputError(f"{dataset.annotation_file}: {len(self.sampler)} training images per rank, "
                                 f"fewer than the batch size {batch_size}")
        self.source = _EpochSource(dataset, self.sampler, batch_size)
        self.pipe = build_dali_pipeline(self.source, batch_size, num_threads=num_threads, device_id=device_id,
                                        seed=seed + rank)
        self.pipe.build()
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Batch]:
        self.source.start_epoch()
        if self._started:
            self.pipe.reset()
        self._started = True
        while True:
            try:
                outputs = self.pipe.run()
            except StopIteration:
                return
            except Exception as err:  # DALI wraps everything raised inside it; a failed pipeline is unusable
                raise self._pipeline_error(err) from None
            yield self._to_batch(outputs)

    def _pipeline_error(self, err: Exception) -> UserInputError:
        """One line for a failed pipeline: our own error from the source, else the files DALI had."""
        if self.source.error is not None:
            return self.source.error
        files = sorted({name for names in self.source.pending for name in names})
        shown = ", ".join(files[:8]) + (f" (+{len(files) - 8} more)" if len(files) > 8 else "")
        detail = " ".join(line.strip() for line in str(err).splitlines() if "failure" in line or "rror" in line)
        return UserInputError(f"DALI could not decode one of {shown} ({detail[:200] or type(err).__name__}); "
                              "train without dali to skip it, or remove the file", fields=("dali",))

    def _to_batch(self, outputs: Any) -> Batch:
        images_tl, boxes_tl, labels_tl, ids_tl, sizes_tl = outputs
        images = _images_to_torch(images_tl, self.device_id)
        boxes = [np.array(boxes_tl[i]).reshape(-1, 4) for i in range(len(boxes_tl))]
        labels = [np.array(labels_tl[i]).reshape(-1) for i in range(len(labels_tl))]
        n = len(boxes)
        m = max([1, *(len(b) for b in boxes)])
        padded_boxes = torch.zeros((n, m, 4), dtype=torch.float32)
        padded_labels = torch.zeros((n, m), dtype=torch.int64)
        for i, (b, l) in enumerate(zip(boxes, labels)):
            padded_boxes[i, :len(b)] = torch.from_numpy(b)
            padded_labels[i, :len(l)] = torch.from_numpy(l.astype(np.int64))
        return Batch(
            images=images, boxes=padded_boxes, labels=padded_labels,
            num_boxes=torch.tensor([len(b) for b in boxes], dtype=torch.int64),
            image_ids=torch.from_numpy(np.array(ids_tl.as_array()).reshape(n)).to(torch.int64),
            image_sizes=torch.from_numpy(np.array(sizes_tl.as_array()).reshape(n, 2)).to(torch.int64),
            is_padding=torch.zeros(n, dtype=torch.bool),
            skipped=self._pop_skipped(),
        )

    def _pop_skipped(self) -> list[str]:
        if self.source.pending:
            self.source.pending.popleft()
        return self.source.skipped.popleft() if self.source.skipped else []


def _images_to_torch(images: Any, device_id: Optional[int]) -> torch.Tensor:
    if device_id is None:
        return torch.from_numpy(np.array(images.as_array()))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.uint8, device=torch.device("cuda", device_id))
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


def build_dali_train_loader(dataset: CocoDetection, batch_size: int, *, num_threads: int, seed: int,
                            device_id: Optional[int] = None, rank: int = 0, world_size: int = 1
                            ) -> DaliTrainLoader:
    """DALI counterpart of :func:`~ssd300.data.loaders.build_train_loader` (always drops the last
    partial batch). ``device_id=None``: CPU only; an int: that GPU for decoding and image stages.
    ``seed`` is the run's base seed, the same on every rank."""
    return DaliTrainLoader(dataset, batch_size, num_threads=num_threads, seed=seed, device_id=device_id,
                           rank=rank, world_size=world_size)
