"""DataLoader path: epoch-aware (distributed) samplers and the padded ``Batch``.

Workers ship uint8 300x300 images (4x less inter-process traffic than float32) and
``Batch.to(device)`` normalises them on the device in one fused step. Ground truth stays padded
(N, M, 4) so the batched ``BoxCoder.encode`` runs on the training device.

Reproducibility: the sampler hands the dataset ``(index, epoch, is_padding)`` keys, and each
sample's randomness is derived from ``(seed, epoch, index)``: the same seed gives the same
samples with any number of workers, every epoch and every image draw their own stream, and the
shuffle is the same on every rank (seeded by ``(seed, epoch)``) so rank shards are disjoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssd300.data.coco import Sample, _SkippedSample
from ssd300.errors import UserInputError
from ssd300.data.transforms import normalize


@dataclass
class Batch:
    """A padded detection batch.

    ``images``: uint8 (N, 3, 300, 300) from workers; after :meth:`to`, float32 normalised.
    ``boxes`` (N, M, 4) normalised ltrb, zero padded; ``labels`` (N, M) int64, 0 padded;
    ``num_boxes`` (N,); ``image_ids`` (N,) int64; ``image_sizes`` (N, 2) (width, height) of the
    original images; ``is_padding`` (N,) bool marks a distributed eval sampler's duplicates
    (drop those detections before COCO evaluation); ``skipped`` lists "path: reason" of images
    that could not be read while building this batch (add ``len(batch.skipped)`` to the epoch's
    skip count).
    """

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    num_boxes: torch.Tensor
    image_ids: torch.Tensor
    image_sizes: torch.Tensor
    is_padding: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: Union[str, torch.device], non_blocking: bool = False,
           channels_last: bool = False) -> "Batch":
        """Move to ``device``; uint8 images become model-ready float32 there."""
        images = self.images.to(device, non_blocking=non_blocking)
        if images.dtype == torch.uint8:
            images = normalize(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return replace(self, images=images, boxes=move(self.boxes), labels=move(self.labels),
                       num_boxes=move(self.num_boxes), image_ids=move(self.image_ids),
                       image_sizes=move(self.image_sizes), is_padding=move(self.is_padding))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return replace(self, images=self.images.pin_memory(), boxes=self.boxes.pin_memory(),
                       labels=self.labels.pin_memory(), num_boxes=self.num_boxes.pin_memory(),
                       image_ids=self.image_ids.pin_memory(), image_sizes=self.image_sizes.pin_memory(),
                       is_padding=self.is_padding.pin_memory())

    def without_padding(self) -> "Batch":
        """The batch minus the distributed sampler's duplicates."""
        keep = ~self.is_padding
        if bool(keep.all()):
            return self
        return replace(self, images=self.images[keep], boxes=self.boxes[keep], labels=self.labels[keep],
                       num_boxes=self.num_boxes[keep], image_ids=self.image_ids[keep],
                       image_sizes=self.image_sizes[keep], is_padding=self.is_padding[keep])


def collate(samples: Sequence[Optional[Sample]]) -> Batch:
    """Stack images, pad boxes/labels to the batch's largest box count (at least 1 column)."""
    skipped: list[str] = []
    kept: list[Sample] = []
    for sample in samples:
        if isinstance(sample, _SkippedSample) or sample is None:
            skipped.extend(sample or [])
            continue
        skipped.extend(sample.skipped)
        kept.append(sample)
    n = len(kept)
    m = max([1, *(len(s.boxes) for s in kept)])
    boxes = torch.zeros((n, m, 4), dtype=torch.float32)
    labels = torch.zeros((n, m), dtype=torch.int64)
    for i, sample in enumerate(kept):
        k = len(sample.boxes)
        boxes[i, :k] = sample.boxes
        labels[i, :k] = sample.labels
    images = _stack_images([s.image for s in kept])
    return Batch(
        images=images,
        boxes=boxes,
        labels=labels,
        num_boxes=torch.tensor([len(s.boxes) for s in kept], dtype=torch.int64),
        image_ids=torch.tensor([s.image_id for s in kept], dtype=torch.int64),
        image_sizes=torch.tensor([s.image_size for s in kept], dtype=torch.int64).reshape(n, 2),
        is_padding=torch.tensor([s.is_padding for s in kept], dtype=torch.bool),
        skipped=skipped,
    )


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack into one tensor; in a DataLoader worker, straight into shared memory (as
    ``default_collate`` does): the batch then crosses to the main process without a copy, and the
    worker's heap does not grow with fragments of batch-sized buffers (it grew ~150 MB per worker)."""
    if not images:
        return torch.zeros((0, 3, 300, 300), dtype=torch.uint8)
    first = images[0]
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(images)
    storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, out=out)


