"""``torchrun -m ssd300 detect DIR``: 2 gloo ranks on the CPU share the images, rank 0 writes one merged
COCO results file equal to a single process's, and reruns redo only what is missing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_ssd300
from ssd300.batch_detect import ImageJob, shard
from ssd300.cli import main



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_tiny_model, make_tiny_checkpoint) -> Path:
    model = make_tiny_model(3, conf_scale=0.3).eval()  # spread scores: several detections per image
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ssd.pt", model=model)


@pytest.fixture()
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64 + 8 * i, 48 + 4 * i), Image.BILINEAR).save(images / f"img{i}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # skipped, listed once in the merge
    return images


def test_shards_are_strided_and_cover_every_job_once():
    jobs = [ImageJob(f"{i}.jpg", i + 1, str(i)) for i in range(7)]
    shares = [shard(jobs, rank, 3) for rank in range(3)]
    assert [[job.image_id for job in share] for share in shares] == [[1, 4, 7], [2, 5], [3, 6]]
    assert shard(jobs, 0, 1) == jobs


def _detect(checkpoint: Path, images: Path, out: Path, ranks: int, *extra: str) -> str:
    return run_ssd300(["detect", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                       "--batch-size", "1", "--no-progress", "--score-threshold", "0.1", *extra], ranks, timeout=300)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


@pytest.mark.slow  # three torchrun launches
def test_two_ranks_merge_to_the_single_process_results_and_reruns_skip_done_images(checkpoint, folder, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _detect(checkpoint, folder, single, 1)
    log = _detect(checkpoint, folder, ddp, 2)
    assert "rank 0/2: 4 images, 0 already done" in log and "rank 1/2: 3 images, 0 already done" in log

    results = json.loads((single / "coco_results.json").read_text())
    assert len({r["image_id"] for r in results}) == 6 and len(results) > 6
    assert (ddp / "coco_results.json").read_text() == (single / "coco_results.json").read_text()
    assert (ddp / "images.json").read_text() == (single / "images.json").read_text()
    run = json.loads((ddp / "images.json").read_text())
    assert [Path(s["file_name"]).name for s in run["skipped"]] == ["broken.jpg"]
    names = sorted(p.name for p in (single / "detections").iterdir())
    assert sorted(p.name for p in (ddp / "detections").iterdir()) == names
    for name in names:  # every rank wrote its own images' files, the same as the single process
        assert (ddp / "detections" / name).read_text() == (single / "detections" / name).read_text()
    assert sorted(p.name for p in (ddp / "annotated").iterdir()) == [f"img{i}.jpg" for i in range(6)]

    # A rerun after a completed run: nothing is detected, the merged file is the same.
    before = _mtimes(ddp / "detections")
    log = _detect(checkpoint, folder, ddp, 2)
    assert "rank 0/2: 4 images, 3 already done" in log and "rank 1/2: 3 images, 3 already done" in log
    assert re.search(r"6 images on 2 ranks \(0 detected .*6 done before \(skipped\)\)", log), log
    assert _mtimes(ddp / "detections") == before
    assert (ddp / "coco_results.json").read_text() == (single / "coco_results.json").read_text()

    # One image's output deleted: only that image is detected again (rank 1 has img2: id 4 of 7).
    (ddp / "detections" / "img2.json").unlink()
    log = _detect(checkpoint, folder, ddp, 2)
    assert "rank 1/2: 3 images, 2 already done in" in log and "1 to detect" in log
    assert re.search(r"\(1 detected .*5 done before \(skipped\)\)", log), log
    after = _mtimes(ddp / "detections")
    assert {name for name in after if after[name] != before.get(name)} == {"img2.json"}
    assert (ddp / "detections" / "img2.json").read_text() == (single / "detections" / "img2.json").read_text()
    assert (ddp / "coco_results.json").read_text() == (single / "coco_results.json").read_text()


def test_single_process_resume_reuses_records_and_redoes_other_settings(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "out"
    command = ["detect", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
               "--no-images", "--no-progress", "--score-threshold", "0.1"]
    assert main(command) == 0
    first = (out / "coco_results.json").read_text()
    assert sorted(p.name for p in (out / "progress").iterdir()) == [f"img{i}.json" for i in range(6)]
    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "7 images, 6 already done" in err and "(0 detected" in err
    assert (out / "coco_results.json").read_text() == first
    assert main([*command, "--resume", "--score-threshold", "0.5"]) == 0  # other settings: records not reused
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "7 images, 0 already done" in err and "(6 detected" in err
    stricter = json.loads((out / "coco_results.json").read_text())
    assert stricter and min(r["score"] for r in stricter) >= 0.5
    assert len(stricter) < len(json.loads(first))
