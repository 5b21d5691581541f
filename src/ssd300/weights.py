"""Published weights by name: downloaded once, verified, cached.

The registry (:data:`REGISTRY`):

* ``imagenet-resnet18`` .. ``imagenet-resnet152``: torchvision's ``ResNet<n>_Weights.IMAGENET1K_V1``
  (the URL comes from torchvision's weights API). Kept where torchvision keeps them, in torch's hub
  cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``); the hex digits in each file
  name are the start of its sha256, checked as ``torch.hub`` checks them.
* ``nvidia-ssd300-coco``: NVIDIA's COCO-trained SSD300 (ResNet-50) checkpoint, the one the
  reference's ``nvidia_ssd(pretrained=True)`` downloads (``PyTorch/Detection/SSD/ssd/entrypoints.py``
  in NVIDIA's DeepLearningExamples). NVIDIA publishes neither a hash nor a size for it; a download
  is checked as a checkpoint (read with ``weights_only``, its architecture inferred) before it is
  kept. Kept in ``ssd300.files.cache_dir("weights")`` (``$SSD300_CACHE_DIR/weights``).

Any ``http(s)://`` URL given where a checkpoint is accepted is downloaded once into that cache too
(:func:`resolve_weights`). A download (:func:`download`): temp file beside the target, renamed only
once complete and verified (size, hash, structure); a progress bar on a terminal; a timeout on
connecting and on every read; a lock file (``fcntl.flock``) so two processes fetching the same file
download it once. Every failure is one :class:`~ssd300.errors.UserInputError` line naming the URL,
the expected file name and where to place it by hand.

This module imports no model code (``checkpoint`` and ``backbone`` import it and pass their checks
in as ``check``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import UserInputError
from .files import PathLike, atomic_path, cache_dir

DEFAULT_TIMEOUT = 30.0  # seconds, for connecting and for each read (socket timeout)
_CHUNK = 1 << 16

NVIDIA_SSD300_COCO_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/ssd_pyt_ckpt_amp/versions/20.06.0/"
                          "files/nvidia_ssdpyt_amp_200703.pt")
IMAGENET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class PublishedWeights:
    """One entry of the registry: where it comes from, what it is, what can be checked."""

    name: str
    kind: str                      # "backbone" (a torchvision ResNet state dict) or "checkpoint" (SSD300)
    description: str
    url: str
    file_name: str
    sha256_prefix: Optional[str] = None   # torch.hub's check: the file's sha256 starts with it
    sha256: Optional[str] = None          # only where one is published
    size: Optional[int] = None            # bytes, only where published

    @property
    def folder(self) -> Path:
        if self.kind == "backbone":
            return torch_hub_checkpoints()
        return cache_dir("weights")

    @property
    def path(self) -> Path:
        return self.folder / self.file_name


def torch_hub_checkpoints() -> Path:
    """torchvision's weight cache: ``$TORCH_HOME/hub/checkpoints`` (torch.hub's rule, default ~/.cache/torch)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _imagenet_entry(backbone: str) -> PublishedWeights:
    from torchvision import models

    enum_name = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50",
                 "resnet101": "ResNet101", "resnet152": "ResNet152"}[backbone] + "_Weights"
    url = getattr(models, enum_name).IMAGENET1K_V1.url
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    prefix = file_name.rsplit("-", 1)[-1].split(".", 1)[0]   # torch.hub.HASH_REGEX's group
    return PublishedWeights(f"imagenet-{backbone}", "backbone", f"torchvision {enum_name}.IMAGENET1K_V1",
                            url, file_name, sha256_prefix=prefix)


def registry() -> dict[str, PublishedWeights]:
    """The published weights by name (built on call: the ImageNet URLs come from torchvision)."""
    entries = [_imagenet_entry(b) for b in IMAGENET_BACKBONES]
    entries.append(PublishedWeights(
        "nvidia-ssd300-coco", "checkpoint", "NVIDIA's SSD300 v1.1 (ResNet-50) trained on COCO 2017, 80 classes",
        NVIDIA_SSD300_COCO_URL, "nvidia_ssdpyt_amp_200703.pt"))
    return {e.name: e for e in entries}


def imagenet_weights(backbone: str) -> PublishedWeights:
    return registry()[f"imagenet-{backbone}"]


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0].lower() in ("http", "https", "file") and "://" in value


def is_weights_reference(value: object) -> bool:
    """A registry name or a URL (something :func:`resolve_weights` turns into a local file)."""
    return isinstance(value, str) and (is_url(value) or value in _NAMES)


_NAMES = (*(f"imagenet-{b}" for b in IMAGENET_BACKBONES), "nvidia-ssd300-coco")


