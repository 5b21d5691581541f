"""``ssd300 serve`` on MLServer: the Open Inference Protocol (KServe v2), adaptive batching, worker
processes and Prometheus metrics come from MLServer; this module adds the model, a plain upload
endpoint, the page at ``/``, one-line JSON errors and a draining shutdown.

Endpoints (HTTP, ``--port``):

* ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/<name>``,
  ``POST /v2/models/<name>/infer``: MLServer's v2 protocol. The model takes ``image``: a BYTES
  tensor of shape ``[N]``, each element an encoded image file (base64 text in JSON, as the v2 JSON
  encoding of bytes), and returns ``detections``: BYTES ``[N]``, each a JSON document, the same as
  ``POST /detect`` returns for that file.
* ``POST /detect``: one image as the raw body (``Content-Type: image/jpeg``, ``image/png``, ... or
  ``application/octet-stream``) or as a multipart form's file field; answers
  :meth:`ssd300.inference.ImageDetections.to_dict` (pixels, class names) plus ``server_ms``.
* ``GET /``: a page to try it (:file:`serve_page.html`).
* Prometheus metrics on ``--metrics-port`` at ``/metrics`` (MLServer's).

Every request, from either endpoint, goes through MLServer's adaptive batcher (up to
``max_batch_size`` images, waiting at most ``batch_timeout_ms``) into one of the worker processes,
each holding its own :class:`ssd300.serving.DetectionService`. A bad upload is answered alone (its
batch-mates are not failed): the model returns an error record for it, and the check added after
the batcher turns it into that request's 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import resources
from typing import Any, Awaitable, Callable, Optional

from ssd300.optional import require
from ssd300.serving import (
    DEFAULT_BATCH_TIMEOUT_MS,
    DetectionService,
    RequestError,
    ServeConfig,
    ServeLimits,
    check_body_size,
    check_content_type,
    check_image_header,
    claim_worker_cores,
    error_from_json,
    result_to_json,
)

require("mlserver", "ssd300 serve")

from fastapi import Request  # noqa: E402  (after the one-line check that MLServer is installed)
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from mlserver import MLModel, MLServer  # noqa: E402
from mlserver.errors import MLServerError  # noqa: E402
from mlserver.settings import ModelParameters, ModelSettings, Settings  # noqa: E402
from mlserver.types import (  # noqa: E402
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    RequestInput,
    ResponseOutput,
)

# MLServer's logger: its handlers are set up in the server and in each worker process.
log = logging.getLogger("mlserver")

INPUT_NAME = "image"
OUTPUT_NAME = "detections"
# base64 makes a file 4/3 as long; the JSON around it is small.
_V2_BODY_FACTOR = 1.4
_V2_BODY_SLACK = 64 * 1024


class SSD300Model(MLModel):
    """The MLServer model: one :class:`DetectionService` per worker process."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        config = ServeConfig(**extra["ssd300"])
        cores = None
        if config.worker_slots and config.threads:
            cores = claim_worker_cores(config.worker_slots, config.workers, config.threads)
        self.service = DetectionService.from_config(config)
        log.info("ssd300 serve: worker %d%s: %s", os.getpid(), f" on cores {cores}" if cores else "",
                 self.service.describe())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # One batch: a malformed element gets an error record, never an exception, so the requests
        # batched with it are still answered (request shapes were checked before batching).
        bodies: list[Any] = []
        for item in _image_items(payload):
            try:
                bodies.append(_item_bytes(item))
            except RequestError as error:
                bodies.append(error)
        good = [body for body in bodies if isinstance(body, bytes)]
        answers = iter(self.service.detect(good))
        texts = [result_to_json(body if isinstance(body, RequestError) else next(answers)) for body in bodies]
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[ResponseOutput(name=OUTPUT_NAME, shape=[len(texts)], datatype="BYTES", data=texts)],
        )


def _image_items(payload: InferenceRequest) -> list[Any]:
    for tensor in payload.inputs:
        if tensor.name == INPUT_NAME:
            data = getattr(tensor.data, "root", tensor.data)
            return list(data) if isinstance(data, (list, tuple)) else [data]
    return []


