"""Runners: one class per backend that runs SSD300 on images already preprocessed.

A :class:`Runner` takes a normalised float32 ``(N, 3, 300, 300)`` batch
(:class:`ssd300.data.transforms.EvalTransform`) and gives either the network's raw ``(locs,
logits)`` (float32) or, for an exported file that holds the whole detector, per-image
:class:`~ssd300.postprocess.Detections`; :meth:`Runner.detect` hides which, so
:class:`ssd300.inference.Detector` is preprocessing + one runner + post-processing.
:meth:`Runner.describe` is one line: backend, device, precision, file.

=========================  ==============================================================
``TorchRunner``            a PyTorch model: CPU/CUDA, fp32/bf16/fp16, channels-last, all as
                           :class:`ssd300.runtime.Runtime` decides; BatchNorm folded, on a copy
``OnnxRuntimeRunner``      an ONNX file, or a model exported once per weights into the cache
                           (:func:`cached_network_onnx`); execution providers from the device
                           (:func:`onnxruntime_providers`: CPU; TensorRT/CUDA on a CUDA device)
``OpenVinoRunner``         an ONNX file (fp32 or INT8 QDQ) on OpenVINO's CPU plugin
``ExportedProgramRunner``  a ``.pt2`` file (``torch.export``)
``TorchScriptRunner``      a TorchScript file
=========================  ==============================================================

The factories: :func:`build_runner` (a model and a backend name, :data:`MODEL_BACKENDS`, or a
runner already built, checked against the runtime) and :func:`load_exported` (a file; the format
and the runtime pick the class, :data:`FILE_RUNNERS`). Adding a backend is one class and one
entry in one of these tables.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ssd300.errors import UserInputError, one_line
from ssd300.exported import (
    METADATA_KEYS,
    ExportedFile,
    check_runtime,
    format_of,
    onnx_metadata,
    parse_metadata,
    resolve_runtime,
)
from ssd300.files import PathLike, cache_dir
from ssd300.labels import LabelMap
from ssd300.optional import require
from ssd300.postprocess import Detections, PostprocessConfig, PostProcessor, boxes_to_pixels, padded_to_detections
from ssd300.runtime import Runtime, resolve_device, usable_cores

Provider = Union[str, tuple[str, dict[str, Any]]]
CPU = torch.device("cpu")


class Runner(ABC):
    """Runs the network (or a whole exported detector) on a preprocessed batch; see the module docstring."""

    backend: ClassVar[str]
    device: torch.device  # where the input batch should be
    raw: bool = True  # outputs (locs, logits); False: the runner's outputs are detections
    file: Optional[ExportedFile] = None  # the exported file the user gave, if any
    label_map: Optional[LabelMap] = None  # the classes the runner knows (an exported file's)

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @abstractmethod
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(locs (N, 4, A), logits (N, C, A)) float32; ValueError for a runner without raw outputs."""

    @abstractmethod
    def describe(self) -> str:
        """One line: backend, device, precision, file."""

    def detect(self, images: torch.Tensor, postprocessor: PostProcessor,
               image_sizes: torch.Tensor) -> list[Detections]:
        """Per-image detections with ``boxes_pixels`` for images of (width, height) ``image_sizes``."""
        locs, logits = self.forward(images)
        return postprocessor(locs, logits, image_sizes.to(locs.device))

    def check_postprocess(self, config: PostprocessConfig) -> None:
        """Refuse post-processing settings the runner cannot honour (a detector's baked-in ones)."""
        return None  # raw outputs: the caller post-processes them with any settings


# ----------------------------------------------------------------------------- PyTorch