def url_cache_path(url: str) -> Path:
    """Where a checkpoint URL is cached: ``cache_dir("weights")/<12 hex of the URL's sha256>-<basename>``."""
    base = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pt"
    return cache_dir("weights") / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def resolve_weights(value: PathLike, *, kind: str = "checkpoint", what: str = "checkpoint",
                    check: Optional[Callable[[Path], None]] = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """A local file for ``value``: an existing path as it is; a registry name or an ``http(s)://`` URL
    downloaded once (then read from the cache with no request); a ``file://`` URL as its local path.

    ``check(path)`` verifies a fresh download's structure before it is kept (raises
    :class:`UserInputError` to refuse it). Anything else is returned as a ``Path`` for the caller's
    own "file not found".
    """
    if not isinstance(value, str) or Path(value).exists():
        return Path(value)
    if value in _NAMES:
        entry = registry()[value]
        if entry.kind != kind:
            kinds = {"checkpoint": "an SSD300 checkpoint", "backbone": "backbone weights"}
            raise UserInputError(f"{what} {value}: {entry.description} is {kinds[entry.kind]}, not {kinds[kind]}")
        return fetch(entry, check=check, timeout=timeout)
    if not is_url(value):
        return Path(value)
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return download(value, url_cache_path(value), check=check, timeout=timeout)


def fetch(entry: PublishedWeights, *, check: Optional[Callable[[Path], None]] = None,
          timeout: float = DEFAULT_TIMEOUT) -> Path:
    """The registry entry's local file, downloaded and verified the first time."""
    return download(entry.url, entry.path, sha256=entry.sha256, sha256_prefix=entry.sha256_prefix,
                    size=entry.size, check=check, timeout=timeout)


def download(url: str, dest: PathLike, *, sha256: Optional[str] = None, sha256_prefix: Optional[str] = None,
             size: Optional[int] = None, check: Optional[Callable[[Path], None]] = None,
             timeout: float = DEFAULT_TIMEOUT, progress: Optional[bool] = None) -> Path:
    """``url`` into ``dest`` once: a cached ``dest`` is returned without a request.

    Otherwise, under a lock on ``dest`` (a second process waits, then finds the file), the body is
    streamed into a temp file beside ``dest`` with ``timeout`` seconds for connecting and for each
    read, checked (length announced by the server, ``size``, ``sha256``/``sha256_prefix``,
    ``check``) and renamed to ``dest``. Any failure deletes the temp file and raises one line.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create the weights cache {dest.parent}: {exc.strerror or exc}") from None
    with _locked(dest):
        if dest.is_file():  # another process finished it while we waited
            return dest
        with atomic_path(dest) as tmp:
            digest = _fetch_to(url, dest, tmp, timeout, progress)
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise _refused(url, dest, f"{got} bytes, expected {size}")
            if sha256 is not None and digest != sha256:
                raise _refused(url, dest, f"sha256 {digest[:16]}..., expected {sha256[:16]}...")
            if sha256_prefix is not None and not digest.startswith(sha256_prefix):
                raise _refused(url, dest, f"sha256 starts {digest[:len(sha256_prefix)]}, expected {sha256_prefix}")
            if check is not None:
                try:
                    check(tmp)
                except UserInputError as err:
                    detail = str(err).replace(str(tmp), "the file")
                    raise _refused(url, dest, detail) from None
    return dest


def _place_hint(url: str, dest: Path) -> str:
    return f"download {url} by hand and place it as {dest.name} in {dest.parent}"


def _refused(url: str, dest: Path, detail: str) -> UserInputError:
    detail = " ".join(detail.split())
    return UserInputError(f"downloaded {url} does not verify ({detail}): deleted; {_place_hint(url, dest)}")


def _failed(url: str, dest: Path, detail: str) -> UserInputError:
    return UserInputError(f"could not download {url} ({' '.join(detail.split())}); {_place_hint(url, dest)}")


def _fetch_to(url: str, dest: Path, tmp: Path, timeout: float, progress: Optional[bool]) -> str:
    """Stream ``url`` into ``tmp``; returns the sha256 hex digest. Network problems -> one line."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "ssd300"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            expected = int(total) if total and total.isdigit() else None
            received = 0
            with _progress_bar(expected, dest.name, progress) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar(len(chunk))
            if expected is not None and received != expected:
                raise _failed(url, dest, f"connection closed after {received} of {expected} bytes")
    except urllib.error.HTTPError as exc:
        raise _failed(url, dest, f"server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _failed(url, dest, f"no answer within {timeout:g} s") from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise _failed(url, dest, f"offline or blocked: {text}") from None
    except (socket.timeout, TimeoutError):
        raise _failed(url, dest, f"no answer within {timeout:g} s") from None
    except http.client.IncompleteRead as exc:
        raise _failed(url, dest, f"connection closed after {len(exc.partial)} bytes") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise _failed(url, dest, f"connection failed: {type(exc).__name__} {exc}") from None
    return digest.hexdigest()


@contextlib.contextmanager
def _progress_bar(total: Optional[int], name: str, enabled: Optional[bool]) -> Iterator[Callable[[int], Any]]:
    """tqdm on a terminal (stderr), nothing otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr) as bar:
        yield bar.update


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<dest>.lock`` (released when the process dies, so never stale)."""
    import fcntl

    lock = dest.with_name(dest.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def describe_cache() -> list[dict[str, Any]]:
    """Every registry entry with its state: ``name, kind, description, url, path, cached, size``."""
    rows = []
    for entry in registry().values():
        path = entry.path
        cached = path.is_file()
        rows.append({"name": entry.name, "kind": entry.kind, "description": entry.description, "url": entry.url,
                     "path": path, "cached": cached, "size": path.stat().st_size if cached else entry.size})
    return rows