class EpochSampler(Sampler):
    """Yields ``(index, epoch, is_padding)`` keys for this rank's shard of the dataset.

    Like ``DistributedSampler``: with ``shuffle`` a permutation seeded by ``(seed, epoch)`` (the same
    on every rank), padded by repeating its start to a multiple of ``world_size`` (those repeats are
    flagged ``is_padding``), then every ``world_size``-th element from ``rank``. ``drop_uneven``
    drops the tail instead of padding (training).
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_uneven: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.length = length
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.epoch = 0
        if drop_uneven and length >= world_size:
            self.per_rank = length // world_size
        else:
            self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        if self.shuffle:
            # (seed, epoch) -> one generator seed without the seed=0/epoch=1 == seed=1/epoch=0 clash
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        padding = [False] * len(order)
        while len(order) < total:
            extra = order[: total - len(order)]
            order += extra
            padding += [True] * len(extra)
        for position in range(self.rank, total, self.world_size):
            yield order[position], self.epoch, padding[position]


class DetectionLoader(DataLoader):
    """A DataLoader with ``set_epoch`` (reshuffle and new augmentation draws each epoch) whose
    workers' :class:`~ssd300.errors.UserInputError` (strict mode: an undecodable image)
    reaches the caller as the worker raised it: one line, not torch's re-raise with the
    worker's traceback folded into the message."""

    def set_epoch(self, epoch: int) -> None:
        sampler: Any = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler  # type: ignore[attr-defined]
        sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        return _WorkerErrors(iterator)


class _WorkerErrors:
    """Wraps a DataLoader iterator; turns a worker's re-raised UserInputError back into its own line."""

    def __init__(self, iterator: Any) -> None:
        self._iterator = iterator

    def __iter__(self) -> "_WorkerErrors":
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str) -> Any:
        # Everything else is the DataLoader iterator's (e.g. ``_workers`` for memory measurements).
        return getattr(self._iterator, name)

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except UserInputError as err:
            message = str(err)
            if "DataLoader worker" not in message:
                raise
            raise type(err)(worker_error_message(message)) from None


def worker_error_message(reraised: str) -> str:
    """The original one-line message inside torch's "Caught X in DataLoader worker ... Traceback" text."""
    lines = [line for line in reraised.splitlines() if line.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1].endswith("Error") and " " not in head:
            return rest.strip()
    return lines[-1].strip() if lines else reraised


def _worker_init(_: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism.
    torch.set_num_threads(1)


def _build(dataset: Dataset, batch_size: int, sampler: EpochSampler, *, num_workers: int, drop_last: bool,
           pin_memory: Optional[bool], persistent_workers: Optional[bool], prefetch_factor: Optional[int]
           ) -> DetectionLoader:
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["prefetch_factor"] = prefetch_factor or 2
        extra["worker_init_fn"] = _worker_init
    return DetectionLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                           collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                           persistent_workers=persistent_workers and num_workers > 0, **extra)


def build_train_loader(dataset: Dataset, batch_size: int, *, num_workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, drop_last: bool = True, pin_memory: Optional[bool] = None,
                       persistent_workers: Optional[bool] = None, prefetch_factor: Optional[int] = None
                       ) -> DetectionLoader:
    """Shuffled, rank-sharded training loader; call ``loader.set_epoch(epoch)`` before each epoch.

    ``seed`` is the run's base seed and must be the same on every rank (do not add the rank):
    ranks read disjoint shards of one shared permutation and each image's augmentation stream
    comes from (seed, epoch, index). Set ``dataset.seed`` for augmentation; this sets it too.
    """
    if hasattr(dataset, "seed"):
        dataset.seed = int(seed)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, rank=rank,  # type: ignore[arg-type]
                           world_size=world_size, drop_uneven=True)
    return _build(dataset, batch_size, sampler, num_workers=num_workers, drop_last=drop_last,
                  pin_memory=pin_memory, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)


def build_eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int, rank: int = 0, world_size: int = 1,
                      pin_memory: Optional[bool] = None, persistent_workers: Optional[bool] = None,
                      prefetch_factor: Optional[int] = None) -> DetectionLoader:
    """In-order evaluation loader; rank r reads images r, r + world_size, ...

    When the dataset size is not a multiple of ``world_size`` the first images are repeated to
    even the shards; those samples have ``batch.is_padding`` set (use ``batch.without_padding()``
    or drop duplicate ``image_ids`` after gathering).
    """
    sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    return _build(dataset, batch_size, sampler, num_workers=num_workers, drop_last=False,
                  pin_memory=pin_memory, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