def _item_bytes(item: Any) -> bytes:
    """A BYTES element: raw bytes (gRPC) as they are, text (JSON) as base64."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    try:
        return base64.b64decode(str(item), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"input {INPUT_NAME!r}: an element is not base64 text (the v2 JSON encoding "
                                "of an image file's bytes)") from None


def check_infer_request(payload: InferenceRequest, limits: ServeLimits) -> None:
    """A v2 request this model can answer (400 otherwise): one BYTES input ``image`` of shape [N]
    whose N elements are image files within ``limits`` (header checked; pixels are decoded by a worker)."""
    names = [tensor.name for tensor in payload.inputs]
    if names != [INPUT_NAME]:
        raise RequestError(400, f"inputs {names}: expected one input {INPUT_NAME!r} (BYTES, shape [N]: encoded "
                                "image files)")
    tensor = payload.inputs[0]
    if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise RequestError(400, f"input {INPUT_NAME!r} is {tensor.datatype} {tensor.shape}; expected BYTES [N] "
                                "(encoded image files)")
    items = _image_items(payload)
    if len(items) != tensor.shape[0] or not items:
        raise RequestError(400, f"input {INPUT_NAME!r}: shape {tensor.shape} but {len(items)} elements")
    for item in items:
        check_image_header(_item_bytes(item), limits)


def _checked_predict(predict: Callable[[InferenceRequest], Awaitable[InferenceResponse]],
                     limits: ServeLimits) -> Callable[[InferenceRequest], Awaitable[InferenceResponse]]:
    """Around the batched predict (main process): the request checked before it joins a batch, and
    its answer's error records turned into its own 4xx after the batch is split."""
    async def predict_checked(payload: InferenceRequest) -> InferenceResponse:
        try:
            check_infer_request(payload, limits)
        except RequestError as error:
            raise MLServerError(str(error), error.status) from None
        response = await predict(payload)
        for output in response.outputs:
            if output.name != OUTPUT_NAME:
                continue
            for text in getattr(output.data, "root", output.data):
                refused = error_from_json(text)  # a record is parsed once, by whoever reads it
                if refused is not None:
                    raise MLServerError(str(refused), refused.status)
        return response

    return predict_checked


@dataclasses.dataclass
class _Counter:
    count: int = 0


class _InFlight:
    """Pure ASGI middleware: counts HTTP requests in flight (for draining) and refuses a body whose
    declared length is over the limit (413) before it is read."""

    def __init__(self, app: Any, limit_bytes: int, counter: _Counter) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit_bytes:
            response = JSONResponse({"error": f"body of {int(length)} bytes is over the limit of "
                                              f"{self.limit_bytes} bytes"}, status_code=413)
            await response(scope, receive, send)
            return
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1


def page_html() -> str:
    """The page served at ``/`` (package data)."""
    return resources.files("ssd300").joinpath("serve_page.html").read_text(encoding="utf-8")


