"""Export SSD300 to ONNX, torch.export (pt2) or TorchScript: the whole detector (decoding + NMS) or the raw heads.

Full detector (default)
    input  ``images``  float32 (N, 3, 300, 300), already preprocessed exactly like the model's
           input (RGB resized to 300x300, scaled to [0, 1], normalised with ImageNet mean/std:
           :class:`ssd300.data.transforms.EvalTransform`). N is dynamic.
    output ``boxes``          float32 (N, K, 4)  ltrb, normalised, clipped to [0, 1] (multiply by the
                                                  image's width/height for pixels)
           ``scores``         float32 (N, K)      descending within each image
           ``labels``         int64   (N, K)      contiguous labels 1..C-1 (0 in padding rows)
           ``num_detections`` int64   (N,)        valid rows per image; rows beyond are zero
    K = ``max_detections`` (200 by default). The score threshold, NMS IoU and per-class top-k
    are baked into the file (they are recorded in the ONNX metadata).

Raw outputs (``raw=True``)
    ``locs`` (N, 4, 8732) and ``logits`` (N, C, 8732), the model's own outputs, for users who
    decode and run NMS elsewhere (e.g. TensorRT's NMS plugins); the default boxes are in
    :func:`ssd300.default_boxes.default_boxes_300` and the variances are 0.1/0.2 (SPEC §5).

ONNX exporters (``exporter=``): ``"dynamo"`` is torch's default exporter since 2.9 and the
maintained one (the TorchScript-based exporter is deprecated); the post-processing is written so
that it needs no guards: the data-dependent sizes (score filter, NMS) become unbacked sizes and
the outputs are padded to K with tensor ops. It needs ``onnxscript`` and exports in ~3x the time.
``"legacy"`` is the TorchScript-based exporter (``dynamo=False``), which works
on every supported torch and maps ``torchvision.ops.nms`` straight to ONNX ``NonMaxSuppression``. ``"auto"``
(default) uses dynamo when onnxscript is installed and torch >= 2.9, falling back to legacy if
the dynamo export fails. Both give the same detections (tested against PyTorch).
TorchScript is traced (``torch.jit.trace``): every size in the post-processing is computed with
tensor ops, so the traced graph keeps the batch dynamic. ``pt2`` is its successor: a
``torch.export`` ExportedProgram (dynamic batch) saved with ``torch.export.save``. INT8 ONNX files
come from :mod:`ssd300.quantize`; :mod:`ssd300.exported` runs any of these files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ssd300.data.transforms import INPUT_SIZE, MEAN, STD
from ssd300.default_boxes import DefaultBoxes
from ssd300.errors import UserInputError
from ssd300.files import PathLike, atomic_path, find_disk_error, write_bytes
from ssd300.labels import LabelMap
from ssd300.optional import available, require
from ssd300.postprocess import ExportablePostprocess, PostprocessConfig

ExportFormat = Literal["onnx", "torchscript", "pt2"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "pt2")
FULL_OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUT_NAMES = ("locs", "logits")
DEFAULT_OPSET = 18
# Opsets each exporter writes for this graph: dynamo from 18; the legacy exporter from 13 (at 11-12
# onnxruntime rejects the graph: Clip on int64) up to torch's TorchScript-exporter maximum.
DYNAMO_OPSETS = (18, 23)
LEGACY_OPSETS = (13, 20)
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "legacy")
log = logging.getLogger(__name__)


class ExportableDetector(nn.Module):
    """SSD300 + decoding + NMS with fixed-size padded outputs (see the module docstring); the
    post-processing is :class:`ssd300.postprocess.ExportablePostprocess`, shared with INT8 files."""

    def __init__(
        self,
        model: nn.Module,
        default_boxes: DefaultBoxes | None = None,
        config: PostprocessConfig | None = None,
        **overrides: float,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = (config or PostprocessConfig()).replace(**overrides)
        self.postprocess = ExportablePostprocess(self.config, default_boxes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        locs, logits = self.model(images)
        return self.postprocess(locs, logits)

    def settings(self) -> dict[str, float | int]:
        return dataclasses.asdict(self.config)


class RawOutputs(nn.Module):
    """The network alone: ``images -> (locs (N, 4, 8732), logits (N, C, 8732))``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        locs, logits = self.model(images)
        return locs, logits


