"""Detection of many image files into an output folder, in one process or sharded over ``torchrun`` ranks,
resumable: the library behind ``ssd300 detect``.

Each image is an :class:`ImageJob` (path, image id, output name). With ``W`` ranks (``torchrun``:
:class:`ssd300.distributed.DistributedContext`), rank ``r`` takes jobs ``r, r + W, r + 2W, ...`` of
the run order (a folder's files sorted by path), so the shares differ by at most one image and
do not depend on timing. For every image a rank writes ``detections/<name>.json`` and
``annotated/<name>.<ext>``, then, last and atomically, ``progress/<name>.json``: the image's COCO
entry and results plus the run's :func:`run_key` (model file, post-processing, backend). That
record is the proof the image is done: with ``resume``, an image whose record matches this run (same
key, id, file name, file size and modification time) and whose outputs are still there is not
detected again; its results come from the record. Deleting an image's ``detections/<name>.json``
(or its annotated image) makes the next run redo it. Unreadable files are not recorded: they are
tried again (a decode, no detection work).

Rank 0 then writes ONE ``coco_results.json`` and ``images.json`` for the whole run: the per-rank
results are gathered as rows (:func:`ssd300.distributed.gather_arrays`) and put back in image-id
order, so they equal a single-process run's file. Across nodes, ``out`` should be a shared
filesystem (each rank writes its images' files there; a rerun then resumes whatever the rank
layout); on node-local folders a rerun resumes only with the same ranks on the same nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ssd300.coco_eval import ROW_WIDTH, rows_to_results
from ssd300.distributed import DistributedContext, all_gather_objects, gather_arrays
from ssd300.files import PathLike, write_json

log = logging.getLogger(__name__)

DETECTIONS_DIR = "detections"
ANNOTATED_DIR = "annotated"
PROGRESS_DIR = "progress"
RESULTS_NAME = "coco_results.json"
IMAGES_NAME = "images.json"


@dataclass(frozen=True)
class ImageJob:
    """One input image: its path, its image id in the run and its output name (file stem, unique)."""

    path: str
    image_id: int
    name: str

    def annotated_name(self) -> str:
        return f"{self.name}{'.png' if Path(self.path).suffix.lower() == '.png' else '.jpg'}"


@dataclass
class BatchDetection:
    """What :func:`detect_to_folder` did. ``images``/``skipped`` cover the whole run (every rank);
    ``results`` too, on rank 0 (empty on the other ranks); the counts are this run's over all
    ranks: ``detected`` images run through the model, ``reused`` taken from earlier runs' records."""

    images: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    detected: int = 0
    reused: int = 0
    elapsed: float = 0.0


def shard(jobs: list[ImageJob], rank: int, world_size: int) -> list[ImageJob]:
    """Rank ``rank``'s share of ``jobs``: every ``world_size``-th job from its own index."""
    return jobs[rank::world_size]