class SSD300Server(MLServer):
    """MLServer with the routes and checks of the module docstring, and a shutdown that drains."""

    def __init__(self, settings: Settings, model_name: str, limits: ServeLimits, drain_timeout_s: float = 60.0):
        self.model_name = model_name
        self.limits = limits
        self.drain_timeout_s = drain_timeout_s
        self._stopping = False
        super().__init__(settings)

    def _create_model_registry(self) -> Any:
        registry = super()._create_model_registry()

        async def check_requests(model: MLModel) -> MLModel:
            model.predict = _checked_predict(model.predict, self.limits)
            return model

        registry._on_model_load.append(check_requests)
        return registry

    def _create_servers(self) -> None:
        super()._create_servers()
        app = self._rest_server._app
        app.add_api_route("/", self._page, methods=["GET"], include_in_schema=False)
        app.add_api_route("/detect", self._detect, methods=["POST"])
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(json.JSONDecodeError, _validation_error)
        limit = int(self.limits.max_body_bytes * _V2_BODY_FACTOR) + _V2_BODY_SLACK
        self._in_flight = _Counter()
        app.add_middleware(_InFlight, limit_bytes=limit, counter=self._in_flight)

    async def _page(self) -> HTMLResponse:
        return HTMLResponse(page_html())

    async def _detect(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            body, name = await _upload(request, self.limits)
            check_image_header(body, self.limits)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        payload = InferenceRequest(inputs=[RequestInput(
            name=INPUT_NAME, shape=[1], datatype="BYTES", data=[base64.b64encode(body).decode("ascii")])])
        try:
            response = await self._data_plane.infer(payload, self.model_name)
        except MLServerError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status_code)
        text = getattr(response.outputs[0].data, "root", response.outputs[0].data)[0]
        record = json.loads(text)
        record["image"] = name
        record["server_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return JSONResponse(record)

    async def stop(self, sig: Optional[int] = None) -> None:
        """Drain, then stop: no new connections, the requests in flight answered, then the workers."""
        if self._stopping:
            return
        self._stopping = True
        log.info("ssd300 serve: stopping; draining %d requests in flight", self._in_flight.count)
        await self._rest_server.stop(sig)
        deadline = time.monotonic() + self.drain_timeout_s
        while self._in_flight.count > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await super().stop(sig)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A malformed request body in one line (FastAPI would list every field over many)."""
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"malformed request: {where + ': ' if where else ''}{first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
    else:
        message = f"malformed request: {exc}"
    return JSONResponse({"error": message}, status_code=400)


async def _upload(request: Request, limits: ServeLimits) -> tuple[bytes, Optional[str]]:
    """The image of a ``/detect`` request (raw body or the first file of a multipart form) and its file name."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception as exc:  # Starlette's multipart parser raises its own types
            raise RequestError(400, f"malformed multipart form ({exc})") from None
        files = [value for value in form.values() if hasattr(value, "read") and hasattr(value, "filename")]
        if not files:
            raise RequestError(400, "multipart form without a file field: send the image as a file")
        upload = files[0]
        body = await upload.read()
        check_body_size(len(body), limits)
        return body, upload.filename
    check_content_type(content_type, limits)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestError(413, f"body over the limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    check_body_size(len(body), limits)
    return body, request.headers.get("x-file-name")


def model_settings(config: ServeConfig, name: str, batch_timeout_ms: float) -> ModelSettings:
    return ModelSettings(
        name=name, implementation=SSD300Model, platform="ssd300",
        max_batch_size=config.max_batch_size, max_batch_time=batch_timeout_ms / 1000.0,
        inputs=[MetadataTensor(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[MetadataTensor(name=OUTPUT_NAME, datatype="BYTES", shape=[-1])],
        parameters=ModelParameters(extra={"ssd300": dataclasses.asdict(config)}),
    )


def serve(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS, model_name: str = "ssd300",
          grpc_port: Optional[int] = None, metrics_port: Optional[int] = None) -> int:
    """Run the server until SIGTERM/SIGINT (then drain and return 0). gRPC (MLServer's v2 gRPC) listens
    on ``grpc_port`` (default ``port + 1``), Prometheus metrics on ``metrics_port`` (``port + 2``)."""
    metrics_dir = tempfile.mkdtemp(prefix="ssd300-serve-metrics-")
    settings = Settings(
        host=host, http_port=port, grpc_port=grpc_port if grpc_port is not None else port + 1,
        metrics_port=metrics_port if metrics_port is not None else port + 2, metrics_dir=metrics_dir,
        parallel_workers=workers, debug=False, load_models_at_startup=False, model_repository_root=metrics_dir,
        gzip_enabled=False, server_name="ssd300", parallel_workers_timeout=30,
    )

    slots = os.path.join(metrics_dir, "worker_slots")  # removed with the folder
    config = dataclasses.replace(config, worker_slots=slots, workers=workers)

    async def main() -> None:
        server = SSD300Server(settings, model_name, config.serve_limits())
        await server.start([model_settings(config, model_name, batch_timeout_ms)])

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SSD300Model", "SSD300Server", "check_infer_request", "model_settings",
           "page_html", "serve"]