class TorchRunner(Runner):
    """A PyTorch model, run as :class:`~ssd300.runtime.Runtime` decides (see :mod:`ssd300.runtime`).

    Works on a copy (the caller's model keeps its mode, device and dtype); folding BatchNorm into
    the convolutions (``fuse``) gives the same outputs with fewer kernels. On a CPU with bf16 the
    whole network is cast to bf16 (faster than autocast's per-op casts); CUDA autocasts to fp16.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, runtime: Runtime, *, fuse: bool = True) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.bf16 = runtime.dtype is torch.bfloat16 and self.device.type == "cpu"
        self.channels_last = runtime.channels_last(training=False)
        self.fused = fuse and hasattr(model, "fuse")
        self._num_classes = int(getattr(model, "num_classes"))  # noqa: B009 - an int attribute
        self.name = f"{type(model).__name__}({getattr(model, 'backbone_name', '')})"
        model = model.fuse() if self.fused else copy.deepcopy(model).eval()  # type: ignore[operator]
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.bf16:
            model = model.to(torch.bfloat16)
        self.model = model

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _autocast(self) -> ContextManager[Any]:
        # CPU bf16 casts the weights instead (see the class docstring); CUDA fp16 autocasts.
        return self.runtime.autocast() if self.device.type == "cuda" else nullcontext()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            images = images.to(torch.bfloat16)
        with torch.inference_mode(), self._autocast():
            locs, logits = self.model(images)
        return locs.float(), logits.float()

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        folded = "BatchNorm folded" if self.fused else "BatchNorm kept"
        return f"torch: {self.device}, {self.runtime.precision}, {layout}, {folded}, model {self.name}"


# ----------------------------------------------------------------------------- exported files


class FileRunner(Runner):
    """A runner of an exported file: its outputs are what its metadata (:class:`ExportedFile`) says.

    Calling it gives the file's outputs as CPU tensors; a full-detector file's post-processing
    is baked in, so :meth:`detect` only applies the stricter of the caller's limits.
    """

    def __init__(self, info: ExportedFile, device: torch.device, *, user_file: bool = True) -> None:
        self.info = info
        self.device = device
        self.raw = info.raw
        self.label_map = info.label_map
        self.file = info if user_file else None

    # What the file is (the names of the former ExportedModel).
    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def format(self) -> str:
        return self.info.format

    @property
    def precision(self) -> str:
        return self.info.precision

    @property
    def settings(self) -> dict[str, float]:
        return self.info.settings

    @property
    def baked_settings(self) -> dict[str, float]:
        """The post-processing baked into a full-detector file (the defaults it runs with); {} when raw."""
        return {} if self.raw else dict(self.info.settings)

    @property
    def runtime(self) -> str:
        return self.backend

    @property
    def num_classes(self) -> int:
        return self.info.label_map.num_classes

    @abstractmethod
    def _run(self, images: np.ndarray) -> list[torch.Tensor]:
        """float32 (N, 3, 300, 300) -> the file's outputs."""

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised float32 (N, 3, 300, 300) -> the file's outputs (CPU tensors)."""
        return self._run(images.detach().to("cpu", torch.float32).contiguous().numpy())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.raw:
            raise ValueError(f"{self.path} holds the whole detector; it has no (locs, logits)")
        locs, logits = self(images)
        return locs.float(), logits.float()

    def detections(self, outputs: Sequence[torch.Tensor]) -> list[Detections]:
        """A full detector's padded outputs -> per-image :class:`Detections` (normalised ltrb boxes)."""
        if self.raw:
            raise ValueError(f"{self.path} holds the network alone: post-process its (locs, logits)")
        return padded_to_detections(outputs)

    def detect(self, images: torch.Tensor, postprocessor: PostProcessor,
               image_sizes: torch.Tensor) -> list[Detections]:
        if self.raw:
            return super().detect(images, postprocessor, image_sizes)
        post = postprocessor.config
        return [_limit(d, post.score_threshold, post.max_detections, size)
                for d, size in zip(self.detections(self(images)), image_sizes)]

    def check_postprocess(self, config: PostprocessConfig) -> None:
        if self.raw:
            return
        baked = self.settings
        problems = [
            f"score threshold {config.score_threshold} < the file's {baked['score_threshold']}"
            if config.score_threshold < baked.get("score_threshold", 0.0) - 1e-9 else "",
            f"IoU threshold {config.iou_threshold} != the file's {baked['iou_threshold']}"
            if abs(config.iou_threshold - baked.get("iou_threshold", config.iou_threshold)) > 1e-9 else "",
            f"max detections {config.max_detections} > the file's {baked['max_detections']}"
            if config.max_detections > baked.get("max_detections", config.max_detections) else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise UserInputError(f"{self.path}: has its post-processing baked in ({'; '.join(problems)}); "
                                 "re-export with those settings or export with raw outputs",
                                 fields=("score_threshold", "iou_threshold", "max_detections"))

    def describe(self) -> str:
        return f"{self.backend}: {self.device}, {self.precision}, {self.format} {self.path}"


def _limit(detections: Detections, score_threshold: float, max_detections: int, image_size: torch.Tensor) -> Detections:
    """An exported detector's detections (best first, clipped in the file) above ``score_threshold``,
    at most ``max_detections``, with their pixel boxes for an image of ``image_size`` (width, height)."""
    keep = torch.nonzero(detections.scores > score_threshold).flatten()[:max_detections]
    boxes = detections.boxes[keep]
    return Detections(boxes, detections.scores[keep], detections.labels[keep], boxes_to_pixels(boxes, image_size))


def _as_tensors(arrays: Sequence[Any]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a)) for a in arrays]


