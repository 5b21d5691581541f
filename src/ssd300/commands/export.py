"""``ssd300 export``: write a checkpoint as ONNX, pt2 (torch.export) or TorchScript (see :mod:`ssd300.export`).

The file holds the whole detector (network, box decoding, per-class NMS) with a dynamic batch
size and fixed-size outputs per image: ``boxes (N, K, 4)`` ltrb normalised, ``scores (N, K)``,
``labels (N, K)``, ``num_detections (N,)``; or, with ``--raw``, the network alone
(``locs (N, 4, 8732)``, ``logits (N, C, 8732)``). Input: ``images`` float32 (N, 3, 300, 300),
preprocessed like the model's input. After writing, the file is run once and compared with
PyTorch (skip with ``--no-check``).

``--int8 --calibration DIR`` writes an INT8 ONNX file instead (:mod:`ssd300.quantize`): the
network quantised after calibration on DIR's images (a folder, or a COCO-format dataset's
training images), decoding and NMS in float; same inputs, outputs and metadata. Its check
reports how many of fp32's confident detections (score >= 0.5) on calibration images INT8
reproduces (same label, IoU >= 0.9).

``--triton DIR`` also writes a Triton Inference Server model repository for the ONNX file
(:mod:`ssd300.triton`): ``DIR/<--triton-model-name>/config.pbtxt`` (inputs and outputs read from
the file, dynamic batching up to ``--max-batch-size``), ``labels.txt`` and ``1/model.onnx``; with
``--triton``, ``--out`` is optional (the ONNX file then lives only in the repository).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssd300.commands.options import add_postprocess_arguments, postprocess_config
from ssd300.errors import UserInputError
from ssd300.export import (
    DEFAULT_OPSET,
    DYNAMO_OPSETS,
    EXPORTERS,
    FORMATS,
    LEGACY_OPSETS,
    build_export_module,
    export_model,
    format_from_suffix,
    resolve_exporter,
)
from ssd300.files import check_output_path
from ssd300.labels import LabelMap
from ssd300.optional import available, install_hint, require
from ssd300.postprocess import PostprocessConfig
from ssd300.quantize import DEFAULT_CALIBRATION_IMAGES, QUANTIZER_CHOICES
from ssd300.triton import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MODEL_NAME,
    DEFAULT_QUEUE_DELAY_US,
    INSTANCE_KINDS,
    check_triton_arguments,
    check_triton_output,
    write_triton_repository,
)

# Triton settings' flags (the library names them by field).
FIELD_FLAGS = {"model_name": "--triton-model-name", "queue_delay_us": "--triton-queue-delay-us",
               "instance_count": "--triton-instances", "instance_kind": "--triton-instance-kind"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="an SSD300 checkpoint (ours or NVIDIA's reference)")
    parser.add_argument("--out", default=None,
                        help="output file, e.g. ssd300.onnx, ssd300.pt2 or ssd300.ts (required unless --triton)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="onnx (ONNX), pt2 (torch.export) or torchscript (default: from the --out suffix: "
                             ".onnx, .pt2, or .ts/.pt/.pth)")
    parser.add_argument("--raw", action="store_true", help="export the network alone (locs, logits), no NMS")
    add_postprocess_arguments(parser, baked=True)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, written exactly (default {DEFAULT_OPSET}; dynamo exporter "
                             f"{DYNAMO_OPSETS[0]}..{DYNAMO_OPSETS[1]}, legacy {LEGACY_OPSETS[0]}..{LEGACY_OPSETS[1]})")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="ONNX exporter: dynamo (torch's default), legacy (TorchScript-based) or auto "
                             "(dynamo when available, else legacy)")
    parser.add_argument("--no-check", action="store_true", help="do not run the exported file against PyTorch")
    parser.add_argument("--int8", action="store_true",
                        help="INT8 ONNX: post-training static quantisation of the network (needs --calibration)")
    parser.add_argument("--calibration", default=None, metavar="DIR",
                        help="--int8 calibration images: a folder of images or a COCO-format dataset (its train split)")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                        help=f"images used for calibration, spread over DIR (default {DEFAULT_CALIBRATION_IMAGES})")
    parser.add_argument("--quantizer", choices=QUANTIZER_CHOICES, default="auto",
                        help="--int8 quantiser: nncf (auto's choice when installed: the faster file on OpenVINO) "
                             "or onnxruntime (heads stay float); both write QDQ ONNX")
    triton = parser.add_argument_group("Triton Inference Server")
    triton.add_argument("--triton", default=None, metavar="DIR",
                        help="also write a Triton model repository in DIR: DIR/<name>/config.pbtxt, labels.txt, "
                             "1/model.onnx (ONNX only)")
    triton.add_argument("--triton-model-name", default=DEFAULT_MODEL_NAME, metavar="NAME",
                        help=f"the model's name (folder) in the repository (default {DEFAULT_MODEL_NAME})")
    triton.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                        help=f"Triton's max_batch_size: requests batched together up to N images (default "
                             f"{DEFAULT_MAX_BATCH_SIZE}; 0: no batching by Triton)")
    triton.add_argument("--triton-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US, metavar="US",
                        help=f"dynamic batching: longest wait for more requests, in microseconds "
                             f"(default {DEFAULT_QUEUE_DELAY_US})")
    triton.add_argument("--triton-instances", type=int, default=1, metavar="N",
                        help="model instances (instance_group count, default 1)")
    triton.add_argument("--triton-instance-kind", choices=tuple(INSTANCE_KINDS), default="auto",
                        help="where instances run: auto (GPU when Triton has one), gpu or cpu")
    triton.add_argument("--overwrite", action="store_true",
                        help="replace the model's folder in the --triton repository if it exists")


def check_export(module: torch.nn.Module, path: Path, fmt: str, batch: int = 2) -> tuple[float, bool]:
    """Run the exported file and PyTorch on the same random batch.

    Returns (largest float difference, whether integer outputs agree). Raises UserInputError when
    the output shapes differ (a broken export). Integer outputs may legitimately differ in rare
    cases (an IoU within float rounding of the NMS threshold), so that is reported, not fatal.
    """
    images = torch.rand(batch, 3, 300, 300, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        expected = [t.detach().cpu() for t in module(images)]
    if fmt == "onnx" and not available("onnxruntime"):
        print(f"ssd300 export: onnxruntime is not installed; skipping the check ({install_hint('onnxruntime')})")
        return float("nan"), True
    from ssd300.runners import load_exported

    got = load_exported(path, runtime="onnxruntime" if fmt == "onnx" else "auto")(images)
    if len(expected) == 4:  # full detector: compare per image, tie-order independent
        expected, got = _canonical_rows(expected), _canonical_rows(got)
    worst, same_ints = 0.0, True
    for want, have in zip(expected, got):
        if want.shape != have.shape:
            raise UserInputError(f"{path}: exported outputs have shape {tuple(have.shape)}, "
                                 f"expected {tuple(want.shape)}")
        if want.is_floating_point():
            worst = max(worst, float((want - have).abs().max()) if want.numel() else 0.0)
        else:
            same_ints = same_ints and torch.equal(want, have.to(want.dtype))
    return worst, same_ints


def _canonical_rows(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sort each image's rows by (score, label, box) so that equal scores in another order compare equal."""
    boxes, scores, labels, counts = outputs
    rows = torch.cat((scores.unsqueeze(-1), labels.unsqueeze(-1).to(scores.dtype), boxes), dim=-1).numpy()
    ordered = torch.from_numpy(np.stack([row[np.lexsort(row.T[::-1])] for row in rows]))
    return [ordered[..., 2:], ordered[..., 0], ordered[..., 1].round().long(), counts.long()]


