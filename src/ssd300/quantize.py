"""INT8 post-training static quantisation of the exported network (ONNX QDQ), calibrated on the user's images.

Only the network (ResNet trunk, additional blocks, heads) is quantised: box decoding, softmax and
NMS stay float32, so the INT8 file has the fp32 export's inputs, outputs and metadata. The steps:

1. the network alone (BatchNorm folded) is exported to ONNX (``locs``, ``logits``);
2. it is calibrated on ``--calibration`` images preprocessed by the shared
   :class:`ssd300.data.transforms.EvalTransform` and quantised to QDQ form: per-channel int8
   weights, uint8 activations (min/max ranges);
3. unless ``raw``, the float post-processing graph
   (:class:`ssd300.postprocess.ExportablePostprocess`) is exported on its own and joined to the
   quantised network's outputs (``onnx.compose``), giving one file.

Two quantisers write that QDQ file (``"auto"``, the default, picks NNCF when it is installed, else
onnxruntime's): ``"onnxruntime"`` (
``onnxruntime.quantization.quantize_static``, min/max ranges merged batch by batch; the loc/conf
head convolutions and what follows them stay float, see :func:`head_and_tail_nodes`) and
``"nncf"`` (NNCF's ONNX backend: int8 convolution inputs and weights everywhere, heads included,
with fast bias correction). Both files run in onnxruntime and in OpenVINO, which reads QDQ ONNX and
runs it in int8 (:mod:`ssd300.exported` picks OpenVINO for INT8 files when it is installed).
Measured on the demo model (50 validation images): both within 0.5 AP of fp32; the onnxruntime
quantiser's file reproduces 22 of fp32's 24 confident detections at IoU >= 0.9, NNCF's 17.
Speed decides the default: on a 2-core AVX-512 VNNI EPYC at batch 8 (ResNet-50), NNCF's file on
OpenVINO runs 38.0 img/s against 21.9 for the onnxruntime quantiser's (its float heads cost ~4 GMAC),
at equal accuracy (both within 0.5 AP). BENCHMARKS.md holds the accuracy and speed figures.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssd300.data.images import is_image_file
from ssd300.errors import UserInputError
from ssd300.files import DiskError, PathLike, find_disk_error
from ssd300.labels import LabelMap
from ssd300.postprocess import Detections, ExportablePostprocess, PostprocessConfig

log = logging.getLogger(__name__)

QUANTIZERS: tuple[str, ...] = ("nncf", "onnxruntime")
QUANTIZER_CHOICES: tuple[str, ...] = ("auto", *QUANTIZERS)
DEFAULT_CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8


# ----------------------------------------------------------------------------- calibration data


def calibration_files(source: PathLike, count: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """``calibration`` -> up to ``count`` image files, spread evenly over the sorted list.

    ``source`` is a folder of images, or a dataset folder (COCO, VOC or YOLO: ``ssd300 train --data``
    layout), whose training images are used (the validation split only when there is no training
    split, so that a later evaluation on it stays honest).
    """
    root = Path(source).expanduser()
    if count < 1:
        raise UserInputError(f"calibration_images must be >= 1, got {count}", fields=("calibration_images",))
    if not root.is_dir():
        raise UserInputError(f"calibration {root}: not a folder of images or a COCO-format dataset",
                             fields=("calibration",))
    from ssd300.data.layouts import dataset_image_files

    files = dataset_image_files(root)  # a dataset folder (COCO, VOC, YOLO): its training images
    if files is None:
        files = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise UserInputError(f"calibration {root}: holds no image files", fields=("calibration",))
    if len(files) > count:
        picks = np.linspace(0, len(files) - 1, count).round().astype(int)
        files = [files[i] for i in dict.fromkeys(picks.tolist())]
    return files


def calibration_batches(files: Sequence[PathLike], batch_size: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """Model-ready float32 (B, 3, 300, 300) batches through the shared evaluation transform.

    Unreadable files are skipped with a warning (a calibration set is a sample; one bad file
    should not stop the export); none readable is an error.
    """
    from ssd300.data.images import DECODE_ERRORS, open_image, to_rgb
    from ssd300.data.transforms import EvalTransform

    transform = EvalTransform()
    pending: list[torch.Tensor] = []
    used = 0
    for path in files:
        try:
            image = to_rgb(open_image(path))
        except DECODE_ERRORS as exc:
            log.warning("calibration: skipping %s (%s)", path, exc)
            continue
        pending.append(transform.resize_uint8(image))
        used += 1
        if len(pending) == batch_size:
            yield transform.normalize(torch.stack(pending)).numpy()
            pending = []
    if pending:
        yield transform.normalize(torch.stack(pending)).numpy()
    if used == 0:
        raise UserInputError(f"calibration: none of the {len(files)} files is a readable image",
                             fields=("calibration",))


# ----------------------------------------------------------------------------- float post-processing graph


def export_postprocess_onnx(path: PathLike, num_classes: int, opset: int,
                            config: PostprocessConfig | None = None) -> Path:
    """Write the fp32 export's post-processing (:class:`ssd300.postprocess.ExportablePostprocess`,
    the same module :class:`ssd300.export.ExportableDetector` runs after its network) as ONNX
    (legacy exporter: ``nms`` maps to ``NonMaxSuppression``)."""
    from ssd300.export import FULL_OUTPUT_NAMES

    graph = ExportablePostprocess(config).eval()
    generator = torch.Generator().manual_seed(0)
    locs = torch.randn(2, 4, 8732, generator=generator)
    logits = torch.randn(2, num_classes, 8732, generator=generator)
    dynamic = {name: {0: "batch"} for name in ("locs", "logits", *FULL_OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (locs, logits), str(path), dynamo=False, opset_version=opset,
                          input_names=["locs", "logits"], output_names=list(FULL_OUTPUT_NAMES),
                          dynamic_axes=dynamic, do_constant_folding=True)
    return Path(path)


# ----------------------------------------------------------------------------- quantisation


def resolve_quantizer(quantizer: str = "auto") -> str:
    """A valid ``--quantizer`` name (the one place that checks it); ``auto``: NNCF when installed
    (the faster INT8 file, see the module docstring), else onnxruntime's quantiser."""
    if quantizer == "auto":
        from ssd300.optional import available

        return "nncf" if available("nncf") else "onnxruntime"
    if quantizer not in QUANTIZERS:
        raise UserInputError(f"quantizer must be one of {', '.join(QUANTIZER_CHOICES)}, got {quantizer!r}",
                             fields=("quantizer",))
    return quantizer


