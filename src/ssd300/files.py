"""Files in and out: untrusted PyTorch files read safely, every output written atomically.

``read_torch_file`` (``torch.load(weights_only=True)``, one-line errors) serves checkpoints
(:mod:`ssd300.checkpoint`) and ImageNet backbone weights (:mod:`ssd300.backbone`); this module
imports no model code, so both use it without an import cycle.

One owner per file policy:

- :func:`atomic_write` is the one way any output reaches its final path (checkpoints, JSON,
  figures, exported models, caches): a temp file beside the target, fsync, rename. A failed
  write (full disk, quota, I/O error) leaves the previous file untouched, removes the temp file
  and raises one line naming the file. The file gets the permissions the umask gives (0644 by
  default), like any file the user's tools create, not the 0600 of a temp file.
  Writers that wrap the OSError in their own exception type (exporters, PIL, torch's C++ zip
  writer, whose "unexpected pos" RuntimeError drops it) are recognised too: the OSError is found
  through ``__cause__``/``__context__`` (:func:`find_disk_error`) or remembered from the failed
  ``write``. The error is a :class:`DiskError` (a UserInputError: exit 2).
- :func:`write_bytes` writes what was serialised in memory (TorchScript, ExportedProgram: their
  C++ file writers abort the process on a full disk, a buffer cannot fail).
- :func:`write_json` is the one JSON writer (results, detections, run summaries).
- :func:`cache_dir` is the one cache folder (annotation index, ONNX of the onnxruntime runner).
- :func:`check_output_path` is the one check of an output path before the work starts.
- :data:`PathLike` is the one path type of the package's signatures.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator, Literal, Optional, Union, cast

from .errors import UserInputError, one_line

if TYPE_CHECKING:
    import torch

# torch is imported where a file is read, so that writers and checks (synth, the CLI) stay light.
PathLike = Union[str, "os.PathLike[str]"]
MapLocation = Union[str, "torch.device", None]


@contextlib.contextmanager
def _counter_allowed() -> Iterator[None]:
    import torch

    # MultiStepLR.state_dict() keeps its milestones in a collections.Counter; the reference's
    # checkpoints carry it. Recent torch allows it by default, older ones need the allow-list.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        yield
    else:
        with safe_globals([collections.Counter]):
            yield


def read_torch_file(path: PathLike, what: str = "checkpoint", map_location: MapLocation = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line UserInputError.

    ``what`` names the file's role in messages ("checkpoint", "backbone weights").
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    try:
        with _counter_allowed(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() and _looks_like_pickle(path):
            raise UserInputError(
                f"{what} {path}: refused: it holds pickled Python objects other than tensors and plain "
                f"data{_refused_detail(exc)}, which could run code when loaded, so it was not loaded; "
                "use only files from sources you trust, saved as plain state dicts"
            ) from None
        raise UserInputError(f"{what} {path}: not a PyTorch file, or corrupted") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/key errors all mean an unreadable file
        raise UserInputError(f"{what} {path}: not a PyTorch file, or truncated/corrupted ({one_line(exc)})") from None


def _looks_like_pickle(path: Path) -> bool:
    # torch's zip format, or a raw/legacy pickle (PROTO opcode); anything else is just not ours.
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refused_detail(exc: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" ({found.group(1)})" if found else ""


def strip_module_prefix(key: str) -> str:
    """A state-dict key without the ``module.`` prefixes DataParallel/DDP add (any number)."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def json_ready(value: Any) -> Any:
    """JSON-ready: paths as strings, non-finite floats as strings ("nan", "inf"), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _rows_layout(obj: Any) -> str:
    """Readable and compact: a dict's keys one per line, each element of a list on its own line."""
    if isinstance(obj, list):
        return "[\n" + ",\n".join(json.dumps(item) for item in obj) + "\n]" if obj else "[]"
    if isinstance(obj, dict):
        lines = [f"{json.dumps(key)}: {_rows_layout(value) if isinstance(value, list) else json.dumps(value)}"
                 for key, value in obj.items()]
        return "{\n" + ",\n".join(lines) + "\n}"
    return json.dumps(obj)


# errno values that mean "the disk cannot take this file", not a bug: one line, exit 2.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def _umask_mode() -> int:
    # The umask can only be read by setting it; done once per write, restored at once.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class DiskError(UserInputError):
    """A write the disk refused (full, quota, read-only, I/O error): one line naming the file, exit 2.
    ``path`` is that file, ``error`` the OSError behind it."""

    def __init__(self, message: str, path: Path, error: OSError) -> None:
        super().__init__(message)
        self.path, self.error = path, error

    def __reduce__(self) -> Any:  # picklable across processes (DataLoader workers), like UserInputError
        return DiskError, (str(self), self.path, self.error)


def disk_error(path: PathLike, exc: OSError) -> DiskError:
    """The one-line error for a write that the disk refused (full, quota, read-only, I/O)."""
    reason = exc.strerror or one_line(exc)
    return DiskError(f"{path}: could not be written ({reason}); nothing was left at that path", Path(path), exc)


def find_disk_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The disk's refusal (an OSError with an errno of :data:`DISK_ERRORS`) behind ``exc``: ``exc``
    itself or one of its causes/contexts, as exporters, PIL or matplotlib wrap it in their own
    exception types. None when the failure is something else."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRORS:
            return current
        if isinstance(current, DiskError):
            return current.error
        pending += [current.__context__, current.__cause__]
    return None


