"""``ssd300 detect``: run a checkpoint or an exported file on image files, folders or globs.

``--checkpoint`` (or ``--model``: one of the two) takes a training checkpoint or a file written by
``ssd300 export`` (ONNX ``.onnx`` fp32 or INT8, ``.pt2``, TorchScript ``.ts``; recognised by content,
whatever the suffix): an exported file brings its
classes and its baked-in thresholds (defaults here; see :meth:`ssd300.inference.Detector.from_exported`),
and ``--runtime`` picks onnxruntime or OpenVINO for ONNX files.

Writes into ``--out``:

* ``detections/<name>.json``: one file per image: its path, width, height and the detections
  (``box`` = [left, top, right, bottom] in pixels, ``label``, ``category_id``, ``class_name``,
  ``score``), best first;
* ``annotated/<name>.jpg`` (``.png`` for PNG inputs): the image with labelled boxes scoring at least
  ``--draw-threshold`` (skip with ``--no-images``);
* ``coco_results.json``: all detections of the run in the COCO results format
  (``image_id``, ``category_id`` from the checkpoint's label map, ``bbox`` = [x, y, w, h], ``score``);
* ``images.json``: the run's COCO-style ``images`` (``id``, ``file_name``, ``width``,
  ``height``), ``categories`` and ``skipped`` files (``id`` where the file had one, ``file_name``,
  ``error``);
* ``progress/<name>.json``: written last for each image: the proof it is done, with its results
  (see :mod:`ssd300.batch_detect`).

Many images, many processes: ``torchrun --nproc_per_node=N -m ssd300 detect DIR --out OUT``
(add ``--nnodes``/``--node-rank``/``--master-addr`` across machines, ``OUT`` on a shared
filesystem) gives each rank every N-th image of the run order; rank 0 writes the one merged
``coco_results.json``/``images.json``, equal to a single process's. Under torchrun a rerun into
the same ``--out`` skips the images already done with the same model and settings (``--resume``
asks for that in a single process too; ``--no-resume`` redoes everything).

``--score-threshold best`` (a training checkpoint): each class's F1-best score threshold stored with the
checkpoint's evaluation (:mod:`ssd300.diagnostics`), applied after post-processing; a checkpoint
without them is a one-line error (exit 2).

Exit status 0 when at least one image was processed (skipped files are reported and listed), 4
(:data:`ssd300.errors.EXIT_NO_RESULTS`) when no input could be read, 2 for bad flags or inputs
that name nothing (``--strict``: the first unreadable file).

Image ids are 1, 2, 3, ... in input order: the INPUTS as given, a folder's images and a glob's
matches sorted by path, duplicates dropped. A skipped file keeps its id (so ids do not shift when
a file cannot be read), and so does an input that names nothing (a missing file, a folder without
images, a pattern without matches, a broken symbolic link in a folder). ``<name>`` is the file's
stem, suffixed with ``_<id>`` when two inputs share a stem.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ssd300.commands.options import BEST, add_postprocess_arguments, postprocess_config
from ssd300.data.images import is_image_file
from ssd300.errors import NoResultsError, UserInputError
from ssd300.exported import RUNTIMES
from ssd300.files import check_output_path
from ssd300.postprocess import PostprocessConfig
from ssd300.runners import BACKENDS

_GLOB_CHARS = set("*?[")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (their images, not recursive) or glob patterns "
                             "(quote them; ** recurses)")
    parser.add_argument("--checkpoint", default=None,
                        help="the model to run: an SSD300 checkpoint (ours or NVIDIA's reference) or a file from "
                             "`ssd300 export`: ONNX (.onnx, fp32 or INT8), pt2 (.pt2) or TorchScript (.ts); "
                             "required (or --model)")
    parser.add_argument("--model", default=None, help="the same as --checkpoint (give one of them)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="for an exported ONNX file: onnxruntime (auto) or openvino")
    parser.add_argument("--out", required=True, help="output folder")
    add_postprocess_arguments(parser, best=True)
    parser.add_argument("--draw-threshold", type=float, default=0.3,
                        help="draw only detections scoring at least this on the annotated images (default 0.3)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                        help="mixed precision (ssd300.runtime): float16 autocast on CUDA, bfloat16 on a CPU with "
                             "native bf16, fp32 elsewhere (default off: fp32 results)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="run the network with PyTorch or with onnxruntime (fp32; often faster on CPUs; "
                             "CUDA/TensorRT providers on a CUDA device when installed)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable or non-image file instead of skipping it")
    parser.add_argument("--no-images", action="store_true", help="do not write annotated images")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal; else a line every 10 s)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="skip images a previous run into --out already did with the same model and settings "
                             "(their progress/ records); default: on under torchrun, off otherwise")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode big JPEGs at full size (default: reduced DCT scale that still gives >= 300 px)")


def _broken_link(path: Path) -> Optional[str]:
    """Why ``path`` (a symbolic link whose target does not exist) names nothing, else None."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None