def _cpu_only(backend: str, path: Path, device: torch.device) -> None:
    if device.type != "cpu":
        raise UserInputError(f"device {device}: {backend} runs {path.name} on the CPU", fields=("device",))


def onnxruntime_providers(device: torch.device, available: Sequence[str]) -> list[Provider]:
    """onnxruntime's execution providers for ``device``: the CPU's; on CUDA, TensorRT then CUDA
    (those this onnxruntime build has), the CPU last for any op they lack."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    options = {"device_id": device.index or 0}
    gpu: list[Provider] = [(name, options) for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                           if name in available]
    if not gpu:
        raise UserInputError(f"device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                             "install onnxruntime-gpu or run on the CPU", fields=("device",))
    return [*gpu, "CPUExecutionProvider"]


class OnnxRuntimeRunner(FileRunner):
    """An ONNX file in onnxruntime, providers from the device (:func:`onnxruntime_providers`)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, device: torch.device = CPU, threads: Optional[int] = None,
                 *, network: Optional[ExportedFile] = None) -> None:
        onnxruntime = require("onnxruntime", f"running {path.name}")
        providers = onnxruntime_providers(device, onnxruntime.get_available_providers())
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise UserInputError(f"{path}: onnxruntime cannot load it ({one_line(exc)})") from None
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]
        info = network or parse_metadata(path, "onnx", dict(self.session.get_modelmeta().custom_metadata_map))
        super().__init__(info, device, user_file=network is None)

    @classmethod
    def for_model(cls, model: nn.Module, runtime: Runtime, *, fuse: bool = True) -> "OnnxRuntimeRunner":
        """A model's network (fp32, BatchNorm folded) exported once per weights (:func:`cached_network_onnx`)."""
        if runtime.dtype is not None:
            raise UserInputError(f"backend onnxruntime runs the network in fp32, amp asks for {runtime.precision}: "
                                 "turn amp off", fields=("backend", "amp"))
        try:
            require("onnx", "backend onnxruntime exports the network to ONNX first")
            require("onnxruntime", "backend onnxruntime")
        except UserInputError as missing:
            raise UserInputError(str(missing), fields=("backend",)) from None
        path = cached_network_onnx(model)
        num_classes = int(getattr(model, "num_classes"))  # noqa: B009 - an int attribute
        return cls(path, runtime.device, network=ExportedFile(path, "onnx", True, LabelMap.generic(num_classes)))

    def _run(self, images: np.ndarray) -> list[torch.Tensor]:
        return _as_tensors(self.session.run(None, {"images": images}))

    def describe(self) -> str:
        return f"onnxruntime: {self.device} ({', '.join(self.providers)}), {self.precision}, {self.path}"