def build_export_module(model: nn.Module, raw: bool = False, config: PostprocessConfig | None = None,
                        **overrides: float) -> nn.Module:
    """The module that gets exported: BatchNorm folded (if the model supports it), eval mode, CPU.

    ``config`` (default :class:`PostprocessConfig`'s settings, single ones changed by
    ``overrides``) is baked into the full detector; ``raw`` exports the network alone.
    """
    config = (config or PostprocessConfig()).replace(**overrides)  # validated before the slow part
    model = model.eval().cpu()
    if hasattr(model, "fuse"):
        model = model.fuse()  # type: ignore[operator]  # SSD300.fuse
    if raw:
        return RawOutputs(model).eval()
    return ExportableDetector(model, config=config).eval()


def _example_input(batch: int = 2) -> torch.Tensor:
    # Batch 2 when tracing, so nothing can specialise on a batch of 1.
    return torch.randn(batch, 3, 300, 300, generator=torch.Generator().manual_seed(0))


def output_names(raw: bool) -> tuple[str, ...]:
    return RAW_OUTPUT_NAMES if raw else FULL_OUTPUT_NAMES


def _dynamo_available() -> bool:
    if not available("onnxscript"):
        return False
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 9)


def _export_onnx_dynamo(module: nn.Module, path: Path, names: tuple[str, ...], opset: int) -> None:
    # torch.onnx prints progress lines and onnxscript notes about empty attributes: keep them quiet.
    quiet = logging.getLogger("onnx_ir"), logging.getLogger("onnxscript")
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _dynamo_export(module, path, names, opset)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _dynamo_export(module: nn.Module, path: Path, names: tuple[str, ...], opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (_example_input(),), str(path), dynamo=True, opset_version=opset,
                      input_names=["images"], output_names=list(names),
                      dynamic_shapes={"images": {0: batch}}, external_data=False)


def _export_onnx_legacy(module: nn.Module, path: Path, names: tuple[str, ...], opset: int) -> None:
    dynamic_axes = {name: {0: "batch"} for name in ("images", *names)}
    torch.onnx.export(module, (_example_input(),), str(path), dynamo=False, opset_version=opset,
                      input_names=["images"], output_names=list(names), dynamic_axes=dynamic_axes,
                      do_constant_folding=True)


def resolve_exporter(exporter: str, opset: int) -> str:
    """``dynamo`` or ``legacy`` for ``exporter`` (auto: dynamo when available and the opset allows);
    an opset outside the chosen exporter's range is a one-line UserInputError saying the range."""
    if exporter not in EXPORTERS:
        raise UserInputError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}", fields=("exporter",))
    ranges = {"dynamo": DYNAMO_OPSETS, "legacy": LEGACY_OPSETS}
    if exporter == "auto":
        dynamo_ok = _dynamo_available() and DYNAMO_OPSETS[0] <= opset <= DYNAMO_OPSETS[1]
        exporter = "dynamo" if dynamo_ok else "legacy"
        if not dynamo_ok and not LEGACY_OPSETS[0] <= opset <= LEGACY_OPSETS[1]:
            top = DYNAMO_OPSETS[1] if _dynamo_available() else LEGACY_OPSETS[1]
            raise UserInputError(f"opset {opset}: supported opsets are {LEGACY_OPSETS[0]}..{top} "
                                 f"(dynamo exporter {DYNAMO_OPSETS[0]}..{DYNAMO_OPSETS[1]}, legacy "
                                 f"{LEGACY_OPSETS[0]}..{LEGACY_OPSETS[1]})", fields=("opset",))
    low, high = ranges[exporter]
    if not low <= opset <= high:
        raise UserInputError(f"opset {opset}: the {exporter} exporter writes opsets {low}..{high}", fields=("opset",))
    return exporter


def export_onnx(module: nn.Module, path: PathLike, raw: bool = False, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None, exporter: str = "auto") -> Path:
    """Write ``module`` (from :func:`build_export_module`) as ONNX with a dynamic batch axis, at
    exactly ``opset`` (see :func:`resolve_exporter`). Written atomically: a failed export leaves
    nothing at ``path`` (:func:`ssd300.files.atomic_path`)."""
    requested = exporter
    exporter = resolve_exporter(exporter, opset)
    require("onnx", "ONNX export")  # before the export: the metadata is written with onnx afterwards
    path = Path(path)
    names = output_names(raw)
    use_dynamo = exporter == "dynamo"
    with atomic_path(path) as scratch:
        with warnings.catch_warnings(), torch.no_grad():
            # Tracer warnings about Python values are expected: every size that matters is a tensor.
            warnings.simplefilter("ignore")
            if use_dynamo:
                try:
                    _export_onnx_dynamo(module, scratch, names, opset)
                except Exception as exc:  # noqa: BLE001 - any dynamo failure: the legacy exporter still works
                    # ... unless the disk refused the file (maybe wrapped): no exporter will do better.
                    if (find_disk_error(exc) is not None or requested == "dynamo"
                            or not LEGACY_OPSETS[0] <= opset <= LEGACY_OPSETS[1]):
                        raise
                    log.warning("dynamo ONNX export failed (%s); using the TorchScript-based exporter",
                                " ".join(str(exc).split())[:200])
                    use_dynamo = False
            if not use_dynamo:
                _export_onnx_legacy(module, scratch, names, opset)
        _set_onnx_metadata(scratch, {**(metadata or {}), "exporter": "dynamo" if use_dynamo else "legacy"}, scratch)
    return path


