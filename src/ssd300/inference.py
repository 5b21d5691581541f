"""The Python inference API: images in, per-image detections in pixels with class names out.

>>> detector = Detector.from_checkpoint("runs/demo/checkpoints/last.pt", device="cpu")
>>> result = detector("photo.jpg")                     # one image -> one ImageDetections
>>> results = detector([pil_image, "b.png", array])    # a list -> a list, run in batches
>>> result.boxes, result.scores, result.class_names   # ltrb pixels of the original image

Inputs may be paths, PIL images, HWC uint8 numpy arrays (RGB) or CHW tensors (uint8, or float in
[0, 1]); float pixels outside [0, 1], NaN/inf and empty images are refused in one line
(:func:`check_pixels`). Preprocessing is :class:`ssd300.data.transforms.EvalTransform` (the one shared with
evaluation): resize to 300x300 on uint8, then normalise batched. Post-processing is
:class:`ssd300.postprocess.PostProcessor` (SPEC §5), run once per batch.

Speed (CPU): BatchNorm is folded into the convolutions, the model runs channels-last, big JPEGs
are decoded at a reduced DCT scale that still leaves >= 300 pixels (``draft=True``), and while a
batch runs through the network the next one is decoded on a background thread. Precision follows
:mod:`ssd300.runtime`: ``amp=True`` runs float16 autocast on CUDA, the network in bfloat16 on a CPU
with native bf16 (AVX-512 BF16 / AMX), and fp32 (with a warning) on other CPUs, where bf16 would be
emulated. ``backend="onnxruntime"`` runs the network with onnxruntime (fp32; the ONNX file is
exported once per set of weights and cached, see :func:`ssd300.runners.cached_network_onnx`),
often the fastest CPU path; pre- and post-processing stay the same. :meth:`Detector.from_exported`
runs a file written by ``ssd300 export`` (ONNX fp32 or INT8, pt2, TorchScript) with its classes and
baked-in thresholds. Running the network is the job of one :class:`ssd300.runners.Runner` per
backend (BatchNorm folding, the copy of the caller's model and the precision live there).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence, Union, overload

import numpy as np
import torch
from PIL import Image

from ssd300.data.images import (
    DECODE_ERRORS,
    apply_orientation,
    draft_for_crop,
    exif_orientation,
    open_image,
    oriented_size,
    to_rgb,
    to_uint8_chw,
)
from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.errors import UserInputError, one_line
from ssd300.exported import ExportedFile
from ssd300.files import PathLike
from ssd300.labels import LabelMap
from ssd300.postprocess import PostprocessConfig, PostProcessor, filter_by_class_thresholds
from ssd300.runners import BACKENDS, Runner, build_runner, load_exported
from ssd300.runtime import Runtime

log = logging.getLogger(__name__)

ImageInput = Union[PathLike, Image.Image, np.ndarray, torch.Tensor]


@dataclass
class ImageDetections:
    """Detections of one image, best first. Boxes are ltrb in the original image's pixels."""

    boxes: torch.Tensor  # (K, 4) float32, ltrb pixels, clipped to the image
    scores: torch.Tensor  # (K,) float32
    labels: torch.Tensor  # (K,) int64, contiguous labels 1..C-1 (0 is background)
    class_names: list[str]  # (K,) name of each detection's class
    category_ids: torch.Tensor  # (K,) int64, dataset category ids (COCO ids for COCO models)
    image_size: tuple[int, int]  # (width, height) of the original image
    source: Optional[str] = None  # the path, when the image came from a file
    boxes_normalized: Optional[torch.Tensor] = field(default=None, repr=False)  # (K, 4) ltrb in [0, 1]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def filter(self, min_score: float) -> "ImageDetections":
        """The detections scoring at least ``min_score``."""
        keep = self.scores >= min_score
        index = keep.nonzero().flatten().tolist()
        return ImageDetections(
            self.boxes[keep], self.scores[keep], self.labels[keep], [self.class_names[i] for i in index],
            self.category_ids[keep], self.image_size, self.source,
            None if self.boxes_normalized is None else self.boxes_normalized[keep],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: one entry per detection with box (ltrb pixels), ids, name, score."""
        return {
            "image": self.source,
            "width": self.image_size[0],
            "height": self.image_size[1],
            "detections": [
                {"box": [round(v, 2) for v in box], "label": label, "category_id": cid, "class_name": name,
                 "score": round(score, 5)}
                for box, label, cid, name, score in zip(
                    self.boxes.tolist(), self.labels.tolist(), self.category_ids.tolist(), self.class_names,
                    self.scores.tolist())
            ],
        }

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results entries (``bbox`` = [x, y, width, height] in pixels)."""
        return [
            {"image_id": int(image_id), "category_id": cid,
             "bbox": [round(l, 2), round(t, 2), round(r - l, 2), round(b - t, 2)], "score": round(score, 5)}
            for (l, t, r, b), cid, score in zip(self.boxes.tolist(), self.category_ids.tolist(), self.scores.tolist())
        ]


def load_rgb(path: Union[PathLike, BinaryIO], draft: bool = True) -> Image.Image:
    """Decode an image file to RGB as a viewer shows it: EXIF orientation applied (a phone photo
    stored sideways comes out upright); with ``draft`` big JPEGs decode at a reduced scale (>= 300 px).

    Returns the decoded image and keeps the file's full size (as displayed) in
    ``image.info["original_size"]``, so boxes are reported in the upright picture's pixels.
    Raises one of ``DECODE_ERRORS``.
    """
    image = open_image(path)
    orientation = exif_orientation(image)
    original_size = oriented_size(image.size, orientation)
    if draft:
        draft_for_crop(image, (1.0, 1.0), EvalTransform.size)
    image = apply_orientation(to_rgb(image), orientation)
    image.info["original_size"] = original_size
    return image


def _original_size(image: Any, pixels: torch.Tensor) -> tuple[int, int]:
    """(width, height) the boxes are reported in: a draft-decoded file keeps its full size."""
    if isinstance(image, Image.Image) and "original_size" in image.info:
        width, height = image.info["original_size"]
        return int(width), int(height)
    return int(pixels.shape[2]), int(pixels.shape[1])


def check_pixels(image: Any) -> None:
    """An array/tensor image that can be detected on, else a one-line :class:`UserInputError`
    saying what was given (shape, dtype, value range): no empty images, float pixels finite and in
    [0, 1] (``to_uint8_chw`` would clamp 200 to white and turn NaN into black, silently)."""
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        return
    kind = "array" if isinstance(image, np.ndarray) else "tensor"
    shape = tuple(int(n) for n in image.shape)
    dtype = str(image.dtype).replace("torch.", "")
    if image.ndim >= 2 and 0 in shape:
        raise UserInputError(f"images: an empty image {kind} (shape {shape}, {dtype}); "
                             "an image needs at least 1x1 pixels", fields=("images",))
    floating = image.is_floating_point() if isinstance(image, torch.Tensor) else np.issubdtype(image.dtype, np.floating)
    if not floating or 0 in shape:
        return
    values = torch.as_tensor(image).detach()
    finite = torch.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if bool(finite.any()) else (None, None)
    found = "no finite values" if low is None else f"values in [{low:g}, {high:g}]"
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise UserInputError(f"images: a float image {kind} (shape {shape}, {dtype}) holds {bad} NaN/inf values "
                             f"({found}); float pixels must be finite and in [0, 1]", fields=("images",))
    if low is not None and high is not None and (low < 0.0 or high > 1.0):
        hint = "; for 0..255 pixels pass uint8 (or divide by 255)" if high > 1.0 else ""
        raise UserInputError(f"images: a float image {kind} (shape {shape}, {dtype}) has {found}; float pixels "
                             f"must be finite and in [0, 1]{hint}", fields=("images",))


@dataclass
class _Prepared:
    """One image resized for the network, with what is needed to report its detections."""

    pixels: torch.Tensor  # uint8 (3, 300, 300)
    size: tuple[int, int]  # original (width, height)
    source: Optional[str]


class Detector:
    """Preprocessing + one :class:`~ssd300.runners.Runner` + post-processing. See the module docstring.

    ``model`` is a PyTorch model (run by ``backend``, see :data:`ssd300.runners.MODEL_BACKENDS`)
    or a runner already built (an exported file's, :func:`ssd300.runners.load_exported`).
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, Runner],
        label_map: Optional[LabelMap] = None,
        *,
        device: Union[str, torch.device, None] = None,
        postprocess: Optional[PostprocessConfig] = None,
        score_threshold: Optional[float] = None,
        iou_threshold: Optional[float] = None,
        topk_per_class: Optional[int] = None,
        max_detections: Optional[int] = None,
        batch_size: int = 8,
        amp: bool = False,
        channels_last: Optional[bool] = None,
        fuse: bool = True,
        draft: bool = True,
        backend: str = "torch",
        runtime: Optional[Runtime] = None,
        class_score_thresholds: Optional[Mapping[int, float]] = None,
    ) -> None:
        # ``postprocess`` (default PostprocessConfig()) with any single settings given changed.
        config = (postprocess or PostprocessConfig()).replace(
            score_threshold=score_threshold, iou_threshold=iou_threshold, topk_per_class=topk_per_class,
            max_detections=max_detections)
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}", fields=("batch_size",))
        # The one runtime policy (ssd300.runtime): amp = fp16 autocast on CUDA, bf16 on a CPU with
        # native bf16, fp32 elsewhere (emulated bf16 is 5-10x slower); channels-last for inference.
        self.runtime = runtime or Runtime.resolve(device, amp, channels_last=channels_last)
        if self.runtime.amp_fell_back:
            log.warning("amp: this CPU has no native bf16 (emulated bf16 is 5-10x slower), so the Detector runs fp32")
        self.runner = build_runner(model, self.runtime, backend=backend, fuse=fuse, device=device)
        self.runner.check_postprocess(config)
        self.device = self.runner.device
        self.backend = backend
        num_classes = self.runner.num_classes
        self.label_map = label_map or self.runner.label_map or LabelMap.generic(num_classes)
        if self.label_map.num_classes != num_classes:
            raise UserInputError(f"label map has {self.label_map.num_classes} classes, the model {num_classes}")
        self.batch_size = batch_size
        self.draft = draft
        self.transform = EvalTransform()
        self.postprocessor = PostProcessor(default_boxes_300(), config)
        self._names = list(self.label_map.names)
        self._category_ids = torch.tensor(self.label_map.category_ids, dtype=torch.int64)
        # ``class_score_thresholds``: {category id: minimum score} applied after post-processing
        # (e.g. an evaluation's F1-best thresholds, :func:`ssd300.diagnostics.best_thresholds_of`).
        self.class_score_thresholds = dict(class_score_thresholds or {})
        label_of = {cid: label for label, cid in enumerate(self.label_map.category_ids) if label > 0}
        unknown = sorted(set(self.class_score_thresholds) - set(label_of))
        if unknown:
            raise UserInputError(f"class_score_thresholds: category ids {unknown} are not classes of the model "
                                 f"({', '.join(map(str, label_of))})", fields=("class_score_thresholds",))
        self._label_thresholds = {label_of[cid]: float(t) for cid, t in self.class_score_thresholds.items()}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: Union[str, torch.device, None] = None,
                        **options: Any) -> "Detector":
        """Load our checkpoint or the reference's (``model`` key, ``module.`` prefixes, ``label_map``).

        ``options`` are the keyword arguments of :class:`Detector` (thresholds, batch size, amp...);
        ``class_score_thresholds="best"`` takes the per-class F1-best score thresholds stored with the
        checkpoint's evaluation (:func:`ssd300.diagnostics.best_thresholds_of`; none stored: an error).
        A file that is not an SSD300 checkpoint raises :class:`UserInputError` naming it.
        """
        from ssd300.checkpoint import load_model

        model, label_map, checkpoint = load_model(path, map_location="cpu")
        if options.get("class_score_thresholds") == "best":
            from ssd300.diagnostics import best_thresholds_of

            found = best_thresholds_of(checkpoint)
            if found is None:
                raise UserInputError(f"score_threshold best: checkpoint {path} holds no per-class F1-best score "
                                     "thresholds (a training run stores them with each evaluated epoch's "
                                     "checkpoint); give a number instead", fields=("score_threshold",))
            options["class_score_thresholds"] = found
        return cls(model, label_map, device=device, **options)

    @classmethod
    def from_pretrained(cls, name: str = "nvidia-ssd300-coco", device: Union[str, torch.device, None] = None,
                        **options: Any) -> "Detector":
        """Published weights by name (``ssd300 weights`` lists them) or an http(s) URL: downloaded
        once into the cache, verified, then as :meth:`from_checkpoint`."""
        from ssd300.checkpoint import resolve_checkpoint

        return cls.from_checkpoint(resolve_checkpoint(name), device=device, **options)

    @classmethod
    def from_exported(cls, path: PathLike, runtime: str = "auto", **options: Any) -> "Detector":
        """Run a file written by ``ssd300 export`` (``.onnx`` fp32/INT8, ``.pt2``, ``.ts``).

        Classes come from the file's metadata. A file holding the whole detector has its
        post-processing baked in: its thresholds are the defaults here, a higher
        ``score_threshold`` or lower ``max_detections`` filters further, anything it cannot honour
        raises :class:`UserInputError`. A raw-outputs file is post-processed here with ``options``.
        ``runtime`` picks onnxruntime or OpenVINO for ONNX files (see :mod:`ssd300.exported`);
        ``device`` (default the CPU) may be CUDA for onnxruntime with a CUDA provider; ``threads``
        caps the runtime's threads (one of several server workers sharing the cores).
        """
        runner = load_exported(path, runtime=runtime, device=options.get("device"),
                               threads=options.pop("threads", None))
        for key, value in runner.baked_settings.items():
            if options.get(key) is None:
                options[key] = value
        return cls(runner, runner.label_map, **options)

    @classmethod
    def from_model_file(cls, path: PathLike, *, runtime: str = "auto", device: Union[str, torch.device, None] = None,
                        postprocess: Optional[PostprocessConfig] = None, batch_size: int = 8, amp: bool = False,
                        backend: str = "torch", draft: bool = True, threads: Optional[int] = None,
                        class_score_thresholds: Union[Mapping[int, float], str, None] = None) -> "Detector":
        """A checkpoint or a file from ``ssd300 export`` (recognised by content), as ``ssd300 detect``
        and ``ssd300 serve`` run them. For an exported file its baked-in post-processing stays the
        default: only settings of ``postprocess`` that differ from :class:`PostprocessConfig`'s
        defaults are passed on; ``amp``/``backend`` do not apply to it (``runtime`` does, for ONNX),
        and ``runtime`` does not apply to a checkpoint: both mismatches raise :class:`UserInputError`.
        ``threads`` caps an exported file's runtime threads (PyTorch's are process-wide:
        ``torch.set_num_threads``). ``class_score_thresholds`` (a mapping or ``"best"``, see
        :meth:`from_checkpoint`) applies to checkpoints only."""
        import dataclasses

        from ssd300.exported import is_exported_file

        postprocess = postprocess or PostprocessConfig()
        if is_exported_file(path):
            if class_score_thresholds is not None:
                raise UserInputError(f"{path}: per-class score thresholds come with a training checkpoint; this is "
                                     "an exported file: give one score threshold", fields=("class_score_thresholds",))
            if amp or backend != "torch":
                raise UserInputError(f"{path}: an exported file runs as exported; drop amp/backend "
                                     "(pick runtime for ONNX)", fields=("amp", "backend", "runtime"))
            defaults = PostprocessConfig()
            changed = {key: value for key, value in dataclasses.asdict(postprocess).items()
                       if value != getattr(defaults, key)}
            return cls.from_exported(path, runtime=runtime, device=device, batch_size=batch_size, draft=draft,
                                     threads=threads, **changed)
        if runtime != "auto":
            raise UserInputError("runtime applies to exported files (.onnx); use backend for a checkpoint",
                                 fields=("runtime", "backend"))
        return cls.from_checkpoint(path, device=device, postprocess=postprocess, batch_size=batch_size, amp=amp,
                                   draft=draft, backend=backend, class_score_thresholds=class_score_thresholds)

    @property
    def exported(self) -> Optional[ExportedFile]:
        """The exported file this Detector runs (:meth:`from_exported`: path, format, precision,
        classes, baked-in settings), else None; ``detector.runner.describe()`` says how it runs."""
        return self.runner.file

    # ------------------------------------------------------------------ calling

    @overload
    def __call__(self, images: Sequence[ImageInput]) -> list[ImageDetections]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, images: ImageInput) -> ImageDetections: ...

    def __call__(self, images: Any) -> Any:
        """Detect objects in one image (returns one result) or a list of images (returns a list).

        A 4-D array/tensor is taken as a batch of images. Unreadable files raise
        :class:`UserInputError`; use :meth:`detect_files` to skip them instead.
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        items = [images] if single else list(images)
        results = [result for _, result in self._run(items, on_error="raise")]
        return results[0] if single else results

    def detect_files(self, paths: Iterable[PathLike],
                     on_error: str = "skip") -> Iterator[tuple[str, Union[ImageDetections, Exception]]]:
        """Yield ``(path, detections)`` in order; with ``on_error="skip"`` an unreadable file yields
        ``(path, error)`` instead and the run goes on (``"raise"``: UserInputError)."""
        for source, result in self._run([os.fspath(p) for p in paths], on_error=on_error):
            assert source is not None  # every item is a path
            yield source, result

    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network alone on a normalised (N, 3, 300, 300) batch -> (locs, logits) float32
        (ValueError for an exported file that holds the whole detector)."""
        return self.runner.forward(images)

    # ------------------------------------------------------------------ internals

    def _decode(self, item: Any) -> tuple[Any, Optional[str]]:
        """A path -> its decoded RGB image (PIL releases the GIL); other inputs pass through."""
        if isinstance(item, (str, Path)) or hasattr(item, "__fspath__"):
            source = os.fspath(item)
            try:
                return load_rgb(source, draft=self.draft), source
            except DECODE_ERRORS as exc:
                # the path is said once, first: the decoder's message often repeats it ('... file /x.jpg')
                detail = one_line(exc).replace(f" {source!r}", "").replace(f" {source}", "")
                raise UserInputError(f"{source}: not a readable image ({detail})") from None
        return item, None

    def _decode_batch(self, items: Sequence[Any],
                      on_error: str) -> list[Union[tuple[Any, Optional[str]], UserInputError]]:
        decoded: list[Union[tuple[Any, Optional[str]], UserInputError]] = []
        for item in items:
            try:
                decoded.append(self._decode(item))
            except UserInputError as error:
                if on_error == "raise":
                    raise
                decoded.append(error)
        return decoded

    def _prepare(self, image: Any, source: Optional[str]) -> _Prepared:
        check_pixels(image)
        pixels = to_uint8_chw(image)
        return _Prepared(self.transform.resize_uint8(pixels), _original_size(image, pixels), source)

    def _run(self, items: Sequence[Any], on_error: str) -> Iterator[tuple[Optional[str], Any]]:
        """Batches through the network; the next batch's files are decoded on a thread meanwhile.

        Only decoding runs on the thread: the resize uses torch's OpenMP pool, and two OpenMP
        teams spinning on the same cores would slow the forward pass down far more than the
        resize costs (~1 ms per image).
        """
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if not batches:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd300-decode") as pool:
            pending = pool.submit(self._decode_batch, batches[0], on_error)
            for index, batch in enumerate(batches):
                decoded = pending.result()
                if index + 1 < len(batches):
                    pending = pool.submit(self._decode_batch, batches[index + 1], on_error)
                prepared = [self._prepare(*d) if not isinstance(d, UserInputError) else d for d in decoded]
                good = [p for p in prepared if isinstance(p, _Prepared)]
                results = iter(self._detect_prepared(good)) if good else iter(())
                for item, p in zip(batch, prepared):
                    if isinstance(p, _Prepared):
                        yield p.source, next(results)
                    else:
                        yield os.fspath(item), p

    def _detect_prepared(self, prepared: Sequence[_Prepared]) -> list[ImageDetections]:
        pixels = torch.stack([p.pixels for p in prepared]).to(self.device, non_blocking=True)
        sizes = torch.tensor([p.size for p in prepared], dtype=torch.float32)
        images = self.transform.normalize(pixels)
        sources = [p.source for p in prepared]
        return self._image_detections(self.runner.detect(images, self.postprocessor, sizes), sizes, sources)

    def detections_from_outputs(self, locs: torch.Tensor, logits: torch.Tensor, image_sizes: torch.Tensor,
                                sources: Optional[Sequence[Optional[str]]] = None) -> list[ImageDetections]:
        """Post-process raw outputs of a batch into per-image pixel detections."""
        sizes = image_sizes.to(torch.float32).cpu()
        return self._image_detections(self.postprocessor(locs, logits, sizes.to(locs.device)), sizes, sources)

    def _image_detections(self, per_image: Sequence[Any], sizes: torch.Tensor,
                          sources: Optional[Sequence[Optional[str]]] = None) -> list[ImageDetections]:
        """Per-image detections with ``boxes_pixels`` -> :class:`ImageDetections` with class names."""
        results = []
        if self._label_thresholds:
            per_image = filter_by_class_thresholds(per_image, self._label_thresholds)
        for i, det in enumerate(per_image):
            labels = det.labels.cpu()
            assert det.boxes_pixels is not None  # image_sizes were given
            results.append(ImageDetections(
                boxes=det.boxes_pixels.cpu(), scores=det.scores.cpu(), labels=labels,
                class_names=[self._names[i] for i in labels.tolist()],
                category_ids=self._category_ids[labels], image_size=(int(sizes[i, 0]), int(sizes[i, 1])),
                source=None if sources is None else sources[i], boxes_normalized=det.boxes.cpu(),
            ))
        return results


__all__ = ["BACKENDS", "Detector", "ImageDetections", "ImageInput", "check_pixels", "load_rgb"]
