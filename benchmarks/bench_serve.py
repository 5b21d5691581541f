"""``ssd300 serve`` under load on the loopback: requests/s and p50/p99 latency at concurrency 1/8/32
against sequential ``ssd300 detect`` on the same images and the same runner, every answer checked
against detect's, and the server's memory (RSS of the server and its workers) over the run.

Model: bench_inference's ResNet-50 SSD300 with random, score-calibrated weights (COCO's 80 classes),
as a checkpoint (PyTorch fp32, PyTorch bf16 where the CPU has native bf16) and as an INT8 ONNX file
(nncf, calibrated on the benchmark's photographs) run by OpenVINO. Images: 640x480 JPEG crops of
real photographs (benchmarks/common.py).

``--compare-engines`` first runs the engine comparison of the issue: the same DetectionService
(INT8 on OpenVINO) behind MLServer's v2 endpoint and behind LitServe, the same base64 JSON requests,
concurrency 32.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --duration 60 --compare-engines
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import make_jpegs, percentile

from ssd300.serving import DEFAULT_BATCH_TIMEOUT_MS, ServeConfig

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then whatever the server left behind (LitServe's workers outlive a SIGTERM'd parent)."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait(10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()
    return code


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def idle_seconds() -> float:
    """The machine's idle CPU seconds so far (all cores): what nobody used."""
    import psutil

    return float(psutil.cpu_times().idle)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by the server process itself and by its children (workers)."""
    import psutil

    def used(proc: Any) -> float:
        try:
            times = proc.cpu_times()
            return float(times.user + times.system)
        except psutil.NoSuchProcess:
            return 0.0

    root = psutil.Process(pid)
    return used(root), sum(used(child) for child in root.children(recursive=True))


@dataclasses.dataclass
class LoadResult:
    concurrency: int
    seconds: float
    ok: int
    errors: int
    wrong: int
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def row(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "requests": self.ok + self.errors, "errors": self.errors,
                "wrong": self.wrong, "images_per_s": round(self.rps, 1),
                "p50_ms": round(percentile(self.latencies_ms, 50), 1),
                "p99_ms": round(percentile(self.latencies_ms, 99), 1)}


def same_detections(got: list[dict[str, Any]], want: list[dict[str, Any]], floor: float = 0.3,
                    score_tol: float = 2e-3, box_tol: float = 1.0) -> bool:
    """The same answer up to float noise: every detection scoring >= ``floor`` on one side has one on
    the other with the same class, its box within ``box_tol`` pixels and its score within
    ``score_tol``. Order is not compared (near-equal scores swap places when the thread count or
    the batch changes the last bits), nor detections within ``score_tol`` of the floor. Vectorised:
    the client shares the server's cores, so its checks must cost next to nothing."""
    def arrays(side: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([d["label"] for d in side], dtype=np.int64),
                np.array([d["score"] for d in side], dtype=np.float64),
                np.array([d["box"] for d in side], dtype=np.float64).reshape(-1, 4))

    a, b = arrays(got), arrays(want)
    close = ((a[0][:, None] == b[0][None, :]) & (np.abs(a[1][:, None] - b[1][None, :]) <= score_tol)
             & (np.abs(a[2][:, None, :] - b[2][None, :, :]) <= box_tol).all(axis=2))
    must_a, must_b = a[1] >= floor + score_tol, b[1] >= floor + score_tol
    return bool(close.any(axis=1)[must_a].all() and close.any(axis=0)[must_b].all())


async def load(url: str, make_request: Callable[[int], tuple[bytes, dict[str, str]]],
               read_detections: Callable[[Any], list[dict[str, Any]]], expected: list[list[dict[str, Any]]],
               concurrency: int, duration_s: float) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "wrong": 0}
    next_index = 0
    deadline = time.perf_counter() + duration_s
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client() -> None:
            nonlocal next_index
            while time.perf_counter() < deadline:
                index = next_index % len(expected)
                next_index += 1
                body, headers = make_request(index)
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        answer = await response.json(content_type=None)
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    counts["errors"] += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    counts["errors"] += 1
                    continue
                counts["ok"] += 1
                if not same_detections(read_detections(answer), expected[index]):
                    counts["wrong"] += 1

        started = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    return LoadResult(concurrency, elapsed, counts["ok"], counts["errors"], counts["wrong"], latencies)