def expand_entries(inputs: list[str]) -> list[tuple[str, Optional[str]]]:
    """INPUTS -> ``[(path, None)]`` for each image to run and ``[(input, problem)]`` for each input
    (or a folder's broken symbolic link) that names nothing, in run order: the order the ids follow."""
    entries: list[tuple[str, Optional[str]]] = []
    seen: set[str] = set()

    def add(path: str, problem: Optional[str] = None) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            entries.append((key if problem is None else path, problem))

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            children = sorted(p for p in path.iterdir() if is_image_file(p) and (p.is_file() or _broken_link(p)))
            if not children:
                add(item, "folder holds no image files")
            for child in children:
                add(str(child), _broken_link(child))
        elif path.is_file():
            add(str(path))
        elif _broken_link(path):
            add(item, _broken_link(path))
        elif _GLOB_CHARS & set(item):
            found = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True)
                           if Path(p).is_file() and is_image_file(p))
            if not found:
                add(item, "pattern matches no image files")
            for match in found:
                add(match)
        else:
            add(item, "no such file or folder")
    return entries


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """INPUTS -> (image paths in run order, [(input, problem)] for inputs that name nothing)."""
    entries = expand_entries(inputs)
    return ([path for path, problem in entries if problem is None],
            [(path, problem) for path, problem in entries if problem is not None])