def quantize_network_onnx(fp32_path: PathLike, out: PathLike, files: Sequence[PathLike],
                          quantizer: str = "auto") -> Path:
    """The raw fp32 network ONNX -> QDQ INT8 ONNX calibrated on ``files``."""
    quantizer = resolve_quantizer(quantizer)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserInputError("INT8 quantisation needs onnxruntime: pip install 'ssd300[onnx]'") from None
    out = Path(out)
    if quantizer == "nncf":
        return _quantize_nncf(Path(fp32_path), out, files)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        """Batches decoded on demand; ``set_range`` is onnxruntime's strided calibration hook."""

        def __init__(self) -> None:
            self.groups = [files[i:i + CALIBRATION_BATCH] for i in range(0, len(files), CALIBRATION_BATCH)]
            self.set_range(0, len(self.groups))

        def __len__(self) -> int:
            return len(self.groups)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = (batch for group in self.groups[start_index:end_index]
                            for batch in calibration_batches(group, CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepared = out.with_name(out.stem + ".pre.onnx")
    try:
        with _quiet():
            quant_pre_process(str(fp32_path), str(prepared))
            import onnx

            float_nodes = head_and_tail_nodes(onnx.load(str(prepared)))
            # Strided min/max: the ranges are merged after every batch, so memory stays that of one
            # batch's activations (onnxruntime keeps every intermediate tensor until it computes them).
            quantize_static(str(prepared), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"CalibStridedMinMax": 1},
                            nodes_to_exclude=float_nodes)
    finally:
        prepared.unlink(missing_ok=True)
    return out


def head_and_tail_nodes(model: Any) -> list[str]:
    """Names of the loc/conf head convolutions (Conv nodes that reach the outputs without another
    Conv) and of every node after them (reshapes, concatenations).

    They stay float in the onnxruntime quantiser's file: it would otherwise quantise the heads'
    outputs and the concatenated ``logits`` to uint8 with one range over all 8732 anchors; trained
    logits span hundreds to thousands, so the steps (~10) erase the differences between classes
    and the softmax turns uniform. NNCF quantises only convolution inputs, so its heads run int8
    with float outputs.
    """
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def downstream(node: Any) -> list[Any]:
        found, stack, seen = [], [node], {id(node)}
        while stack:
            for output in stack.pop().output:
                for nxt in consumers.get(output, []):
                    if id(nxt) not in seen:
                        seen.add(id(nxt))
                        found.append(nxt)
                        stack.append(nxt)
        return found

    excluded: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        after = downstream(node)
        if not any(n.op_type == "Conv" for n in after):
            excluded.update(dict.fromkeys([node.name, *(n.name for n in after)]))
    return list(excluded)


def _quantize_nncf(fp32_path: Path, out: Path, files: Sequence[PathLike]) -> Path:
    try:
        import nncf
    except ImportError:
        raise UserInputError("quantizer nncf needs nncf: pip install nncf", fields=("quantizer",)) from None
    import onnx

    batches = list(calibration_batches(files))
    # NNCF feeds items one by one; per-image items keep its subset size in images.
    items = [image[None] for batch in batches for image in batch]
    with _quiet():
        quantized = nncf.quantize(onnx.load(str(fp32_path)), nncf.Dataset(items, lambda x: {"images": x}),
                                  subset_size=len(items))
    onnx.save(quantized, str(out))
    return out


def attach_postprocess(network_path: PathLike, out: PathLike, num_classes: int, opset: int,
                       config: PostprocessConfig | None = None) -> Path:
    """Join a (quantised) raw network file and the float post-processing graph into one ONNX file."""
    import onnx
    from onnx import compose

    network = onnx.load(str(network_path))
    with tempfile.TemporaryDirectory(prefix="ssd300-post-") as folder:
        post = onnx.load(str(export_postprocess_onnx(Path(folder) / "post.onnx", num_classes, opset, config)))
    # onnx.compose wants equal IR versions and opsets; the quantiser may have raised the network's.
    post.ir_version = network.ir_version = max(network.ir_version, post.ir_version)
    versions = {entry.domain: entry.version for entry in network.opset_import}
    for entry in post.opset_import:
        versions[entry.domain] = max(entry.version, versions.get(entry.domain, entry.version))
    for model in (network, post):
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    post = compose.add_prefix(post, prefix="post/", rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(network, post, io_map=[("locs", "locs"), ("logits", "logits")])
    onnx.save(merged, str(out))
    return Path(out)


def export_int8(model: nn.Module, label_map: LabelMap, out: PathLike, calibration: PathLike,
                calibration_images: int = DEFAULT_CALIBRATION_IMAGES, raw: bool = False, opset: int = 18,
                quantizer: str = "auto", exporter: str = "legacy", config: PostprocessConfig | None = None,
                **overrides: float) -> Path:
    """SSD300 -> INT8 ONNX file with the fp32 export's inputs, outputs and metadata (see the module docstring).

    ``config``/``overrides``: the post-processing baked in, as for
    :func:`ssd300.export.build_export_module` (ignored with ``raw``). The metadata adds
    ``precision=int8``, the quantiser and the number of calibration images.
    """
    from ssd300.export import build_export_module, export_metadata, export_onnx, write_onnx_metadata

    files = calibration_files(calibration, calibration_images)  # before the slow steps: bad input fails fast
    quantizer = resolve_quantizer(quantizer)
    config = (config or PostprocessConfig()).replace(**overrides)  # validated before the slow part
    module = build_export_module(model, raw=raw, config=config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    num_classes = int(getattr(model, "num_classes"))  # noqa: B009 - an int attribute, not a module
    with tempfile.TemporaryDirectory(prefix="ssd300-int8-") as folder, _scratch_space(Path(folder), out):
        network = module if raw else build_export_module(model, raw=True)
        fp32 = export_onnx(network, Path(folder) / "network.onnx", raw=True, opset=opset, exporter=exporter)
        quantized = quantize_network_onnx(fp32, Path(folder) / "network.int8.onnx", files, quantizer)
        assembled = Path(folder) / "detector.int8.onnx"
        if raw:
            assembled = quantized
        else:
            attach_postprocess(quantized, assembled, num_classes, opset, config)
        metadata = {**export_metadata(module, label_map, raw), "precision": "int8", "quantizer": quantizer,
                    "calibration_images": str(len(files))}
        write_onnx_metadata(assembled, metadata, out)
    log.info("INT8 export calibrated on %d images from %s", len(files), calibration)
    return out


@contextlib.contextmanager
def _scratch_space(folder: Path, out: Path) -> Iterator[None]:
    """The INT8 steps write their intermediate files in ``folder`` (the system's temp folder): a
    disk that refuses them is one line naming ``out`` and that folder, never a traceback; the
    final write to ``out`` names ``out`` alone (:func:`ssd300.files.atomic_path`)."""
    try:
        yield
    except Exception as exc:
        found = find_disk_error(exc)
        if found is None or (isinstance(exc, DiskError) and exc.path == out):
            raise
        raise DiskError(f"{out}: could not be written: the temporary folder {folder.parent} refused the "
                        f"intermediate files ({found.strerror or found}); free space there or point TMPDIR "
                        "at a folder with room; nothing was left at that path", out, found) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantisers print progress bars and notes; the CLI reports its own summary."""
    loggers = [logging.getLogger(name) for name in ("nncf", "onnxruntime", "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------- agreement with fp32


def confident_agreement(reference: Sequence[Detections], candidate: Sequence[Detections], min_score: float = 0.5,
                        min_iou: float = 0.9) -> tuple[int, int]:
    """How many of ``reference``'s detections scoring >= ``min_score`` ``candidate`` reproduces.

    A reference detection is reproduced when the candidate has a detection of the same label
    with IoU >= ``min_iou`` (each candidate detection used once, best IoU first). Returns
    (reproduced, confident reference detections). Boxes only need a common coordinate frame.
    """
    from torchvision.ops import box_iou

    matched = total = 0
    for want, have in zip(reference, candidate):
        confident = want.scores >= min_score
        boxes, labels = want.boxes[confident].float(), want.labels[confident]
        total += int(labels.numel())
        if labels.numel() == 0 or have.labels.numel() == 0:
            continue
        iou = box_iou(boxes, have.boxes.float())
        iou[labels.unsqueeze(1) != have.labels.unsqueeze(0)] = 0.0
        for _ in range(int(labels.numel())):
            best = int(iou.argmax())
            row, col = divmod(best, iou.shape[1])
            if iou[row, col] < min_iou:
                break
            matched += 1
            iou[row, :] = 0.0
            iou[:, col] = 0.0
    return matched, total
