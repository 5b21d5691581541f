"""A Triton Inference Server model repository for an ONNX file written by ``ssd300 export``.

Layout (what :func:`write_triton_repository` writes under the repository folder)::

    <repository>/<model name>/config.pbtxt    platform "onnxruntime_onnx", max_batch_size,
                                               inputs/outputs, dynamic_batching, instance_group
    <repository>/<model name>/labels.txt      the class names, line i = contiguous label i (0 = background)
    <repository>/<model name>/1/model.onnx    the exported file, copied

Every input and output (name, data type, dims) is read from the ONNX graph itself, so the
config follows whatever the file holds: the full detector (``images`` -> ``boxes``, ``scores``,
``labels``, ``num_detections``), the raw network (``locs``, ``logits``) or an INT8 file. With
``max_batch_size > 0`` Triton owns the first dimension (it batches requests together), so every
tensor's first dimension must be dynamic in the file and is left out of ``dims``; other
symbolic dimensions become ``-1``; a tensor that is only the batch dimension
(``num_detections``) is ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, as Triton's
documentation prescribes. ``labels.txt`` is the ``label_filename`` of the output that holds
classes (``labels``, or ``logits`` for raw files). The file's metadata (class names, category
ids, preprocessing, baked-in thresholds) is repeated as config ``parameters`` so a client can
read it from the server's model config.

The config text is written here (no Triton package needed); the tests parse it strictly into
Triton's own ``ModelConfig`` protobuf message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ssd300.errors import UserInputError
from ssd300.files import PathLike, check_output_path, disk_errors_name, fsync_dir
from ssd300.optional import require

PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
DEFAULT_MODEL_NAME = "ssd300"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 500
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
# Outputs whose values are class indices or per-class scores: they get labels.txt.
CLASS_OUTPUTS = ("labels", "logits")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# onnx.TensorProto element types -> Triton data types (model_config.proto's DataType).
_TRITON_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: ``dims`` without the batch dimension when
    the model batches (``-1`` = any size)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class TritonModel:
    """What :func:`write_triton_repository` wrote."""

    folder: Path
    config_path: Path
    model_path: Path
    labels_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int


def _tensor_specs(values: Any, batched: bool, path: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        data_type = _TRITON_TYPES.get(tensor_type.elem_type)
        if data_type is None:
            raise UserInputError(f"{path}: tensor {value.name!r} has ONNX element type {tensor_type.elem_type}, "
                                 "which Triton has no data type for")
        if not tensor_type.HasField("shape"):
            raise UserInputError(f"{path}: tensor {value.name!r} has no shape in the graph")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        if batched:
            if not dims or dims[0] != -1:
                raise UserInputError(f"{path}: tensor {value.name!r} has a fixed first dimension {dims[:1]}; "
                                     "Triton's batching needs a dynamic batch dimension (use max_batch_size 0)",
                                     fields=("max_batch_size",))
            dims = dims[1:]
        specs.append(TensorSpec(value.name, data_type, tuple(dims)))
    return tuple(specs)


def read_onnx_io(onnx_path: PathLike, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, str]]:
    """(inputs, outputs, metadata) of an ONNX file, dims as Triton's config wants them."""
    onnx = require("onnx", "Triton model repository")
    path = Path(onnx_path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf/IO errors of many kinds: one line
        raise UserInputError(f"{path}: not a readable ONNX file ({' '.join(str(exc).split())[:200]})") from None
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}  # old exporters list weights as inputs too
    batched = max_batch_size > 0
    inputs = _tensor_specs([v for v in graph.input if v.name not in initializers], batched, path)
    outputs = _tensor_specs(graph.output, batched, path)
    return inputs, outputs, {p.key: p.value for p in proto.metadata_props}


def _quote(text: str) -> str:
    # protobuf text format string literal: JSON's escaping is a subset it reads.
    return json.dumps(text, ensure_ascii=False)


