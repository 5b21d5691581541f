"""``ssd300 serve``: an inference server (MLServer) for a checkpoint, a published name or an exported file.

Speaks the Open Inference Protocol (KServe v2: ``/v2/health/ready``, ``/v2/models/<name>``,
``/v2/models/<name>/infer``), takes plain uploads at ``POST /detect`` and shows a page to try it at
``/``; requests are batched across clients (``--max-batch-size``, ``--batch-timeout-ms``) and run by
``--workers`` processes. See :mod:`ssd300.serving_mlserver`. SIGTERM/SIGINT: the requests in flight
are answered, then the server exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ssd300.commands.detect import _check_model_path, build_detector, model_flag
from ssd300.commands.options import add_postprocess_arguments, postprocess_config
from ssd300.errors import UserInputError
from ssd300.exported import RUNTIMES
from ssd300.runners import BACKENDS
from ssd300.serving import DEFAULT_BATCH_TIMEOUT_MS, ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="the model to serve: an SSD300 checkpoint, a published name (`ssd300 weights`) or a file "
                             "from `ssd300 export` (ONNX fp32/INT8, pt2, TorchScript); required (or --model)")
    parser.add_argument("--model", default=None, help="the same as --checkpoint (give one of them)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="for an exported ONNX file: onnxruntime (auto) or openvino")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=None, help="v2 gRPC port (default --port + 1)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics port (default --port + 2)")
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker (default: the cores shared evenly between the workers)")
    parser.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size,
                        help="images batched across requests (default %(default)s; on a GPU try 16-32)")
    parser.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT_MS,
                        help="how long a batch waits for more requests before it runs (default %(default)s; "
                             "0: no batching)")
    parser.add_argument("--name", default="ssd300", help="the model's name in the v2 protocol")
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="largest image upload accepted, in MiB")
    parser.add_argument("--max-megapixels", type=float, default=40.0, help="largest image accepted, in megapixels")
    add_postprocess_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                        help="mixed precision as `ssd300 detect --amp` (bf16 on a CPU with native bf16)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="run a checkpoint with PyTorch or onnxruntime")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode big JPEGs at full size (default: reduced DCT scale, as `ssd300 detect`)")


def _resolve_model(value: str, flag: str) -> str:
    """A model file as given, else a published name or URL fetched into the cache."""
    if Path(value).expanduser().exists():
        _check_model_path(value, flag)
        return str(Path(value).expanduser())
    if "/" not in value and "\\" not in value or value.startswith(("http://", "https://", "file://")):
        from ssd300.checkpoint import resolve_checkpoint

        return str(resolve_checkpoint(value))
    raise UserInputError(f"{flag} {value}: no such file")


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--workers", args.workers, 1), ("--max-batch-size", args.max_batch_size, 1),
                             ("--port", args.port, 1)):
        if value < low:
            raise UserInputError(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserInputError(f"--threads must be >= 1, got {args.threads}")
    if args.batch_timeout_ms < 0:
        raise UserInputError(f"--batch-timeout-ms must be >= 0, got {args.batch_timeout_ms}")
    if args.max_body_mb <= 0 or args.max_megapixels <= 0:
        raise UserInputError("--max-body-mb and --max-megapixels must be > 0")


def run(args: argparse.Namespace) -> int:
    flag = model_flag(args)
    postprocess = postprocess_config(args)
    _check_args(args)
    from ssd300.serving import ServeLimits, threads_per_worker
    from ssd300.serving_mlserver import serve  # a missing engine is one line before the model loads

    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         max_pixels=int(args.max_megapixels * 1_000_000))
    config = ServeConfig(
        model=_resolve_model(args.checkpoint, flag), runtime=args.runtime, device=args.device, amp=args.amp,
        backend=args.backend, postprocess=dataclasses.asdict(postprocess), max_batch_size=args.max_batch_size,
        draft=not args.full_decode, threads=args.threads or threads_per_worker(args.workers),
        limits=dataclasses.asdict(limits))
    # Built once here, as `ssd300 detect` builds it, before any worker starts: a bad model or flag is
    # one line now, not a worker's traceback.
    args.model_flag, args.checkpoint, args.batch_size = flag, config.model, config.max_batch_size
    probe = build_detector(args, postprocess)
    print(f"ssd300 serve: {probe.runner.describe()}; {args.workers} workers x {config.threads} threads, batches of "
          f"up to {args.max_batch_size} ({args.batch_timeout_ms:g} ms); http://{args.host}:{args.port}/",
          file=sys.stderr)
    del probe
    return serve(config, host=args.host, port=args.port, workers=args.workers,
                 batch_timeout_ms=args.batch_timeout_ms, model_name=args.name, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port)