def _set_onnx_metadata(path: Path, metadata: dict[str, str], target: Path) -> None:
    import onnx

    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))


def write_onnx_metadata(path: PathLike, metadata: dict[str, str], out: PathLike | None = None) -> Path:
    """Set ``metadata`` entries (replacing same-named ones) in an ONNX file; written (atomically)
    to ``out`` or in place."""
    target = Path(out) if out is not None else Path(path)
    with atomic_path(target) as scratch:
        _set_onnx_metadata(Path(path), metadata, scratch)
    return target


def export_torchscript(module: nn.Module, path: PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Trace ``module`` and save it; ``torch.jit.load(path)`` runs it without this package.

    Serialised in memory, then written atomically (:func:`ssd300.files.write_bytes`): torch's C++
    file writer aborts the whole process (exit 134) when the disk is full; a buffer cannot fail."""
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (_example_input(),), check_trace=False)
    extra = {f"{key}.txt": value for key, value in (metadata or {}).items()}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files=extra)
    return write_bytes(path, buffer.getbuffer())


def export_pt2(module: nn.Module, path: PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``torch.export`` the module (dynamic batch) and save the ExportedProgram with ``torch.export.save``.

    TorchScript's successor: ``torch.export.load(path).module()(images)`` runs it (torchvision must be
    imported for ``nms``). The data-dependent sizes of the post-processing (score filter, NMS) are
    unbacked sizes, as in the dynamo ONNX export. Metadata lands in the archive's extra files.
    Serialised in memory, then written atomically, as :func:`export_torchscript`.
    """
    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (_example_input(),), dynamic_shapes={"images": {0: batch}})
    extra = {f"{key}.txt": value for key, value in (metadata or {}).items()}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    return write_bytes(path, buffer.getbuffer())


def input_description() -> str:
    """The ``input`` metadata entry, from the preprocessing's owner (:mod:`ssd300.data.transforms`)."""
    size = INPUT_SIZE

    def numbers(values: tuple[float, ...]) -> str:
        return "(" + ",".join(f"{v:g}" for v in values) + ")"

    return (f"images float32 (N,3,{size},{size}): RGB resized to {size}x{size}, /255, normalised with "
            f"mean {numbers(MEAN)} std {numbers(STD)}")


def export_metadata(module: nn.Module, label_map: LabelMap, raw: bool) -> dict[str, str]:
    """What a user of the exported file needs: class names/ids, I/O layout, baked-in settings."""
    meta = {
        "producer": "ssd300",
        "class_names": json.dumps(list(label_map.names)),
        "category_ids": json.dumps(list(label_map.category_ids)),
        "input": input_description(),
        "outputs": ", ".join(output_names(raw)),
    }
    if isinstance(module, ExportableDetector):
        meta["settings"] = json.dumps(module.settings())
    return meta


def export_model(model: nn.Module, label_map: LabelMap, out: PathLike, fmt: str, raw: bool = False,
                 opset: int = DEFAULT_OPSET, exporter: str = "auto", config: PostprocessConfig | None = None,
                 **overrides: float) -> Path:
    """Export an SSD300 as ONNX (``fmt="onnx"``), an ExportedProgram (``"pt2"``) or TorchScript.

    ``config``/``overrides``: the post-processing baked into the file, see :func:`build_export_module`.
    """
    if fmt not in FORMATS:
        raise UserInputError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}", fields=("fmt",))
    module = build_export_module(model, raw=raw, config=config, **overrides)
    metadata = export_metadata(module, label_map, raw)
    if fmt == "onnx":
        return export_onnx(module, out, raw=raw, opset=opset, metadata=metadata, exporter=exporter)
    if fmt == "pt2":
        return export_pt2(module, out, metadata=metadata)
    return export_torchscript(module, out, metadata=metadata)


def format_from_suffix(path: PathLike) -> str | None:
    """``.onnx`` -> onnx; ``.pt2`` -> pt2; ``.pt``/``.pth``/``.ts``/``.torchscript`` -> torchscript; else None."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    if suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
        return "torchscript"
    return None