def output_names(paths: list[str], ids: Optional[list[int]] = None) -> list[str]:
    """File stems, made unique with ``_<image id>`` (``ids``, default 1, 2, ...) where two inputs share one."""
    stems = [Path(p).stem for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    ids = ids if ids is not None else list(range(1, len(paths) + 1))
    return [stem if counts[stem] == 1 else f"{stem}_{ids[i]}" for i, stem in enumerate(stems)]


def model_flag(args: argparse.Namespace) -> str:
    """``--checkpoint`` or ``--model``, whichever the user gave (one of them, not both), and sets
    ``args.checkpoint`` to its path."""
    if args.checkpoint is not None and args.model is not None:
        raise UserInputError(f"--model {args.model} and --checkpoint {args.checkpoint} contradict each other: "
                             "both name the model to run; give one of them")
    if args.checkpoint is None and args.model is None:
        raise UserInputError("no model: give --checkpoint (a checkpoint or an exported file; or --model)")
    if args.checkpoint is None:
        args.checkpoint = args.model
        return "--model"
    return "--checkpoint"


def _check_model_path(path: str, flag: str) -> None:
    """A model path that names a file; a folder holding checkpoints gets a suggestion."""
    target = Path(path).expanduser()
    if target.is_dir():
        from ssd300.checkpoint import checkpoint_in_folder

        found = checkpoint_in_folder(target)
        hint = f"; did you mean {flag} {found}?" if found else " (give a checkpoint or an exported model file)"
        raise UserInputError(f"{flag} {path}: is a folder, not a model file{hint}")
    if not target.exists():
        raise UserInputError(f"{flag} {path}: no such file")


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.draw_threshold <= 1.0:
        raise UserInputError(f"--draw-threshold must be in [0, 1], got {args.draw_threshold}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_path(args.out, "--out", folder=True)


def build_detector(args: argparse.Namespace, postprocess: PostprocessConfig) -> Any:
    """The Detector of ``--checkpoint``/``--model`` and the runner flags (``args.model_flag`` names the flag
    given); the library's refusals said with the flags. ``ssd300 serve`` builds its model the same way."""
    from ssd300.inference import Detector

    try:
        return Detector.from_model_file(args.checkpoint, runtime=args.runtime, device=args.device,
                                        postprocess=postprocess, batch_size=args.batch_size, amp=args.amp,
                                        backend=args.backend, draft=not args.full_decode,
                                        class_score_thresholds=BEST if args.score_threshold == BEST else None)
    except UserInputError as error:
        # said with the flags: the library names its arguments
        if set(error.fields) == {"class_score_thresholds"}:
            raise UserInputError(f"--score-threshold {BEST}: takes the thresholds stored in a training checkpoint; "
                                 f"{args.model_flag} {args.checkpoint} is an exported file: give a number") from None
        if set(error.fields) == {"amp", "backend", "runtime"}:
            raise UserInputError(f"{args.model_flag} {args.checkpoint}: an exported file runs as exported; "
                                 "drop --amp/--backend (pick --runtime for ONNX)") from None
        if set(error.fields) == {"runtime", "backend"}:
            raise UserInputError("--runtime applies to exported files (.onnx); use --backend for a checkpoint") \
                from None
        raise


def _without_path(message: str, path: str) -> str:
    """A library message about ``path`` without the path it starts with (the caller names it once)."""
    return message[len(path) + 2:] if message.startswith(f"{path}: ") else message


def run(args: argparse.Namespace) -> int:
    args.model_flag = model_flag(args)
    postprocess = postprocess_config(args)
    _check_args(args)
    _check_model_path(args.checkpoint, args.model_flag)
    entries = expand_entries(args.inputs)
    paths = [path for path, problem in entries if problem is None]
    for item, problem in entries:
        if problem is None:
            continue
        if args.strict:
            raise UserInputError(f"{item}: {problem}")
        print(f"ssd300 detect: skipping {item}: {problem}", file=sys.stderr)
    if not paths:
        raise UserInputError("no images to process in " + " ".join(args.inputs))

    from ssd300.distributed import init_distributed, shutdown_distributed

    context = init_distributed(args.device)  # torchrun: this rank's process group and device
    try:
        return _detect(args, postprocess, entries, paths, context)
    finally:
        shutdown_distributed()


def _detect(args: argparse.Namespace, postprocess: PostprocessConfig, entries: list[tuple[str, Optional[str]]],
            paths: list[str], context: Any) -> int:
    from ssd300.batch_detect import ImageJob, detect_to_folder, model_file_identity, run_key, write_run_files

    if context.distributed:
        args.device = str(context.device)  # each rank on its own GPU (LOCAL_RANK), or the CPU
    detector = build_detector(args, postprocess)
    where = f"rank {context.rank}/{context.world_size}: " if context.distributed else ""
    if detector.exported is None:
        detector.runtime.configure()  # process-wide settings (TF32, cuDNN autotuning), as train does
        print(f"ssd300 detect: {where}{detector.runtime.describe()}", file=sys.stderr)
    print(f"ssd300 detect: {where}{detector.runner.describe()}", file=sys.stderr)
    label_map = detector.label_map
    out = Path(args.out)
    image_ids = {path: i + 1 for i, (path, _) in enumerate(entries)}
    names = output_names(paths, [image_ids[path] for path in paths])
    jobs = [ImageJob(path, image_ids[path], name) for path, name in zip(paths, names)]
    key = run_key(model=model_file_identity(args.checkpoint), postprocess=dataclasses.asdict(postprocess),
                  backend=args.backend, runtime=args.runtime, amp=args.amp, full_decode=args.full_decode)
    resume = context.distributed if args.resume is None else args.resume

    def report(line: str) -> None:
        print(f"ssd300 detect: {line}", file=sys.stderr)

    run_ = detect_to_folder(detector, jobs, out, key=key, context=context, resume=resume,
                            write_images=not args.no_images, draw_threshold=args.draw_threshold,
                            strict=args.strict, progress=args.progress, report=report)
    problems = [{"id": image_ids[item], "file_name": item, "error": problem}
                for item, problem in entries if problem is not None]
    if context.is_main:
        categories = [{"id": cid, "name": name}
                      for cid, name in zip(label_map.category_ids[1:], label_map.names[1:])]
        write_run_files(out, run_, categories, problems)
        shown = sum(1 for r in run_.results if r["score"] >= args.draw_threshold)
        done = f", {run_.reused} done before (skipped)" if resume else ""
        ranks = f" on {context.world_size} ranks" if context.distributed else ""
        rate = run_.detected / max(run_.elapsed, 1e-9)
        print(f"ssd300 detect: {len(run_.images)} images{ranks} ({run_.detected} detected in {run_.elapsed:.1f} s, "
              f"{rate:.1f} images/s{done}), {len(run_.results)} detections ({shown} scoring >= {args.draw_threshold}), "
              f"{len(run_.skipped) + len(problems)} skipped; results in {out}")
    if not run_.images:
        skipped = sorted([*problems, *run_.skipped], key=lambda entry: entry["id"])
        raise NoResultsError(f"none of the {len(skipped)} inputs could be read (first: {skipped[0]['file_name']}: "
                             f"{skipped[0]['error']}); see {out / 'images.json'}")
    return 0
