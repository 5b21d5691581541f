"""Published weights by name and URL: downloaded once, verified, cached (ssd300.weights), without network:
a loopback HTTP server on 127.0.0.1 counts its requests."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ssd300 import weights
from ssd300.checkpoint import load_model, resolve_checkpoint
from ssd300.errors import UserInputError

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    slow: float = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.rsplit("/", 1)[1]))
            return
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        truncated = self.path.startswith("/truncated")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * (2 if truncated else 1)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        time.sleep(self.slow)
        self.wfile.write(body[half:])
        self.wfile.flush()
        if truncated:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    """(base URL, routes, hits) of a fresh loopback server, shut down after the test."""
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": {}, "slow": 0.0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD300_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def _no_temp_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_download_once_then_cache_hit_without_a_request(server, tmp_path):
    base, handler = server
    handler.routes["/w.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "w.bin"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert weights.download(f"{base}/w.bin", dest, sha256=sha, size=len(PAYLOAD), sha256_prefix=sha[:8]) == dest
    assert dest.read_bytes() == PAYLOAD and handler.hits["/w.bin"] == 1
    assert weights.download(f"{base}/w.bin", dest, sha256=sha) == dest
    assert handler.hits["/w.bin"] == 1  # cached: no request
    _no_temp_left(dest.parent)


@pytest.mark.parametrize("check", [{"sha256": "0" * 64}, {"sha256_prefix": "deadbeef"}, {"size": 10}])
def test_a_file_that_does_not_verify_is_deleted_with_one_line(server, tmp_path, check):
    base, handler = server
    handler.routes["/w.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "w.bin"
    with pytest.raises(UserInputError) as err:
        weights.download(f"{base}/w.bin", dest, **check)
    message = str(err.value)
    assert "\n" not in message and "does not verify" in message and "deleted" in message
    assert f"{base}/w.bin" in message and f"as w.bin in {dest.parent}" in message
    assert not dest.exists()
    _no_temp_left(dest.parent)


def test_truncated_transfer_is_deleted(server, tmp_path):
    base, handler = server
    handler.routes["/truncated.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "t.bin"
    with pytest.raises(UserInputError, match=r"could not download .*truncated\.bin \(connection closed after") as err:
        weights.download(f"{base}/truncated.bin", dest, timeout=5)
    assert "\n" not in str(err.value) and not dest.exists()
    _no_temp_left(dest.parent)


@pytest.mark.parametrize("code", [404, 500])
def test_server_error_is_one_line(server, tmp_path, code):
    base, _ = server
    dest = tmp_path / "dl" / "e.bin"
    with pytest.raises(UserInputError, match=f"server answered {code}") as err:
        weights.download(f"{base}/status/{code}", dest)
    assert "\n" not in str(err.value) and f"place it as e.bin in {dest.parent}" in str(err.value)
    assert not dest.exists()


def test_a_server_that_never_answers_times_out(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections (kernel backlog), never answers
    try:
        start = time.monotonic()
        with pytest.raises(UserInputError, match=r"no answer within 0.5 s"):
            weights.download(f"http://127.0.0.1:{listener.getsockname()[1]}/w.bin", tmp_path / "w.bin", timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        listener.close()
    assert not (tmp_path / "w.bin").exists()


def test_offline_is_one_line_naming_url_file_and_folder(tmp_path):
    url = f"http://127.0.0.1:{_refused_port()}/models/ssd.pt"
    with pytest.raises(UserInputError) as err:
        weights.download(url, tmp_path / "cache" / "ssd.pt")
    message = str(err.value)
    assert message.startswith(f"could not download {url} (offline or blocked: ")
    assert f"place it as ssd.pt in {tmp_path / 'cache'}" in message and "\n" not in message


def test_concurrent_fetches_download_once_and_the_file_is_intact(server, tmp_path):
    base, handler = server
    handler.routes["/big.bin"] = PAYLOAD * 8
    handler.slow = 0.3  # the first download is still running when the others start
    dest = tmp_path / "dl" / "big.bin"
    results: list[object] = []

    def fetch() -> None:
        try:
            results.append(weights.download(f"{base}/big.bin", dest, sha256=hashlib.sha256(PAYLOAD * 8).hexdigest()))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [dest] * 3
    assert handler.hits["/big.bin"] == 1 and dest.read_bytes() == PAYLOAD * 8
    _no_temp_left(dest.parent)


def test_concurrent_processes_download_once(server, tmp_path):
    base, handler = server
    handler.routes["/big.bin"] = PAYLOAD * 8
    handler.slow = 0.5
    dest = tmp_path / "dl" / "big.bin"
    code = f"from ssd300.weights import download; download({f'{base}/big.bin'!r}, {str(dest)!r}, timeout=20)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy()) for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert handler.hits["/big.bin"] == 1 and dest.read_bytes() == PAYLOAD * 8


def test_checkpoint_url_is_downloaded_once_checked_and_loaded(server, tiny_checkpoint, tmp_path, tiny_model):
    base, handler = server
    handler.routes["/runs/ssd.pt"] = tiny_checkpoint.read_bytes()
    url = f"{base}/runs/ssd.pt"
    model, label_map, _ = load_model(url)
    cached = weights.url_cache_path(url)
    assert cached.parent == tmp_path / "cache" / "weights" and cached.name.endswith("-ssd.pt") and cached.is_file()
    assert torch.equal(model.conf[0].weight, torch.load(tiny_checkpoint, weights_only=True)["model"]["conf.0.weight"])
    assert resolve_checkpoint(url) == cached and handler.hits["/runs/ssd.pt"] == 1


def test_a_downloaded_file_that_is_not_a_checkpoint_is_deleted(server, tmp_path):
    base, handler = server
    handler.routes["/junk.pt"] = PAYLOAD
    url = f"{base}/junk.pt"
    with pytest.raises(UserInputError, match=r"does not verify \(checkpoint the file: .*deleted") as err:
        resolve_checkpoint(url)
    assert "\n" not in str(err.value)
    assert not weights.url_cache_path(url).exists()


def test_published_name_resolves_through_the_registry(server, tiny_checkpoint, monkeypatch, tmp_path):
    base, handler = server
    handler.routes["/nv.pt"] = tiny_checkpoint.read_bytes()
    monkeypatch.setattr(weights, "NVIDIA_SSD300_COCO_URL", f"{base}/nv.pt")
    path = resolve_checkpoint("nvidia-ssd300-coco")
    assert path == tmp_path / "cache" / "weights" / "nvidia_ssdpyt_amp_200703.pt"
    from ssd300.inference import Detector

    detector = Detector.from_pretrained("nvidia-ssd300-coco", device="cpu")
    assert detector.label_map.num_classes == 3 and handler.hits["/nv.pt"] == 1
    with pytest.raises(UserInputError, match="is backbone weights, not an SSD300 checkpoint"):
        resolve_checkpoint("imagenet-resnet50")


def test_file_url_and_plain_paths(tiny_checkpoint, tmp_path):
    assert resolve_checkpoint(tiny_checkpoint.as_uri()) == tiny_checkpoint
    assert resolve_checkpoint(str(tiny_checkpoint)) == tiny_checkpoint
    assert resolve_checkpoint("no/such/file.pt") == Path("no/such/file.pt")  # the caller says "not found"


def test_imagenet_files_live_in_torch_hub_cache_under_torch_home(tmp_path):
    entry = weights.imagenet_weights("resnet50")
    assert entry.path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert entry.sha256_prefix == "0676ba61" and entry.url.startswith("https://download.pytorch.org/")
    rows = {r["name"]: r for r in weights.describe_cache()}
    assert set(rows) == {"imagenet-resnet18", "imagenet-resnet34", "imagenet-resnet50", "imagenet-resnet101",
                         "imagenet-resnet152", "nvidia-ssd300-coco"}
    assert not any(r["cached"] for r in rows.values())


def test_imagenet_backbone_default_uses_the_cached_file_and_fails_offline_in_one_line(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    from ssd300.train_config import TrainConfig, resolve_backbone_weights

    config = TrainConfig(backbone="resnet18", backbone_weights="imagenet")
    entry = weights.imagenet_weights("resnet18")
    url = f"http://127.0.0.1:{_refused_port()}/models/{entry.file_name}"
    monkeypatch.setattr(weights, "_imagenet_entry",
                        lambda b: weights.PublishedWeights(entry.name, "backbone", "x", url, entry.file_name))
    with pytest.raises(UserInputError) as err:
        resolve_backbone_weights(config)
    message = str(err.value)
    assert message.startswith(f"backbone_weights imagenet: could not download {url}") and "\n" not in message
    assert f"as {entry.file_name} in {entry.path.parent}" in message and err.value.fields == ("backbone_weights",)
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet18().state_dict(), entry.path)  # as torchvision leaves it in the cache
    assert resolve_backbone_weights(config).backbone_path == entry.path
    assert resolve_backbone_weights(config.replace(backbone_weights="none")).backbone_path is None


def test_cli_offline_checkpoint_url_stops_before_any_other_work(tmp_path):
    url = f"http://127.0.0.1:{_refused_port()}/ssd.pt"
    proc = subprocess.run([sys.executable, "-m", "ssd300", "evaluate", "--checkpoint", url,
                           "--data", str(tmp_path / "no-such-dataset")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "--checkpoint could not download" in lines[0]
    assert str(tmp_path / "cache" / "weights") in lines[0] and "no-such-dataset" not in lines[0]


def test_weights_command_lists_names_state_and_caches(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssd300", "weights"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nvidia-ssd300-coco" in proc.stdout and "imagenet-resnet50" in proc.stdout
    assert "not cached" in proc.stdout and str(tmp_path / "torch" / "hub" / "checkpoints") in proc.stdout
    assert str(tmp_path / "cache" / "weights") in proc.stdout
