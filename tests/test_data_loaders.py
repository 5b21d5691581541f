"""Loaders: padded batches, device normalisation, reproducibility across workers, rank shards."""

from __future__ import annotations

import pytest
import torch

from ssd300.data.coco import CocoDetection, Sample
from ssd300.data.loaders import EpochSampler, build_eval_loader, build_train_loader, collate
from ssd300.data.transforms import normalize


@pytest.fixture(scope="module")
def data_root(synthetic_dataset):
    return synthetic_dataset(num_train=24, num_val=10, seed=5)


def _sample(num_boxes: int, image_id: int) -> Sample:
    boxes = torch.rand(num_boxes, 4) * 0.5
    boxes[:, 2:] += 0.5
    return Sample(torch.full((3, 300, 300), image_id, dtype=torch.uint8), boxes,
                  torch.arange(1, num_boxes + 1), image_id, (640, 480))


def test_collate_pads_boxes_and_labels():
    samples = [_sample(2, 1), _sample(0, 2), _sample(3, 3)]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 300, 300) and batch.images.dtype == torch.uint8
    assert batch.boxes.shape == (3, 3, 4) and batch.labels.shape == (3, 3)
    assert batch.num_boxes.tolist() == [2, 0, 3]
    assert batch.image_ids.tolist() == [1, 2, 3] and batch.image_ids.dtype == torch.int64
    assert batch.image_sizes.tolist() == [[640, 480]] * 3
    torch.testing.assert_close(batch.boxes[0, :2], samples[0].boxes)
    assert batch.labels[0].tolist() == [1, 2, 0] and batch.labels[1].tolist() == [0, 0, 0]
    assert float(batch.boxes[0, 2].abs().sum()) == 0.0
    empty = collate([_sample(0, 4)])
    assert empty.boxes.shape == (1, 1, 4) and empty.num_boxes.tolist() == [0]


def test_batch_to_normalises_on_the_device_and_keeps_targets():
    batch = collate([_sample(1, 7), _sample(2, 9)])
    moved = batch.to("cpu", non_blocking=True, channels_last=True)
    assert moved.images.dtype == torch.float32
    assert moved.images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(moved.images, normalize(batch.images))
    assert torch.equal(moved.boxes, batch.boxes) and torch.equal(moved.image_ids, batch.image_ids)
    assert batch.images.dtype == torch.uint8  # the original is untouched


def test_train_sampler_shards_are_disjoint_and_reshuffle_per_epoch():
    shards = [list(EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3, drop_uneven=True)) for r in range(3)]
    indices = [k[0] for shard in shards for k in shard]
    assert all(len(s) == 3 for s in shards) and len(set(indices)) == 9
    sampler = EpochSampler(10, shuffle=True, seed=3)
    first = [k[0] for k in sampler]
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(10)) and first != [k[0] for k in second]
    assert all(k[1] == 1 for k in second)


def test_eval_sampler_pads_with_flagged_duplicates():
    shards = [list(EpochSampler(10, shuffle=False, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 3 for s in shards)
    real = [k[0] for shard in shards for k in shard if not k[2]]
    padded = [k[0] for shard in shards for k in shard if k[2]]
    assert sorted(real) == list(range(10)) and padded == [0, 1]


def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.images.clone(), b.boxes.clone(), b.image_ids.clone()) for b in loader]


def test_same_seed_same_samples_whatever_the_number_of_workers(data_root):
    dataset = CocoDetection.from_root(data_root, "train")
    serial = build_train_loader(dataset, 4, num_workers=0, seed=11)
    parallel = build_train_loader(dataset, 4, num_workers=2, seed=11, persistent_workers=True)
    for epoch in (0, 1):
        a, b = _epoch_batches(serial, epoch), _epoch_batches(parallel, epoch)
        assert len(a) == len(b) == 6
        for (ia, ba, ida), (ib, bb, idb) in zip(a, b):
            assert torch.equal(ida, idb) and torch.equal(ia, ib) and torch.equal(ba, bb)
    epoch0, epoch1 = _epoch_batches(serial, 0), _epoch_batches(serial, 1)
    assert not torch.equal(epoch0[0][2], epoch1[0][2])          # reshuffled
    # the same image is augmented differently in another epoch
    image_id = int(epoch0[0][2][0])
    where = [(i, j) for i, (_, _, ids) in enumerate(epoch1) for j, v in enumerate(ids.tolist()) if v == image_id]
    i, j = where[0]
    assert not torch.equal(epoch0[0][0][0], epoch1[i][0][j])
    other = build_train_loader(dataset, 4, num_workers=0, seed=12)
    assert not torch.equal(_epoch_batches(other, 0)[0][0], epoch0[0][0])


def test_distributed_eval_loader_covers_every_image_once_after_dropping_padding(data_root):
    dataset = CocoDetection.from_root(data_root, "val")
    seen = []
    for rank in range(3):
        loader = build_eval_loader(dataset, 3, num_workers=0, rank=rank, world_size=3)
        for batch in loader:
            assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 300, 300)
            seen += batch.without_padding().image_ids.tolist()
    assert sorted(seen) == sorted(dataset.image_ids)


def test_train_batches_feed_the_box_coder(data_root):
    box_coder = pytest.importorskip("ssd300.box_coder")
    default_boxes = pytest.importorskip("ssd300.default_boxes")
    coder = box_coder.BoxCoder(default_boxes.default_boxes_300())
    dataset = CocoDetection.from_root(data_root, "train")
    batch = next(iter(build_train_loader(dataset, 4, num_workers=0, seed=0))).to("cpu")
    loc_targets, labels = coder.encode(batch.boxes, batch.labels, batch.num_boxes)
    assert loc_targets.shape == (4, 4, 8732) and labels.shape == (4, 8732)
    assert int((labels > 0).sum()) >= int(batch.num_boxes.sum())  # every object matched at least once


def test_collate_in_a_worker_stacks_images_straight_into_shared_memory(monkeypatch):
    """In a worker the batch is built in shared memory (no copy on the way out, and no batch-sized
    heap buffers that fragmented each worker's heap by ~150 MB)."""
    samples = [Sample(torch.full((3, 300, 300), i, dtype=torch.uint8), torch.zeros(1, 4),
                      torch.ones(1, dtype=torch.int64), i, (10, 10)) for i in range(3)]
    assert not collate(samples).images.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    images = collate(samples).images
    assert images.is_shared()
    assert torch.equal(images, torch.stack([s.image for s in samples]))