def _onnx_exporter(path: Path) -> str:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get("exporter", "unknown")


def run(args: argparse.Namespace) -> int:
    config = postprocess_config(args)  # validated before the checkpoint is read
    if args.triton is None:
        if args.out is None:
            raise UserInputError("--out is required (or --triton DIR for a Triton model repository)")
        if args.overwrite:
            raise UserInputError("--overwrite applies to --triton's model folder")
        return _export(args, config, args.out)
    fmt = args.format or (format_from_suffix(args.out) if args.out is not None else "onnx")
    if fmt != "onnx":
        raise UserInputError(f"--triton serves ONNX files; --format/--out ask for {fmt}")
    args.format = "onnx"
    check_triton_arguments(args.triton_model_name, args.max_batch_size, args.triton_queue_delay_us,
                           args.triton_instances, args.triton_instance_kind)
    check_triton_output(args.triton, args.triton_model_name, args.overwrite)  # before the slow export
    with tempfile.TemporaryDirectory(prefix="ssd300-triton-") as scratch:
        path = Path(args.out) if args.out is not None else Path(scratch) / "model.onnx"
        code = _export(args, config, str(path))
        model = write_triton_repository(path, args.triton, args.triton_model_name, args.max_batch_size,
                                        overwrite=args.overwrite, queue_delay_us=args.triton_queue_delay_us,
                                        instance_count=args.triton_instances,
                                        instance_kind=args.triton_instance_kind)
    shapes = ", ".join(f"{t.name} {list(t.dims)}" for t in (*model.inputs, *model.outputs))
    print(f"ssd300 export: wrote the Triton model {model.folder} (config.pbtxt, labels.txt, 1/model.onnx; "
          f"max_batch_size {model.max_batch_size}; per-image dims: {shapes})")
    return code