def _tensor_block(spec: TensorSpec, label_file: Optional[str]) -> str:
    lines = [f"    name: {_quote(spec.name)}", f"    data_type: {spec.data_type}"]
    if spec.dims == ():
        # A tensor that is only the batch dimension (num_detections: (N,)): Triton wants at least
        # one dim, so [1] per image, reshaped to the model's [] (its documented idiom).
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]")
    if label_file is not None:
        lines.append(f"    label_filename: {_quote(label_file)}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(model_name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                max_batch_size: int, *, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instance_count: int = 1,
                instance_kind: str = "auto", metadata: Optional[dict[str, str]] = None,
                labels_file: Optional[str] = LABELS_FILE) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    label_output = next((spec.name for spec in outputs if spec.name in CLASS_OUTPUTS), None)
    parts = [
        f"name: {_quote(model_name)}",
        f"platform: {_quote(PLATFORM)}",
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(spec, None) for spec in inputs) + "\n]",
        "output [\n" + ",\n".join(
            _tensor_block(spec, labels_file if spec.name == label_output else None) for spec in outputs) + "\n]",
    ]
    if max_batch_size > 0:
        parts.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    kind = INSTANCE_KINDS[instance_kind]
    parts.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]")
    parts.append("version_policy: { latest: { num_versions: 1 } }")
    for key, value in sorted((metadata or {}).items()):
        parts.append(f"parameters: {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(parts) + "\n"


def class_names(metadata: dict[str, str], path: PathLike) -> list[str]:
    """The export's class names (``class_names`` metadata, background first)."""
    try:
        names = json.loads(metadata["class_names"])
    except (KeyError, ValueError):
        raise UserInputError(f"{path}: no class_names metadata; is this a file written by `ssd300 export`?") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserInputError(f"{path}: class_names metadata is not a list of names")
    return names


def check_triton_arguments(model_name: str, max_batch_size: int, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                           instance_count: int = 1, instance_kind: str = "auto") -> None:
    """Validate the settings before any work (errors name the field)."""
    if not _NAME.match(model_name):
        raise UserInputError(f"model_name {model_name!r}: use letters, digits, '_', '-' or '.'",
                             fields=("model_name",))
    if max_batch_size < 0:
        raise UserInputError(f"max_batch_size must be >= 0, got {max_batch_size}", fields=("max_batch_size",))
    if queue_delay_us < 0:
        raise UserInputError(f"queue_delay_us must be >= 0, got {queue_delay_us}", fields=("queue_delay_us",))
    if instance_count < 1:
        raise UserInputError(f"instance_count must be >= 1, got {instance_count}", fields=("instance_count",))
    if instance_kind not in INSTANCE_KINDS:
        raise UserInputError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}",
                             fields=("instance_kind",))


def check_triton_output(repository: PathLike, model_name: str, overwrite: bool = False) -> Path:
    """The model folder ``repository/model_name``; refused if it exists (without ``overwrite``) or
    cannot be written. Call it before slow work."""
    repo = check_output_path(repository, "triton", folder=True)
    folder = repo / model_name
    if (folder.exists() or folder.is_symlink()) and not overwrite:
        raise UserInputError(f"triton {folder}: exists; overwrite replaces that model",
                             fields=("triton", "overwrite"))
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"triton {folder}: exists and is not a folder", fields=("triton",))
    return folder


def write_triton_repository(onnx_path: PathLike, repository: PathLike, model_name: str = DEFAULT_MODEL_NAME,
                            max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, *, overwrite: bool = False,
                            queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instance_count: int = 1,
                            instance_kind: str = "auto") -> TritonModel:
    """Write ``repository/model_name/{config.pbtxt, labels.txt, 1/model.onnx}`` for ``onnx_path``.

    The repository folder may exist (it can hold other models); the model's own folder is refused
    if it exists unless ``overwrite``. The folder is built beside its final place and renamed in,
    so a failure leaves no half-written model for Triton to load.
    """
    check_triton_arguments(model_name, max_batch_size, queue_delay_us, instance_count, instance_kind)
    source = Path(onnx_path)
    folder = check_triton_output(repository, model_name, overwrite)
    inputs, outputs, metadata = read_onnx_io(source, max_batch_size)
    names = class_names(metadata, source)
    with disk_errors_name(folder):
        _write_model_folder(source, folder, model_name, names,
                            config_text(model_name, inputs, outputs, max_batch_size, queue_delay_us=queue_delay_us,
                                        instance_count=instance_count, instance_kind=instance_kind,
                                        metadata=metadata))
    return TritonModel(folder=folder, config_path=folder / CONFIG_FILE, model_path=folder / "1" / MODEL_FILE,
                       labels_path=folder / LABELS_FILE, inputs=inputs, outputs=outputs,
                       max_batch_size=max_batch_size)


def _write_model_folder(source: Path, folder: Path, model_name: str, names: list[str], text: str) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=folder.parent))
    replaced: Optional[Path] = None
    try:
        (scratch / "1").mkdir()
        shutil.copyfile(source, scratch / "1" / MODEL_FILE)
        (scratch / LABELS_FILE).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        (scratch / CONFIG_FILE).write_text(text, encoding="utf-8")
        os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp's 0700 -> the usual folder permissions
        # Moved aside, not deleted first: never half-written, missing only between two renames.
        if folder.exists():
            replaced = scratch.with_name(scratch.name + ".old")
            os.replace(folder, replaced)
        os.replace(scratch, folder)
        fsync_dir(folder.parent)
    except BaseException:
        if replaced is not None and replaced.exists() and not folder.exists():
            os.replace(replaced, folder)  # the previous model back in place
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