def repeated_folder(images: Path, folder: Path, repeat: int) -> Path:
    """``images`` ``repeat`` times over (hard links ``r<k>_<name>``): enough work for ``detect``'s
    steady rate, its first batches (warm-up) a small part of it, as the server's are after warm-up."""
    if not folder.exists():
        folder.mkdir()
        for k in range(repeat):
            for path in sorted(images.glob("*.jpg")):
                os.link(path, folder / f"r{k}_{path.name}")
    return folder


def sequential_detect(model_flags: list[str], images: Path, out: Path, batch_size: int = 8, repeat: int = 8
                      ) -> tuple[float, list[list[dict[str, Any]]]]:
    """``ssd300 detect`` over the folder's images ``repeat`` times (batches of ``batch_size``, all
    cores): images/s, and the answers for each image of the folder."""
    work = repeated_folder(images, images.parent / f"{images.name}_x{repeat}", repeat)
    command = [PYTHON, "-m", "ssd300", "detect", str(work), *model_flags, "--out", str(out), "--no-images",
               "--batch-size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"([\d.]+) images/s\)", done.stdout + done.stderr)  # "(N detected in T s, R images/s)"
    assert found, done.stdout + done.stderr
    paths = sorted(images.glob("*.jpg"))
    answers = [json.loads((out / "detections" / f"r0_{p.stem}.json").read_text())["detections"] for p in paths]
    return float(found.group(1)), answers


def in_process_cpu_ms(model: Path, images: list[str], **options: Any) -> tuple[float, float]:
    """``detect``'s Detector run in this process (batch 8, all cores) on ``images`` after one warm-up
    batch: (images/s, CPU ms per image), the CPU figure barely moved by other programs' load."""
    from ssd300.inference import Detector

    detector = Detector.from_model_file(model, batch_size=8, **options)
    list(detector.detect_files(images[:8]))
    wall, cpu = time.perf_counter(), time.process_time()
    list(detector.detect_files(images))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(images) / wall, 1000 * cpu / len(images)