class OpenVinoRunner(FileRunner):
    """An ONNX file on OpenVINO's CPU plugin (INT8 QDQ files run in int8)."""

    backend = "openvino"

    def __init__(self, path: Path, device: torch.device = CPU, threads: Optional[int] = None) -> None:
        _cpu_only(self.backend, path, device)
        try:
            import openvino
        except ImportError:
            raise UserInputError(f"{path}: runtime openvino needs openvino: pip install openvino",
                                 fields=("runtime",)) from None
        info = parse_metadata(path, "onnx", onnx_metadata(path))
        # f32: OpenVINO would otherwise pick bf16 for the float parts on CPUs that have it (scores and
        # NMS then differ from the fp32 file); the quantised convolutions run in int8 either way.
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
            if threads < len(usable_cores()):
                # A share of cores that other processes use too: pinned, every such process's threads
                # would sit on the same first cores and take turns (2 server workers x 1 thread on 2
                # cores: 26 images/s pinned, 45 not). A server worker is given its own cores
                # (ssd300.serving.claim_worker_cores) and keeps OpenVINO's pinning. Known hazard
                # (OpenVINO 2026.4): with pinning off, a process whose Python code handles SIGCHLD (a
                # torch DataLoader with workers installs such a handler) can die of SIGSEGV when a
                # child exits later.
                config["ENABLE_CPU_PINNING"] = False
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        super().__init__(info, device)

    def _run(self, images: np.ndarray) -> list[torch.Tensor]:
        result = self.compiled(images)
        return _as_tensors([result[port] for port in self.compiled.outputs])


class _TorchFileRunner(FileRunner):
    """A file torch loads itself (pt2, TorchScript); the metadata is in the archive's extra files."""

    format_name: ClassVar[str]

    def __init__(self, path: Path, device: torch.device = CPU, threads: Optional[int] = None) -> None:
        _cpu_only(self.backend, path, device)
        import torchvision  # noqa: F401  (registers torchvision::nms, which the saved graphs call)

        extra = {f"{key}.txt": "" for key in METADATA_KEYS}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation: the user chose this file
                self.module = self._load(path, extra)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign/broken files
            raise UserInputError(f"{path}: torch cannot load it as {self.format_name} ({one_line(exc)})") from None
        meta = {key[:-4]: value.decode() if isinstance(value, bytes) else value
                for key, value in extra.items() if value}
        super().__init__(parse_metadata(path, self.format_name, meta), device)

    @abstractmethod
    def _load(self, path: Path, extra: dict[str, Any]) -> Callable[..., Any]: ...

    def _run(self, images: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach() for t in self.module(torch.from_numpy(images))]


class ExportedProgramRunner(_TorchFileRunner):
    """A ``.pt2`` file: a ``torch.export`` ExportedProgram."""

    backend = "torch"
    format_name = "pt2"

    def _load(self, path: Path, extra: dict[str, Any]) -> Callable[..., Any]:
        return torch.export.load(str(path), extra_files=extra).module()


class TorchScriptRunner(_TorchFileRunner):
    """A TorchScript file (traced)."""

    backend = "torch"
    format_name = "torchscript"

    def _load(self, path: Path, extra: dict[str, Any]) -> Callable[..., Any]:
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra)


# ----------------------------------------------------------------------------- factories

