"""Files written by ``ssd300 export``: which format a file is, and what its metadata says.

The file's metadata (written by :func:`ssd300.export.export_metadata`) names the classes, whether
the file holds the network alone (``locs``, ``logits``) or the whole detector, and the detector's
baked-in post-processing settings; :class:`ExportedFile` is that, parsed and checked. Running a
file is the job of :mod:`ssd300.runners` (:func:`ssd300.runners.load_exported`), which reads the
metadata through each runtime's own loader and hands it to :func:`parse_metadata`.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ssd300.errors import UserInputError
from ssd300.files import PathLike
from ssd300.labels import LabelMap

RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "openvino", "torch")
METADATA_KEYS = ("producer", "class_names", "category_ids", "outputs", "settings", "precision", "quantizer")


@dataclass(frozen=True)
class ExportedFile:
    """An exported file as its metadata describes it."""

    path: Path
    format: str  # "onnx", "pt2" or "torchscript"
    raw: bool  # True: outputs are (locs, logits); False: (boxes, scores, labels, num_detections)
    label_map: LabelMap
    settings: dict[str, float] = field(default_factory=dict)  # baked-in post-processing (full detector)
    precision: str = "fp32"


def _zip_format(path: Path) -> Optional[str]:
    """"pt2" (torch.export archive), "torchscript" (code + constants) or None for other zips (checkpoints)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "torchscript"
    return None


def _looks_like_onnx(path: Path) -> bool:
    """An ONNX file's first bytes: protobuf field 1 (``ir_version``, a small varint), then field 2+
    (a string: producer name, opset...). Checkpoints start with ``PK`` (zip) or ``\\x80`` (pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return False
    next_fields = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)  # tags of ModelProto fields 2..8
    return len(head) == 3 and head[0] == 0x08 and 1 <= head[1] < 0x80 and head[2] in next_fields


def is_exported_file(path: PathLike) -> bool:
    """Whether ``path`` is an exported model (ONNX, pt2, TorchScript) rather than a training checkpoint:
    by suffix (``.onnx``, ``.pt2``) or by content, whatever the file is named (an ONNX file saved as
    ``model.bin``)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".onnx", ".pt2"):
        return True
    return path.is_file() and (_zip_format(path) is not None or _looks_like_onnx(path))


def format_of(path: Path) -> str:
    """"onnx", "pt2" or "torchscript", from the content (the suffix for ONNX)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    fmt = _zip_format(path)
    if fmt is not None:
        return fmt
    if _looks_like_onnx(path):
        return "onnx"
    raise UserInputError(f"{path}: not an ONNX, pt2 or TorchScript file written by ssd300 export")


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata entries, read without its weights."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def check_runtime(runtime: str) -> None:
    """A ``runtime`` name that is one of :data:`RUNTIMES`, else a one-line error naming the field."""
    if runtime not in RUNTIMES:
        raise UserInputError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}", fields=("runtime",))


def resolve_runtime(path: Path, fmt: str, runtime: str = "auto") -> str:
    """The runtime that runs ``path`` (of format ``fmt``): ``runtime``, checked, or the ``"auto"`` choice.

    ``"auto"``: OpenVINO for INT8 ONNX files when it is installed (it runs both quantisers' files in
    int8 and is the faster runtime for them, BENCHMARKS.md), else onnxruntime; torch for pt2/TorchScript.
    """
    check_runtime(runtime)
    if fmt != "onnx":
        if runtime not in ("auto", "torch"):
            raise UserInputError(f"runtime {runtime} cannot run {path} ({fmt}): it runs in torch", fields=("runtime",))
        return "torch"
    if runtime == "torch":
        raise UserInputError(f"runtime torch cannot run {path}: ONNX runs in onnxruntime or openvino",
                             fields=("runtime",))
    if runtime == "auto":
        return "openvino" if _is_int8_with_openvino(path) else "onnxruntime"
    return runtime


def _is_int8_with_openvino(path: Path) -> bool:
    if importlib.util.find_spec("openvino") is None:
        return False
    try:
        return onnx_metadata(path).get("precision") == "int8"
    except Exception:  # noqa: BLE001 - unreadable here: the runtime's loader reports it properly
        return False


def parse_metadata(path: Path, fmt: str, meta: dict[str, str]) -> ExportedFile:
    """The file's metadata entries -> :class:`ExportedFile`; a file without ours is refused in one line."""
    if meta.get("producer") != "ssd300" or "class_names" not in meta:
        raise UserInputError(f"{path}: has no ssd300 export metadata (class names, outputs); "
                             "export it with `ssd300 export`")
    try:
        names = json.loads(meta["class_names"])
        ids = json.loads(meta.get("category_ids", "null")) or list(range(len(names)))
        label_map = LabelMap(tuple(str(n) for n in names), tuple(int(i) for i in ids))
        settings = json.loads(meta["settings"]) if meta.get("settings") else {}
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"{path}: unreadable ssd300 export metadata ({exc})") from None
    raw = [name.strip() for name in meta.get("outputs", "").split(",")] == ["locs", "logits"]
    return ExportedFile(path, fmt, raw, label_map, settings, meta.get("precision", "fp32"))


__all__ = [
    "METADATA_KEYS",
    "RUNTIMES",
    "ExportedFile",
    "check_runtime",
    "format_of",
    "is_exported_file",
    "onnx_metadata",
    "parse_metadata",
    "resolve_runtime",
]
