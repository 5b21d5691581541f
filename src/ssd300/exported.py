"""Run files written by ``ssd300 export`` (ONNX fp32/INT8, pt2, TorchScript) with their metadata.

>>> network = load_exported("ssd300.int8.onnx")        # onnxruntime, or runtime="openvino"
>>> network.label_map.names, network.settings           # classes and baked-in thresholds
>>> outputs = network(images)                           # normalised (N, 3, 300, 300) float32
>>> detections = network.detections(outputs)            # full detector -> list[Detections]

The file's metadata (written by :func:`ssd300.export.export_metadata`) names the classes, whether
the file holds the network alone (``locs``, ``logits``) or the whole detector, and the detector's
baked-in post-processing settings. :meth:`ssd300.inference.Detector.from_exported` wraps this
with the shared pre-processing and pixel conversion.

:func:`cached_network_onnx` is the onnxruntime backend's cache: the network exported once per set
of weights into ``$SSD300_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ssd300`` or ``~/.cache/ssd300``),
so building a ``Detector(backend="onnxruntime")`` no longer re-exports every time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ssd300.errors import UserInputError, one_line
from ssd300.labels import LabelMap
from ssd300.postprocess import Detections

PathLike = Union[str, "os.PathLike[str]"]
RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "openvino", "torch")
METADATA_KEYS = ("producer", "class_names", "category_ids", "outputs", "settings", "precision", "quantizer")


@dataclass
class ExportedModel:
    """A loaded export: ``model(images) -> outputs`` as float/int64 CPU tensors, plus what its metadata says."""

    path: Path
    format: str  # "onnx", "pt2" or "torchscript"
    runtime: str  # "onnxruntime", "openvino" or "torch"
    raw: bool  # True: outputs are (locs, logits); False: (boxes, scores, labels, num_detections)
    label_map: LabelMap
    settings: dict[str, float] = field(default_factory=dict)  # baked-in post-processing (full detector)
    precision: str = "fp32"
    _run: Callable[[np.ndarray], list[torch.Tensor]] = field(default=lambda a: [], repr=False)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised float32 (N, 3, 300, 300) -> the file's outputs (CPU tensors)."""
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return self._run(array)

    def detections(self, outputs: list[torch.Tensor]) -> list[Detections]:
        """A full detector's padded outputs -> per-image :class:`Detections` (normalised ltrb boxes)."""
        if self.raw:
            raise ValueError(f"{self.path} holds the network alone: post-process its (locs, logits)")
        boxes, scores, labels, counts = outputs
        return [Detections(boxes[i, :n].float(), scores[i, :n].float(), labels[i, :n].long())
                for i, n in enumerate(counts.long().tolist())]


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


def is_exported_file(path: PathLike) -> bool:
    """Whether ``path`` is an exported model (ONNX, pt2, TorchScript) rather than a training checkpoint."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".onnx", ".pt2"):
        return True
    return path.is_file() and _zip_format(path) is not None


def format_of(path: Path) -> str:
    """"onnx", "pt2" or "torchscript", from the content (the suffix for ONNX)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    fmt = _zip_format(path)
    if fmt is not None:
        return fmt
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"\x08":  # protobuf field 1 (ir_version): how every ONNX file starts
        return "onnx"
    raise UserInputError(f"{path}: not an ONNX, pt2 or TorchScript file written by ssd300 export")


def load_exported(path: PathLike, runtime: str = "auto", threads: Optional[int] = None) -> ExportedModel:
    """Load an exported file; ``runtime`` picks onnxruntime or OpenVINO for ONNX files.

    ``"auto"``: OpenVINO for INT8 files when it is installed, else onnxruntime; torch for pt2/TorchScript.
    """
    path = Path(path).expanduser()
    if runtime not in RUNTIMES:
        raise UserInputError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not path.is_file():
        raise UserInputError(f"{path}: no such exported model file")
    fmt = format_of(path)
    if fmt == "onnx":
        if runtime == "torch":
            raise UserInputError(f"--runtime torch cannot run {path}: ONNX runs in onnxruntime or openvino")
        if runtime == "auto" and _prefers_openvino(path):
            runtime = "openvino"
        if runtime == "openvino":
            run, meta = _openvino_runner(path, threads)
        else:
            runtime = "onnxruntime"
            run, meta = _onnxruntime_runner(path, threads)
    else:
        if runtime not in ("auto", "torch"):
            raise UserInputError(f"--runtime {runtime} cannot run {path} ({fmt}): it runs in torch")
        runtime = "torch"
        run, meta = _torch_runner(path, fmt)
    return _from_metadata(path, fmt, runtime, run, meta)


