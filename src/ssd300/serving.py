"""Serving detections over HTTP, the engine-neutral part: upload checks, decoding, batching through a
:class:`~ssd300.inference.Detector`, and the JSON each image gets back.

``ssd300 serve`` runs this on MLServer (:mod:`ssd300.serving_mlserver`), but nothing here knows the
engine: an upload (the bytes of a JPEG/PNG/... file) is checked against :class:`ServeLimits` (the one
place for the body size, pixel count and formats a server accepts), decoded as ``ssd300 detect``
decodes a file (EXIF orientation, reduced-scale JPEG decoding as the Detector's ``draft``), run in one
batch with the other uploads of the batch, and answered with :meth:`ImageDetections.to_dict` (the
same numbers as ``detect``'s ``detections/<name>.json``). A bad upload is a :class:`RequestError`
(HTTP status + one line) for that upload alone: its batch-mates are still answered.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from PIL import Image

from ssd300.data.images import DECODE_ERRORS, open_image
from ssd300.errors import UserInputError, one_line
from ssd300.inference import Detector, load_rgb
from ssd300.postprocess import PostprocessConfig
from ssd300.runtime import usable_cores

# Pillow format name -> the content type an upload of it may declare.
CONTENT_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif",
    "TIFF": "image/tiff",
}
# A raw body may also be declared as plain bytes (the format is then read from the file itself).
GENERIC_CONTENT_TYPES = ("application/octet-stream",)


def _reason(exc: BaseException) -> str:
    """A decoder's complaint in one line, without the in-memory file object it names."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", one_line(exc))


class RequestError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)

    def __reduce__(self) -> tuple[object, ...]:
        return (RequestError, (self.status, str(self)))

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "status": self.status}


@dataclass(frozen=True)
class ServeLimits:
    """What one upload may be: checked before any pixel is decoded (size, header) and while decoding."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # 40 megapixels: a phone photo fits, a decompression bomb does not
    formats: tuple[str, ...] = tuple(CONTENT_TYPES)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise UserInputError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}", fields=("max_body_bytes",))
        if self.max_pixels < 1:
            raise UserInputError(f"max_pixels must be >= 1, got {self.max_pixels}", fields=("max_pixels",))

    def content_types(self) -> tuple[str, ...]:
        return tuple(CONTENT_TYPES[f] for f in self.formats) + GENERIC_CONTENT_TYPES


def check_content_type(content_type: Optional[str], limits: ServeLimits) -> None:
    """A raw upload's declared type: an image type the server reads, or ``application/octet-stream``
    (415 otherwise; no header at all is taken as octet-stream)."""
    if not content_type:
        return
    kind = content_type.split(";")[0].strip().lower()
    if kind not in limits.content_types():
        raise RequestError(415, f"content type {kind!r} is not an image this server reads; send "
                                f"{', '.join(limits.content_types())} or a multipart form with a file field")


def check_body_size(size: int, limits: ServeLimits) -> None:
    """An upload's byte count: not empty (400), not over ``limits.max_body_bytes`` (413)."""
    if size == 0:
        raise RequestError(400, "empty body: send the bytes of an image file")
    if size > limits.max_body_bytes:
        raise RequestError(413, f"body of {size} bytes is over the limit of {limits.max_body_bytes} bytes")


