"""Optional DALI training pipeline (extra ``dali``: ``pip install 'ssd300[dali]'``).

The same SSD augmentation as :class:`ssd300.data.transforms.TrainTransform`, with DALI
operators: ``random_bbox_crop`` (the reference's IoU sampler) + ``decoders.image_slice``
(decode only the crop), ``bb_flip``, ``resize`` to 300x300, ``hsv`` + ``brightness_contrast``,
and ``crop_mirror_normalize`` (mirror, HWC -> CHW). Without a GPU (``device_id=None``) every
stage runs on the CPU; with a GPU, decoding is "mixed" (nvJPEG) and image stages run on it.

Files, boxes and labels come from our :class:`~ssd300.data.coco.CocoDetection` (so validation,
the label map and the counted skips are the same as on the PyTorch path) through an
``external_source``; the loader yields the same :class:`~ssd300.data.loaders.Batch` with uint8
images that ``batch.to(device)`` normalises. Randomness is DALI's, seeded by ``seed + rank``;
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
from ssd300.data.images import DECODE_ERRORS
from ssd300.data.loaders import Batch, EpochSampler
from ssd300.data.transforms import (BRIGHTNESS, CONTRAST, CROP_ASPECT, CROP_SCALE, HUE, INPUT_SIZE,
                                    SATURATION)
from ssd300.errors import UserInputError
from ssd300.optional import available, install_hint

log = logging.getLogger(__name__)

IOU_THRESHOLDS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]  # with allow_no_crop: the reference's 7 modes

# File signatures DALI's decoders read; anything else would fail inside the pipeline, unnamed.
_IMAGE_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")


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

    def start_epoch(self) -> None:
        self.order = [key[0] for key in self.sampler]
        self.skipped.clear()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _read(self, index: int) -> Optional[bytes]:
        path = self.dataset.path_of(index)
        reason: Optional[str]
        try:
            data = path.read_bytes()
        except OSError as err:
            reason = f"{path}: {err.strerror or err}"
        else:
            reason = self._size_problem(index, data) if data.startswith(_IMAGE_SIGNATURES) else \
                f"{path}: not a JPEG/PNG/BMP/GIF/TIFF/WebP file"
            if reason is None:
                return data
        if self.dataset.strict:
            raise UserInputError(f"{reason} (image is missing or cannot be decoded)")
        log.warning("skipping image %s", reason)
        self._current_skips.append(reason)
        return None

    def _size_problem(self, index: int, data: bytes) -> Optional[str]:
        """As the PyTorch loader: the header's size must be the json's (else boxes are misaligned)."""
        width, height = self.dataset.index.size(index)
        try:
            with Image.open(io.BytesIO(data)) as header:  # header only: no pixels are decoded
                check_image_size(header, width, height)
        except ImageSizeMismatch as err:
            return f"{self.dataset.path_of(index)}: {err}"
        except DECODE_ERRORS as err:
            return f"{self.dataset.path_of(index)}: cannot be decoded ({err})"
        return None

    def __call__(self, iteration: int) -> tuple[list[np.ndarray], ...]:
        if iteration >= len(self):
            raise StopIteration
        self._current_skips: list[str] = []
        files, boxes, labels, ids, sizes = [], [], [], [], []
        start = iteration * self.batch_size
        for position in range(start, start + self.batch_size):
            index = self.order[position]
            data = None
            for offset in range(min(len(self.dataset), 16)):  # a broken file: the next one replaces it
                data = self._read((index + offset) % len(self.dataset))
                if data is not None:
                    index = (index + offset) % len(self.dataset)
                    break
            if data is None:
                raise UserInputError(f"{self.dataset.image_dir}: 16 images in a row could not be read")
            annotation_index = self.dataset.index
            width, height = annotation_index.size(index)
            pixel_boxes, image_labels = annotation_index.targets(index)
            files.append(np.frombuffer(data, dtype=np.uint8))
            boxes.append(np.ascontiguousarray(pixel_boxes / np.array([width, height] * 2, dtype=np.float32)))
            labels.append(image_labels.astype(np.int32))
            ids.append(np.array([annotation_index.image_id(index)], dtype=np.int64))
            sizes.append(np.array([width, height], dtype=np.int64))
        self.skipped.append(self._current_skips)
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
            yield self._to_batch(outputs)

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
            skipped=self.source.skipped.popleft() if self.source.skipped else [],
        )


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