def start_mlserver(model_flags: list[str], workers: int, batch: int, timeout_ms: float, log: Path
                   ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [PYTHON, "-m", "ssd300", "serve", *model_flags, "--port", str(port), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port()), "--workers", str(workers), "--max-batch-size", str(batch),
               "--batch-timeout-ms", str(timeout_ms)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", process)
    return process, port


# ----------------------------------------------------------------------------- LitServe (comparison only)


try:  # only for the engine comparison; module level, so LitServe's spawned workers can unpickle it
    import litserve as ls

    class LitDetectionApi(ls.LitAPI):  # type: ignore[misc]
        """The comparison's LitServe API: the same DetectionService, base64 JSON in, the same JSON out."""

        config_json = "{}"

        def setup(self, device: str) -> None:
            from ssd300.serving import DetectionService, ServeConfig

            self.service = DetectionService.from_config(ServeConfig(**json.loads(self.config_json)))

        def decode_request(self, request: dict) -> bytes:  # type: ignore[type-arg]  # LitServe parses JSON by this
            return base64.b64decode(request["image"])

        def predict(self, bodies: Any) -> Any:
            return self.service.detect(list(bodies))

        def encode_response(self, result: Any) -> Any:
            from ssd300.serving import RequestError

            if isinstance(result, RequestError):
                raise ValueError(str(result))
            return result
except ImportError:
    ls = None


def litserve_child(config_json: str, port: int, workers: int, batch: int, timeout_ms: float) -> None:
    api = LitDetectionApi(max_batch_size=batch, batch_timeout=timeout_ms / 1000)
    api.config_json = config_json
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def start_litserve(config: dict[str, Any], workers: int, batch: int, timeout_ms: float, log: Path
                   ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [PYTHON, __file__, "--litserve-child", json.dumps(config), "--port", str(port),
               "--workers", str(workers), "--max-batch-size", str(batch), "--batch-timeout-ms", str(timeout_ms)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/health", process)
    return process, port


def installed_mb(*distributions: str) -> float:
    """Disk size of the given distributions and their not-yet-counted requirements (site-packages)."""
    from importlib import metadata

    seen: set[str] = set()
    total = 0
    pending = list(distributions)
    while pending:
        name = re.split(r"[\s\[<>=!~;(]", pending.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                total += path.stat().st_size
        pending += [r for r in (dist.requires or []) if "extra ==" not in r]
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before each runner's figures")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runners", nargs="+", default=["int8-openvino", "bf16", "fp32"],
                        choices=["int8-openvino", "bf16", "fp32"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--detect-repeat", type=int, default=8,
                        help="sequential detect runs over the images this many times (its steady rate)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size)
    parser.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT_MS)
    parser.add_argument("--compare-engines", action="store_true")
    parser.add_argument("--compare-duration", type=float, default=20.0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--litserve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.litserve_child:
        litserve_child(args.litserve_child, args.port, args.workers, args.max_batch_size, args.batch_timeout_ms)
        return

    import torch

    from bench_inference import calibrated_model

    from ssd300.checkpoint import model_checkpoint, save_checkpoint
    from ssd300.labels import LabelMap
    from ssd300.quantize import export_int8
    from ssd300.runtime import native_bf16

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, native bf16: {native_bf16()}; "
          f"{args.workers} workers, batches of up to {args.max_batch_size} ({args.batch_timeout_ms:g} ms)")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = folder / "images"
        images.mkdir()
        paths = make_jpegs(images, args.images)
        model, _ = calibrated_model(paths, 400)
        label_map = LabelMap.coco2017()
        checkpoint = folder / "ssd300.pt"
        save_checkpoint(checkpoint, model_checkpoint(model, label_map))
        int8 = export_int8(model, label_map, folder / "int8.onnx", images, min(32, args.images), quantizer="nncf")
        in_process = {"int8-openvino": (int8, {"runtime": "openvino"}), "bf16": (checkpoint, {"amp": True}),
                      "fp32": (checkpoint, {})}
        runners = {
            "int8-openvino": ("INT8 on OpenVINO", ["--model", str(int8), "--runtime", "openvino"]),
            "bf16": ("PyTorch bf16", ["--checkpoint", str(checkpoint), "--amp"]),
            "fp32": ("PyTorch fp32", ["--checkpoint", str(checkpoint)]),
        }
        bodies = [Path(p).read_bytes() for p in sorted(paths)]
        b64 = [base64.b64encode(b).decode("ascii") for b in bodies]

        if args.compare_engines:
            name, flags = runners["int8-openvino"]
            _, expected = sequential_detect(flags, images, folder / "detect_compare", repeat=1)
            threads = max(1, (os.cpu_count() or 1) // args.workers)
            config = {"model": str(int8), "runtime": "openvino", "max_batch_size": args.max_batch_size,
                      "threads": threads}
            engines: dict[str, Any] = {}
            for engine in ("mlserver", "litserve"):
                log = folder / f"{engine}.log"
                if engine == "mlserver":
                    process, port = start_mlserver(flags, args.workers, args.max_batch_size, args.batch_timeout_ms,
                                                   log)
                    url = f"http://127.0.0.1:{port}/v2/models/ssd300/infer"

                    def make_v2(i: int) -> tuple[bytes, dict[str, str]]:
                        return (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                        "data": [b64[i]]}]}).encode(),
                                {"Content-Type": "application/json"})

                    def read_v2(answer: Any) -> list[dict[str, Any]]:
                        return json.loads(answer["outputs"][0]["data"][0])["detections"]

                    make, read = make_v2, read_v2
                else:
                    process, port = start_litserve(config, args.workers, args.max_batch_size, args.batch_timeout_ms,
                                                   log)
                    url = f"http://127.0.0.1:{port}/predict"

                    def make_lit(i: int) -> tuple[bytes, dict[str, str]]:
                        return json.dumps({"image": b64[i]}).encode(), {"Content-Type": "application/json"}

                    def read_lit(answer: Any) -> list[dict[str, Any]]:
                        return answer["detections"]

                    make, read = make_lit, read_lit
                try:
                    asyncio.run(load(url, make, read, expected, 32, args.warmup))
                    result = asyncio.run(load(url, make, read, expected, 32, args.compare_duration))
                finally:
                    code = stop(process)
                row = result.row()
                row["exit_code"] = code
                row["install_mb"] = round(installed_mb(engine), 0)
                engines[engine] = row
                print(f"engine {engine}: {row}", flush=True)
            figures["engines"] = engines

        for key in args.runners:
            name, flags = runners[key]
            detect_rate, expected = sequential_detect(flags, images, folder / f"detect_{key}",
                                                      repeat=args.detect_repeat)
            detect_b1, _ = sequential_detect(flags, images, folder / f"detect_b1_{key}", batch_size=1,
                                             repeat=args.detect_repeat)
            model_file, options = in_process[key]
            local_rate, local_cpu = in_process_cpu_ms(model_file, [str(p) for p in sorted(paths)], **options)
            print(f"{name}: sequential `ssd300 detect`: {detect_rate:.1f} images/s (batch 8), {detect_b1:.1f} "
                  f"(batch 1); its Detector in-process: {local_rate:.1f} images/s, {local_cpu:.0f} ms CPU per image",
                  flush=True)
            process, port = start_mlserver(flags, args.workers, args.max_batch_size, args.batch_timeout_ms,
                                           folder / f"serve_{key}.log")
            url = f"http://127.0.0.1:{port}/detect"

            def make_raw(i: int) -> tuple[bytes, dict[str, str]]:
                return bodies[i], {"Content-Type": "image/jpeg"}

            def read_raw(answer: Any) -> list[dict[str, Any]]:
                return answer["detections"]

            rows = []
            try:
                asyncio.run(load(url, make_raw, read_raw, expected, max(args.concurrency), args.warmup))
                rss_start = tree_rss_mb(process.pid)
                rss_peak = rss_start
                for concurrency in args.concurrency:
                    cpu_before, idle_before = cpu_seconds(process.pid), idle_seconds()
                    client_before = time.process_time()
                    result = asyncio.run(load(url, make_raw, read_raw, expected, concurrency, args.duration))
                    cpu_after, idle_after = cpu_seconds(process.pid), idle_seconds()
                    client_after = time.process_time()
                    rss = tree_rss_mb(process.pid)
                    rss_peak = max(rss_peak, rss)
                    row = result.row()
                    row["rss_mb"] = round(rss, 0)
                    row["speedup_vs_detect"] = round(result.rps / detect_rate, 2)
                    row["speedup_vs_detect_b1"] = round(result.rps / detect_b1, 2)
                    # cores busy on average: the HTTP/batching process, the workers
                    row["server_cores"] = round((cpu_after[0] - cpu_before[0]) / result.seconds, 2)
                    row["worker_cores"] = round((cpu_after[1] - cpu_before[1]) / result.seconds, 2)
                    row["client_cores"] = round((client_after - client_before) / result.seconds, 2)
                    row["idle_cores"] = round((idle_after - idle_before) / result.seconds, 2)  # the machine's
                    row["cpu_ms_per_image"] = round(1000 * (sum(cpu_after) - sum(cpu_before)) / max(result.ok, 1), 1)
                    rows.append(row)
                    print(f"  {name} c={concurrency}: {row}", flush=True)
            finally:
                code = stop(process)
            figures[key] = {"runner": name, "detect_images_per_s": detect_rate, "detect_b1_images_per_s": detect_b1,
                            "detector_cpu_ms_per_image": round(local_cpu, 1),
                            "levels": rows,
                            "rss_after_warmup_mb": round(rss_start, 0), "rss_peak_mb": round(rss_peak, 0),
                            "rss_growth_pct": round(100 * (rss_peak - rss_start) / max(rss_start, 1), 1),
                            "sigterm_exit_code": code}
            print(f"  {name}: RSS {rss_start:.0f} MB after warm-up, peak {rss_peak:.0f} MB; SIGTERM exit {code}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