def _prefers_openvino(path: Path) -> bool:
    """INT8 files run on OpenVINO when it is installed: it runs both quantisers' files in int8 and
    is the faster runtime for them (BENCHMARKS.md); fp32 files stay on onnxruntime."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return False
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - unreadable here: the runtime's loader reports it properly
        return False
    return meta.get("precision") == "int8"


def _from_metadata(path: Path, fmt: str, runtime: str, run: Callable[[np.ndarray], list[torch.Tensor]],
                   meta: dict[str, str]) -> ExportedModel:
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
    return ExportedModel(path, fmt, runtime, raw, label_map, settings, meta.get("precision", "fp32"), run)


def _as_tensors(arrays: list[Any]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a)) for a in arrays]


def _onnxruntime_runner(path: Path, threads: Optional[int]) -> tuple[Callable[[np.ndarray], list[torch.Tensor]],
                                                                   dict[str, str]]:
    try:
        import onnxruntime
    except ImportError:
        raise UserInputError(f"{path}: running ONNX files needs onnxruntime: pip install 'ssd300[onnx]'") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise UserInputError(f"{path}: onnxruntime cannot load it ({one_line(exc)})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)

    def run(images: np.ndarray) -> list[torch.Tensor]:
        return _as_tensors(session.run(None, {"images": images}))

    return run, meta


def _openvino_runner(path: Path, threads: Optional[int]) -> tuple[Callable[[np.ndarray], list[torch.Tensor]],
                                                                dict[str, str]]:
    try:
        import openvino
    except ImportError:
        raise UserInputError(f"{path}: --runtime openvino needs openvino: pip install openvino") from None
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    # f32: OpenVINO would otherwise pick bf16 for the float parts on CPUs that have it (scores and
    # NMS then differ from the fp32 file); the quantised convolutions run in int8 either way.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    outputs = compiled.outputs

    def run(images: np.ndarray) -> list[torch.Tensor]:
        result = compiled(images)
        return _as_tensors([result[port] for port in outputs])

    return run, meta


def _torch_runner(path: Path, fmt: str) -> tuple[Callable[[np.ndarray], list[torch.Tensor]], dict[str, str]]:
    import torchvision  # noqa: F401  (registers torchvision::nms, which the saved graphs call)

    extra = {f"{key}.txt": "" for key in METADATA_KEYS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation: the user chose this file
            if fmt == "pt2":
                module = torch.export.load(str(path), extra_files=extra).module()
            else:
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign/broken files
        raise UserInputError(f"{path}: torch cannot load it as {fmt} ({one_line(exc)})") from None
    meta = {key[:-4]: value.decode() if isinstance(value, bytes) else value
            for key, value in extra.items() if value}

    def run(images: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach() for t in module(torch.from_numpy(images))]

    return run, meta


# ----------------------------------------------------------------------------- onnxruntime backend cache


def cache_dir() -> Path:
    """``$SSD300_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssd300``, else ``~/.cache/ssd300``."""
    if os.environ.get("SSD300_CACHE_DIR"):
        return Path(os.environ["SSD300_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssd300"


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's architecture and weights (what the exported network depends on)."""
    digest = hashlib.blake2b(f"{type(model).__name__}|{getattr(model, 'backbone_name', '')}|"
                            f"{getattr(model, 'num_classes', '')}|{torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def cached_network_onnx(model: nn.Module, folder: Optional[PathLike] = None) -> Path:
    """The raw fp32 network (BatchNorm folded) as ONNX, exported once per weights and reused.

    Written atomically (temp file + rename), so concurrent processes never read a partial file.
    """
    from ssd300.export import build_export_module, export_onnx

    target = Path(folder) if folder is not None else cache_dir()
    path = target / f"ssd300-network-{weights_digest(model)}.onnx"
    if path.is_file():
        return path
    target.mkdir(parents=True, exist_ok=True)
    module = build_export_module(copy.deepcopy(model).float(), raw=True)  # the caller's model stays as it is
    with tempfile.TemporaryDirectory(prefix="ssd300-ort-", dir=target) as scratch:
        written = export_onnx(module, Path(scratch) / path.name, raw=True, exporter="legacy")
        os.replace(written, path)
    return path


__all__ = [
    "RUNTIMES",
    "ExportedModel",
    "cache_dir",
    "cached_network_onnx",
    "format_of",
    "is_exported_file",
    "load_exported",
]