# Backend name -> how a model is run by it (``Detector(model, backend=...)``, ``ssd300 detect --backend``).
MODEL_BACKENDS: dict[str, Callable[..., Runner]] = {
    "torch": TorchRunner,
    "onnxruntime": OnnxRuntimeRunner.for_model,
}
BACKENDS: tuple[str, ...] = tuple(MODEL_BACKENDS)
# (file format, runtime) -> the runner class of an exported file.
FILE_RUNNERS: dict[tuple[str, str], Callable[..., FileRunner]] = {
    ("onnx", "onnxruntime"): OnnxRuntimeRunner,
    ("onnx", "openvino"): OpenVinoRunner,
    ("pt2", "torch"): ExportedProgramRunner,
    ("torchscript", "torch"): TorchScriptRunner,
}


def build_runner(model: Union[nn.Module, Runner], runtime: Runtime, *, backend: str = "torch", fuse: bool = True,
                 device: Union[str, torch.device, None] = None) -> Runner:
    """The runner of ``model`` under ``runtime``: a model is run by ``backend``; a runner already
    built (an exported file's) is checked against the requests it cannot follow (``device``, the
    device asked for explicitly; amp; backend), each refused in one line."""
    if isinstance(model, Runner):
        where = model.file.path if model.file is not None else model.describe()
        if backend != "torch":
            raise UserInputError(f"{where}: backend does not apply to an exported file; pick its runtime instead",
                                 fields=("backend",))
        if runtime.amp_requested or runtime.dtype is not None:
            raise UserInputError(f"{where}: amp/bf16 do not apply to an exported file "
                                 f"(its precision is {getattr(model, 'precision', 'fixed')})", fields=("amp",))
        if device not in (None, "", "auto") and runtime.device != model.device:
            raise UserInputError(f"device {device}: {where} was loaded for {model.device}", fields=("device",))
        return model
    if backend not in MODEL_BACKENDS:
        raise UserInputError(f"backend must be one of {', '.join(MODEL_BACKENDS)}, got {backend!r}",
                             fields=("backend",))
    return MODEL_BACKENDS[backend](model, runtime, fuse=fuse)


def load_exported(path: PathLike, runtime: str = "auto", threads: Optional[int] = None,
                  device: Union[str, torch.device, None] = None) -> FileRunner:
    """The runner of a file written by ``ssd300 export``; ``runtime`` picks onnxruntime or OpenVINO
    for ONNX files (``"auto"``: :func:`ssd300.exported.resolve_runtime`). ``device`` (default the
    CPU, also for ``"auto"``): a CUDA device runs ONNX files on onnxruntime's CUDA/TensorRT providers."""
    path = Path(path).expanduser()
    check_runtime(runtime)
    if not path.is_file():
        raise UserInputError(f"{path}: no such exported model file")
    fmt = format_of(path)
    chosen = resolve_runtime(path, fmt, runtime)
    where = torch.device("cpu") if device in (None, "", "auto") else resolve_device(device)
    return FILE_RUNNERS[(fmt, chosen)](path, where, threads)


# ----------------------------------------------------------------------------- the onnxruntime backend's cache


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
    """The raw fp32 network (BatchNorm folded) as ONNX, exported once per weights into
    ``cache_dir("onnx")`` (:func:`ssd300.files.cache_dir`) and reused.

    Written atomically (:func:`ssd300.export.export_onnx`), so concurrent processes never read a partial file.
    """
    from ssd300.export import build_export_module, export_onnx

    target = Path(folder) if folder is not None else cache_dir("onnx")
    path = target / f"ssd300-network-{weights_digest(model)}.onnx"
    if path.is_file():
        return path
    module = build_export_module(copy.deepcopy(model).float(), raw=True)  # the caller's model stays as it is
    return export_onnx(module, path, raw=True, exporter="legacy")


__all__ = [
    "BACKENDS",
    "FILE_RUNNERS",
    "MODEL_BACKENDS",
    "ExportedProgramRunner",
    "FileRunner",
    "OnnxRuntimeRunner",
    "OpenVinoRunner",
    "Runner",
    "TorchRunner",
    "TorchScriptRunner",
    "build_runner",
    "cached_network_onnx",
    "load_exported",
    "onnxruntime_providers",
    "weights_digest",
]