def _export(args: argparse.Namespace, config: PostprocessConfig, out: str) -> int:
    args.out = out
    fmt = args.format or format_from_suffix(args.out)
    if fmt is None:
        raise UserInputError(f"--out {args.out}: cannot tell the format from the suffix; "
                             "pass --format onnx|pt2|torchscript")
    if args.int8:
        if fmt != "onnx":
            raise UserInputError(f"--int8 writes ONNX; --out {args.out} asks for {fmt}")
        if args.calibration is None:
            raise UserInputError("--int8 needs --calibration DIR (a folder of images or a COCO-format dataset)")
    elif args.calibration is not None:
        raise UserInputError("--calibration is only used with --int8")
    check_output_path(args.out, "--out", folder=False)  # before the checkpoint is read and the model traced
    if fmt == "onnx":
        require("onnx", "--format onnx")  # before loading the checkpoint
        resolve_exporter(args.exporter, args.opset)
    from ssd300.checkpoint import load_model

    model, label_map, _ = load_model(args.checkpoint, map_location="cpu")
    from ssd300.runtime import Runtime

    # Export traces the fp32 network on the CPU; the file's runtime picks its own precision.
    print(f"ssd300 export: {Runtime.resolve('cpu', amp=False, channels_last=False).describe()}")
    start = time.perf_counter()
    if args.int8:
        return _run_int8(args, model, label_map, config, start)
    path = export_model(model, label_map, args.out, fmt, raw=args.raw, opset=args.opset, exporter=args.exporter,
                        config=config)
    how = fmt if fmt != "onnx" else f"onnx, {_onnx_exporter(path)} exporter"
    print(f"ssd300 export: wrote {path} ({how}, {'raw outputs' if args.raw else 'with NMS'}, dynamic batch) "
          f"in {time.perf_counter() - start:.1f} s")
    if not args.no_check:
        module = build_export_module(model, raw=args.raw, config=config)
        worst, same_ints = check_export(module, Path(path), fmt)
        verdict = "labels and counts equal" if same_ints else "WARNING: labels or counts differ"
        print(f"ssd300 export: checked against PyTorch on a random batch of 2: "
              f"max float difference {worst:.2e}, {verdict}")
    return 0


def _run_int8(args: argparse.Namespace, model: torch.nn.Module, label_map: LabelMap, config: PostprocessConfig,
              start: float) -> int:
    from ssd300.quantize import calibration_batches, calibration_files, export_int8, resolve_quantizer

    path = export_int8(model, label_map, args.out, args.calibration, args.calibration_images, raw=args.raw,
                       opset=args.opset, quantizer=args.quantizer, config=config)
    print(f"ssd300 export: wrote {path} (INT8 ONNX, {resolve_quantizer(args.quantizer)} quantiser, "
          f"{'raw outputs' if args.raw else 'with NMS'}, dynamic batch) in {time.perf_counter() - start:.1f} s")
    if not args.no_check and not args.raw:
        images = next(calibration_batches(calibration_files(args.calibration, min(args.calibration_images, 8))))
        reproduced, confident = int8_agreement(model, Path(path), images, config)
        print(f"ssd300 export: INT8 reproduces {reproduced}/{confident} of fp32's detections scoring >= 0.5 "
              f"(same label, IoU >= 0.9) on calibration images")
    return 0


def int8_agreement(model: torch.nn.Module, path: Path, images: np.ndarray,
                   config: PostprocessConfig) -> tuple[int, int]:
    """(reproduced, confident) fp32 detections of ``images`` by the INT8 file (see quantize.confident_agreement)."""
    from ssd300.quantize import confident_agreement
    from ssd300.runners import load_exported

    module = build_export_module(model, config=config)
    batch = torch.from_numpy(images)
    exported = load_exported(path)
    with torch.no_grad():
        fp32 = exported.detections([t.detach() for t in module(batch)])  # its padded -> Detections conversion
    return confident_agreement(fp32, exported.detections(exported(batch)))