@contextlib.contextmanager
def disk_errors_name(path: PathLike) -> Iterator[None]:
    """Turn a disk's refusal anywhere in the block (:func:`find_disk_error`) into the one-line
    :func:`disk_error` naming ``path``; any other exception propagates unchanged."""
    try:
        yield
    except UserInputError:
        raise
    except Exception as exc:
        found = find_disk_error(exc)
        if found is None:
            raise
        raise disk_error(path, found) from None


class _RecordingFile:
    """The temp file of :func:`atomic_write`, remembering the OSError of a failed write: torch's
    C++ zip writer (``torch.save`` to a file object) replaces it by a RuntimeError of its own
    ("unexpected pos ..."), without a ``__cause__`` saying the disk is full."""

    def __init__(self, handle: IO[Any]) -> None:
        self._handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def fileno(self) -> int:
        # No file descriptor: PIL would encode straight to it in C, and a full disk would then be
        # "encoder error -9", with no errno to recognise; through write() it is ENOSPC, recorded.
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _raise_if_disk_error(path: Path, exc: BaseException, recorded: Optional[OSError] = None) -> None:
    """The one-line :func:`disk_error` for a failed write of ``path`` when a disk refusal is behind
    ``exc`` (or was ``recorded`` by the file object: torch's C++ writer drops the original error)."""
    found = find_disk_error(exc) or recorded
    if found is not None and found.errno in DISK_ERRORS:
        raise disk_error(path, found) from None


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path`` atomically.

    Readers never see half a file, a crash or a full disk leaves any previous file intact and no
    temp file behind. Disk errors (:data:`DISK_ERRORS`, also when the writer wrapped them in its
    own exception type) become a one-line :class:`UserInputError` naming ``path``; other
    exceptions propagate unchanged after the cleanup.
    """
    path = Path(path)
    tmp: Optional[str] = None
    recorder: Optional[_RecordingFile] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, mode) as handle:
            recorder = _RecordingFile(handle)
            yield cast(IO[Any], recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except UserInputError:
        raise
    except Exception as exc:
        _raise_if_disk_error(path, exc, recorder.error if recorder is not None else None)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_dir(path.parent)


def write_bytes(path: PathLike, data: Union[bytes, bytearray, memoryview]) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`): for writers that serialise to
    memory first (``torch.jit.save``/``torch.export.save`` to a buffer, whose C++ file writer
    aborts the process on a full disk instead of raising)."""
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(data)
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` for writers that insist on a file name (exporters, savefig by
    name); on success it replaces ``path`` atomically, with :func:`atomic_write`'s guarantees."""
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except UserInputError:
        raise
    except Exception as exc:
        _raise_if_disk_error(path, exc)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); not possible (nor needed) everywhere."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cache_dir(kind: str = "") -> Path:
    """The package's cache folder: ``$SSD300_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssd300``, else
    ``~/.cache/ssd300``; ``kind`` names a subfolder (``annotation-index``, ``onnx``, ``weights``).
    Nothing is created here; writers create what they write into."""
    if os.environ.get("SSD300_CACHE_DIR"):
        base = Path(os.environ["SSD300_CACHE_DIR"]).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ssd300"
    return base / kind if kind else base


def write_json(path: PathLike, obj: Any, layout: Literal["rows", "indent"] = "rows") -> Path:
    """Write ``obj`` as JSON atomically (:func:`atomic_write`).

    ``layout="rows"``: one list element per line (results, detections); ``"indent"``: indented.
    """
    path = Path(path)
    obj = json_ready(obj)
    text = _rows_layout(obj) if layout == "rows" else json.dumps(obj, indent=2)
    with atomic_write(path, "w") as handle:
        handle.write(text + "\n")
    return path


def check_output_path(path: PathLike, field: str, *, folder: bool) -> Path:
    """Fail now, in one line naming ``field`` (the argument or config field, listed in the error's
    ``fields``), if ``path`` cannot be written later.

    ``folder``: the path is a folder the work writes into (it may exist; it must not be a file),
    else a file (it must not be a folder). Either way its nearest existing ancestor must be a
    folder in which a file can be created; that is tried (a probe file, removed at once) because
    permission bits lie (root, read-only mounts, /proc). Nothing is created otherwise: a folder
    that does not exist yet is made by the work itself. A caller still passing a flag spelling
    gets it as a field (dashes stripped, ``_`` for ``-``), which the CLI writes back as that flag.
    """
    field = field.lstrip("-").replace("-", "_")
    fields = (field,)
    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise UserInputError(f"{field} {path}: exists and is not a folder", fields=fields)
        if not folder and path.is_dir():
            raise UserInputError(f"{field} {path}: is a folder; give a file name", fields=fields)
    probe_dir = path if folder and path.is_dir() else path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserInputError(f"{field} {path}: {probe_dir} is a file, not a folder", fields=fields)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ssd300-write-check.", dir=probe_dir)
    except OSError as exc:
        raise UserInputError(f"{field} {path}: cannot write in {probe_dir} ({exc.strerror or one_line(exc)})",
                             fields=fields) from None
    os.close(fd)
    os.unlink(probe)
    return path
