"""gather_arrays with 2 gloo ranks: every rank's rows on rank 0 (different lengths, an empty rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd300.distributed import gather_arrays


def _rank_rows(rank: int) -> np.ndarray:
    rng = np.random.default_rng(rank)
    return rng.normal(size=(0 if rank == 1 else 5 + rank, 7))


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gathered = gather_arrays(_rank_rows(rank), torch.device("cpu"))
        ids = gather_arrays(np.arange(rank * 10, rank * 10 + rank + 1, dtype=np.int64), torch.device("cpu"))
        if rank == 0:
            assert gathered is not None and ids is not None
            np.savez(out, *gathered, *ids)
        else:
            assert gathered is None and ids is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns ranks
def test_gather_arrays_brings_every_ranks_rows_to_rank_0(tmp_path):
    world_size = 2
    out = tmp_path / "gathered.npz"
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), str(out)), nprocs=world_size, join=True)
    saved = np.load(out)
    arrays = [saved[f"arr_{i}"] for i in range(2 * world_size)]
    for rank in range(world_size):
        np.testing.assert_array_equal(arrays[rank], _rank_rows(rank))
        assert arrays[rank].dtype == np.float64 and arrays[rank].shape[1:] == (7,)
        np.testing.assert_array_equal(arrays[world_size + rank], np.arange(rank * 10, rank * 10 + rank + 1))


def test_gather_arrays_without_a_process_group_is_the_array_itself():
    rows = _rank_rows(0)
    (only,) = gather_arrays(rows, torch.device("cpu"))
    assert only is rows