def run_key(**settings: Any) -> str:
    """A short digest of what decides the results (JSON-ready values): records of another key
    (another model file or thresholds) are not reused."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_file_identity(path: PathLike) -> dict[str, Any]:
    """A model file as a run key sees it: absolute path, size, modification time."""
    stat = Path(path).stat()
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _file_identity(path: str) -> Optional[tuple[int, int]]:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _read_record(out: Path, job: ImageJob, key: str, write_images: bool) -> Optional[dict[str, Any]]:
    """The progress record of ``job`` if it proves the image done for this run, else None."""
    record_path = out / PROGRESS_DIR / f"{job.name}.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    identity = _file_identity(job.path)
    if (not isinstance(record, dict) or record.get("key") != key or record.get("image_id") != job.image_id
            or record.get("file_name") != job.path or identity is None
            or [record.get("file_size"), record.get("file_mtime_ns")] != list(identity)):
        return None
    if not (out / DETECTIONS_DIR / f"{job.name}.json").is_file():
        return None
    if write_images and not (out / ANNOTATED_DIR / job.annotated_name()).is_file():
        return None
    return record


def _rows(results: list[dict[str, Any]]) -> np.ndarray:
    """COCO results -> rows (image id, x, y, w, h, score, category id) as :mod:`ssd300.coco_eval` keeps them."""
    rows = np.empty((len(results), ROW_WIDTH), dtype=np.float64)
    for i, entry in enumerate(results):
        rows[i, 0] = entry["image_id"]
        rows[i, 1:5] = entry["bbox"]
        rows[i, 5] = entry["score"]
        rows[i, 6] = entry["category_id"]
    return rows


def detect_to_folder(detector: Any, jobs: list[ImageJob], out: PathLike, *, key: str,
                     context: Optional[DistributedContext] = None, resume: bool = False, write_images: bool = True,
                     draw_threshold: float = 0.3, strict: bool = False, progress: Optional[bool] = None,
                     report: Callable[[str], None] = log.info) -> BatchDetection:
    """Detect ``jobs`` (all of them: this rank takes its :func:`shard`) with ``detector``
    (:class:`ssd300.inference.Detector`) into ``out`` and write the merged results (rank 0).

    ``resume``: images with a matching progress record are not detected again (their results are
    reused). ``strict``: an unreadable file raises instead of being skipped. ``report`` gets the
    run's lines (how many images this rank does, how many it skips as done). Every rank must call
    this (it gathers).
    """
    from ssd300.logging_utils import Progress
    from ssd300.visualize import draw_detection_result, save_image

    context = context or DistributedContext()
    out = Path(out)
    mine = shard(jobs, context.rank, context.world_size)
    done = {job.image_id: record for job in mine
            if resume and (record := _read_record(out, job, key, write_images)) is not None}
    todo = [job for job in mine if job.image_id not in done]
    where = f"rank {context.rank}/{context.world_size}: " if context.distributed else ""
    if resume:
        report(f"{where}{len(mine)} images, {len(done)} already done in {out} (skipped), {len(todo)} to detect")
    start = time.perf_counter()
    images: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for record in done.values():
        images.append({name: record[name] for name in ("image_id", "file_name", "width", "height")})
        results.extend(record["results"])
    job_of = {job.path: job for job in todo}
    # One bar (rank 0's); the other ranks' progress as plain lines naming the rank.
    bar = Progress(len(todo), f"ssd300 detect{' rank ' + str(context.rank) if context.distributed else ''}",
                   enabled=progress if context.is_main else False)
    for path, result in detector.detect_files([job.path for job in todo], on_error="raise" if strict else "skip"):
        bar.update(1)
        job = job_of[path]
        if isinstance(result, Exception):
            problem = _without_path(str(result), path)
            bar.write(f"ssd300 detect: skipping {path}: {problem}")
            skipped.append({"id": job.image_id, "file_name": path, "error": problem})
            continue
        width, height = result.image_size
        coco = result.to_coco(job.image_id)
        write_json(out / DETECTIONS_DIR / f"{job.name}.json", {"image_id": job.image_id, **result.to_dict()})
        if write_images:
            from ssd300.inference import load_rgb

            drawn = draw_detection_result(load_rgb(path, draft=False), result, score_threshold=draw_threshold)
            save_image(drawn, out / ANNOTATED_DIR / job.annotated_name())
        size, mtime_ns = _file_identity(path) or (None, None)
        # Last, atomically: the record proves the outputs above are complete.
        write_json(out / PROGRESS_DIR / f"{job.name}.json",
                   {"key": key, "image_id": job.image_id, "file_name": path, "file_size": size,
                    "file_mtime_ns": mtime_ns, "width": width, "height": height, "results": coco}, layout="indent")
        images.append({"image_id": job.image_id, "file_name": path, "width": width, "height": height})
        results.extend(coco)
    bar.close()
    elapsed = time.perf_counter() - start

    # Small per-image lists to every rank; the detections as rows to rank 0 only.
    shares = all_gather_objects((images, skipped, len(todo) - len(skipped), len(done), elapsed))
    gathered = gather_arrays(_rows(results), context.device)
    merged = BatchDetection(
        images=sorted(({"id": i["image_id"], "file_name": i["file_name"], "width": i["width"], "height": i["height"]}
                       for share in shares for i in share[0]), key=lambda entry: entry["id"]),
        skipped=sorted((s for share in shares for s in share[1]), key=lambda entry: entry["id"]),
        detected=sum(share[2] for share in shares), reused=sum(share[3] for share in shares),
        elapsed=max(share[4] for share in shares))
    if gathered is not None:
        rows = np.concatenate(gathered) if gathered else np.zeros((0, ROW_WIDTH))
        # Image-id order, each image's detections best first as detected: a single process's order.
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        merged.results = rows_to_results(rows)
    return merged


def write_run_files(out: PathLike, run: BatchDetection, categories: list[dict[str, Any]],
                    extra_skipped: Sequence[dict[str, Any]] = ()) -> None:
    """Rank 0's files: ``coco_results.json`` (every result) and ``images.json`` (images,
    categories, skipped files in id order)."""
    out = Path(out)
    skipped = sorted([*extra_skipped, *run.skipped], key=lambda entry: entry["id"])
    write_json(out / RESULTS_NAME, run.results)
    write_json(out / IMAGES_NAME, {"images": run.images, "categories": categories, "skipped": skipped})


def _without_path(message: str, path: str) -> str:
    """A library message about ``path`` without the path it starts with (the caller names it once)."""
    return message[len(path) + 2:] if message.startswith(f"{path}: ") else message