def check_image_header(body: bytes, limits: ServeLimits) -> tuple[str, int, int]:
    """The upload's (format, width, height) from its header alone (nothing decoded yet): a format in
    ``limits.formats`` (400 for anything else) and at most ``limits.max_pixels`` pixels (413)."""
    check_body_size(len(body), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_image(io.BytesIO(body))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image too large ({_reason(exc)})") from None
    except DECODE_ERRORS as exc:
        raise RequestError(400, f"not an image file ({_reason(exc)})") from None
    fmt = image.format or "unknown"
    width, height = image.size
    if fmt not in limits.formats:
        raise RequestError(400, f"image format {fmt} is not served; send one of {', '.join(limits.formats)}")
    if width * height > limits.max_pixels:
        raise RequestError(413, f"image of {width}x{height} = {width * height / 1e6:.1f} megapixels is over the "
                                f"limit of {limits.max_pixels / 1e6:g} megapixels")
    return fmt, width, height


def decode_upload(body: bytes, limits: ServeLimits, draft: bool = True) -> Image.Image:
    """An upload's bytes -> the RGB image ``ssd300 detect`` would decode from the same file
    (:func:`ssd300.inference.load_rgb`), fully decoded here so a truncated file fails now (400)."""
    check_image_header(body, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_rgb(io.BytesIO(body), draft=draft)
            image.load()
    except DECODE_ERRORS as exc:
        raise RequestError(400, f"not a readable image ({_reason(exc)})") from None
    return image


@dataclass
class ServeConfig:
    """Everything a server needs to build its model in each worker process (picklable, JSON-able)."""

    model: str  # a checkpoint or an exported file (a published name resolved to its file already)
    runtime: str = "auto"
    device: str = "cpu"
    amp: bool = False
    backend: str = "torch"
    postprocess: dict[str, Any] = field(default_factory=dict)  # PostprocessConfig's fields
    # Batches of 4: concurrent requests then fill a batch for every worker sooner (8 clients keep 2
    # workers busy, where batches of 8 ran one at a time), at the same CPU per image (BENCHMARKS.md).
    max_batch_size: int = 4
    draft: bool = True
    threads: Optional[int] = None  # per worker; None: the cores shared evenly between the workers
    # A file shared by the server's workers: each takes the next slot in it and keeps to that slot's
    # cores (:func:`claim_worker_cores`); None: the workers share every core.
    worker_slots: Optional[str] = None
    workers: int = 1
    limits: dict[str, Any] = field(default_factory=dict)  # ServeLimits' fields

    def serve_limits(self) -> ServeLimits:
        limits: dict[str, Any] = {k: tuple(v) if k == "formats" else v for k, v in self.limits.items()}
        return ServeLimits(**limits)


def claim_worker_cores(slots_file: str, workers: int, threads: int) -> Optional[list[int]]:
    """Give this worker process its own cores: the next slot of ``slots_file`` (a counter, taken under
    an exclusive lock; a restarted worker takes the slot after, modulo ``workers``) -> ``threads``
    cores of this process's CPU set, kept to with ``sched_setaffinity``. Workers on disjoint cores
    let each runtime pin its threads within its own (OpenVINO pins to the first cores it is given:
    sharing every core, 2 workers x 1 thread would both sit on core 0). Returns the cores, or None
    (nothing changed) where the set has fewer than ``workers x threads`` cores or no affinity API."""
    if not hasattr(os, "sched_setaffinity") or workers < 1 or threads < 1:
        return None
    cores = usable_cores()
    if len(cores) < workers * threads:
        return None
    import fcntl

    with open(slots_file, "a+", encoding="ascii") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        taken = len(handle.read().split())
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    slot = taken % workers
    mine = cores[slot * threads:(slot + 1) * threads]
    os.sched_setaffinity(0, mine)
    return mine


def threads_per_worker(workers: int) -> int:
    """The cores this process may use, shared evenly between ``workers`` processes (at least 1)."""
    return max(1, len(usable_cores()) // max(1, workers))


# How long a batch waits for more requests once one is queued. Measured on 2 cores, 2 workers,
# batches of 4, interleaved runs (BENCHMARKS.md "Serving"): 20 ms against 2 ms gives INT8 50 against
# 39-46 images/s at 8 clients (p99 0.17-0.25 s against 0.30-0.34 s) and 50-52 against 41-45 at 32;
# bf16 +4-10%. A lone request pays it: p50 74 ms against 48 ms with 0 (0 turns batching off).
DEFAULT_BATCH_TIMEOUT_MS = 20.0

Result = Union[dict[str, Any], RequestError]


class DetectionService:
    """Uploads in, one JSON-ready record (or :class:`RequestError`) per upload out, in one batch."""

    def __init__(self, detector: Detector, limits: Optional[ServeLimits] = None) -> None:
        self.detector = detector
        self.limits = limits or ServeLimits()

    @classmethod
    def from_config(cls, config: ServeConfig) -> "DetectionService":
        import torch

        threads = config.threads
        if threads:  # a worker process's share of the cores (process-wide for PyTorch)
            torch.set_num_threads(threads)
        detector = Detector.from_model_file(
            config.model, runtime=config.runtime, device=config.device,
            postprocess=PostprocessConfig(**config.postprocess), batch_size=config.max_batch_size, amp=config.amp,
            backend=config.backend, draft=config.draft, threads=threads)
        return cls(detector, config.serve_limits())

    @property
    def class_names(self) -> list[str]:
        return list(self.detector.label_map.names[1:])

    def describe(self) -> str:
        return self.detector.runner.describe()

    def detect(self, bodies: Sequence[bytes], names: Optional[Sequence[Optional[str]]] = None) -> list[Result]:
        """Each upload's detections (``ImageDetections.to_dict()``, ``image`` = its name if given) or
        its :class:`RequestError`; the readable ones run through the network together."""
        names = list(names) if names is not None else [None] * len(bodies)
        decoded: list[Union[Image.Image, RequestError]] = []
        for body in bodies:
            try:
                decoded.append(decode_upload(body, self.limits, draft=self.detector.draft))
            except RequestError as error:
                decoded.append(error)
        good = [image for image in decoded if isinstance(image, Image.Image)]
        detections = iter(self.detector(good)) if good else iter(())
        results: list[Result] = []
        for image, name in zip(decoded, names):
            if isinstance(image, RequestError):
                results.append(image)
                continue
            record = next(detections).to_dict()
            record["image"] = name
            results.append(record)
        return results


def result_to_json(result: Result) -> str:
    """One upload's answer as one line of JSON (an error is ``{"error": ..., "status": ...}``)."""
    return json.dumps(result.to_dict() if isinstance(result, RequestError) else result, separators=(",", ":"))


def error_from_json(text: Union[str, bytes]) -> Optional[RequestError]:
    """The :class:`RequestError` a :func:`result_to_json` text carries, else None, without parsing a
    detections record (an error's JSON starts with its ``error`` key; a record has none)."""
    head = text[:len(_ERROR_START)]
    if (head.decode("utf-8", "replace") if isinstance(head, bytes) else head) != _ERROR_START:
        return None
    result = result_from_json(text)
    return result if isinstance(result, RequestError) else None


_ERROR_START = '{"error":'


def result_from_json(text: Union[str, bytes]) -> Result:
    """Inverse of :func:`result_to_json`."""
    record = json.loads(text)
    if isinstance(record, dict) and "error" in record:
        return RequestError(int(record.get("status", 400)), str(record["error"]))
    return dict(record)


__all__ = ["CONTENT_TYPES", "DEFAULT_BATCH_TIMEOUT_MS", "DetectionService", "RequestError", "ServeConfig",
           "ServeLimits", "check_body_size", "check_content_type", "check_image_header", "claim_worker_cores",
           "decode_upload", "error_from_json", "result_from_json", "result_to_json", "threads_per_worker"]
