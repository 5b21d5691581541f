"""A training run's folder (``TrainConfig.save``): one run per folder, a lock, every file by name.

The one owner of the run folder's file names (nothing else spells them) and of writing its
checkpoints. Files of a run (README, "Run folder"): ``epoch_<n>.pt`` after epoch ``n`` (0-based,
as the reference), ``last.pt`` (the newest state: the last epoch or an interruption), ``best.pt``
(the evaluated epoch with the highest AP; its ``metrics`` entry says which), ``interrupted.pt``
(SIGINT/SIGTERM), ``log.jsonl``, ``results.json``, ``metrics.json`` (the run's summary),
``curves.png``, per evaluation ``evaluation_epoch_<n>.png``, ``confusion_epoch_<n>.png``,
``thresholds_epoch_<n>.png`` and ``report_epoch_<n>.html`` (:mod:`ssd300.report`), ``report.html``
(the newest evaluation's report), and ``.ssd300.lock`` while a run is live.

Policies, all here:

* a fresh run refuses a folder holding another run's files unless ``overwrite`` (which removes
  those files first, so two runs never mix); a resumed run continues its own folder and appends to
  ``log.jsonl``. A folder holding no checkpoint and no evaluation is not a run: what a start that
  failed before its first checkpoint left (a ``log.jsonl``, a benchmark's summary) is replaced, with
  a note. A refusal says what was found (:meth:`RunFolder.describe`);
* a lock file created with ``O_EXCL`` (pid and host inside, written in one ``write``) keeps a second
  live run out; a lock left by a dead process on this host is taken over, with a note; so is an
  unreadable one (empty, garbage, truncated: a crash while it was written, or not ours) once it is
  older than :data:`LOCK_WRITE_GRACE` seconds, the longest a live run's lock can be half-written;
* checkpoints are written by :meth:`RunFolder.save_epoch` / :meth:`RunFolder.save_interrupted`
  through :func:`ssd300.files.atomic_write`;
* temp files of that writer (``.epoch_3.pt.k2j4x.tmp``, left by a SIGKILL mid-write)
  are removed when a run starts (the lock guarantees no live run is writing them) and never loaded;
* ``last.pt`` / ``best.pt`` are hard links to the epoch file they name (no second write; a copy
  where links are not supported), replaced atomically;
* ``keep_last`` prunes old ``epoch_<n>.pt`` files, never ``last``/``best``/``interrupted``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

from ssd300.checkpoint import save_checkpoint
from ssd300.errors import UserInputError
from ssd300.files import PathLike, atomic_write, disk_errors_name, fsync_dir

LOCK_NAME = ".ssd300.lock"
LAST, BEST, INTERRUPTED = "last.pt", "best.pt", "interrupted.pt"
LOG_NAME = "log.jsonl"          # the JSON-lines log
RESULTS_NAME = "results.json"   # COCO results of the last evaluation
METRICS_NAME = "metrics.json"   # the run's summary
CURVES_NAME = "curves.png"      # loss and mAP curves
REPORT_NAME = "report.html"     # the newest evaluation's report (a link to its report_epoch_<n>.html)
EPOCH_NAME_PATTERN = "epoch_<n>.pt"  # for messages; epoch_file_name(n) is the name
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")
# atomic_write's temp names: mkstemp(prefix=".<name>.", suffix=".tmp"); only our checkpoints' match.
_CHECKPOINT_TEMP = re.compile(r"\.(epoch_\d+|last|best|interrupted)\.pt\.[A-Za-z0-9_]+\.tmp")
_LOG_FILES = (LOG_NAME, RESULTS_NAME, METRICS_NAME, CURVES_NAME, REPORT_NAME)
# every per-evaluation file: the figures and the report
_EVALUATION_PLOT = re.compile(r"(evaluation|confusion|thresholds)_epoch_\d+\.png|report_epoch_\d+\.html")
_EVAL_RECORD = '"kind": "eval"'  # how logging_utils.RunLogger writes an evaluation record
LOCK_WRITE_GRACE = 1.0  # seconds: a lock younger than this may still be being written by its owner


class RunFiles(NamedTuple):
    """What :meth:`RunFolder.found` saw, by kind: a folder holds a run when it has a checkpoint
    or an evaluation; other run files alone are leftovers of a start that failed."""

    checkpoints: list[Path]
    evaluations: list[Path]   # results.json, evaluation_epoch_<n>.png, a log/summary with evaluations
    other: list[Path]         # log.jsonl, metrics.json, curves.png without evaluations

    @property
    def all(self) -> list[Path]:
        return sorted(self.checkpoints + self.evaluations + self.other)

    @property
    def is_run(self) -> bool:
        return bool(self.checkpoints or self.evaluations)


def evaluation_plot_name(epoch: int) -> str:
    """The per-evaluation figure's file name; ``epoch`` is numbered as in ``epoch_<n>.pt``."""
    return f"evaluation_epoch_{epoch}.png"


def evaluation_file_name(kind: str, epoch: int) -> str:
    """A per-evaluation file: ``kind`` "confusion" / "thresholds" (PNG figures) or "report" (HTML)."""
    suffix = "html" if kind == "report" else "png"
    return f"{kind}_epoch_{epoch}.{suffix}"


def epoch_file_name(epoch: int) -> str:
    """The checkpoint written after epoch ``epoch`` (0-based): ``epoch_<epoch>.pt``."""
    return f"epoch_{epoch}.pt"


class RunFolder:
    """The ``save`` folder of one run (it need not exist yet)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._locked = False

    # -- file names ---------------------------------------------------------------------------

    @property
    def log_file(self) -> Path:
        return self.path / LOG_NAME

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_NAME

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_NAME

    def evaluation_plot(self, epoch: int) -> Path:
        return self.path / evaluation_plot_name(epoch)

    def confusion_plot(self, epoch: int) -> Path:
        return self.path / evaluation_file_name("confusion", epoch)

    def thresholds_plot(self, epoch: int) -> Path:
        return self.path / evaluation_file_name("thresholds", epoch)

    def report(self, epoch: int) -> Path:
        """The report of the evaluation after ``epoch``; :attr:`report_file` is the newest one."""
        return self.path / evaluation_file_name("report", epoch)

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_NAME

    def evaluation_outputs(self) -> list[Path]:
        """The files an evaluation writes that are here (every run file but the checkpoints)."""
        checkpoints = set(self.found().checkpoints)
        return [p for p in self.run_files() if p not in checkpoints]

    def prepare_evaluation(self, *, overwrite: bool) -> list[Path]:
        """An evaluation's output folder (``ssd300 evaluate --out``): refuse a folder holding a
        training run's checkpoints, and evaluation files unless ``overwrite`` (which removes them,
        so two evaluations never mix); returns what was removed."""
        found = self.found()
        if found.checkpoints:
            raise UserInputError(f"out {self.path} holds a training run ({self.describe(found)}); write the "
                                 "evaluation into another folder", fields=("out",))
        existing = self.evaluation_outputs()
        if existing and not overwrite:
            raise UserInputError(f"out {self.path} holds an earlier evaluation's files ({_some(existing)}); pass "
                                 "overwrite to replace them or pick another folder", fields=("out", "overwrite"))
        for path in existing:
            path.unlink()
        return existing

    def checkpoint(self, name: str) -> Path:
        """``name`` (``LAST``, ``BEST``, ``INTERRUPTED``, :func:`epoch_file_name`) in this folder."""
        return self.path / name

    # -- what is there ------------------------------------------------------------------------

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of every ``epoch_<n>.pt``, oldest epoch first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir()
                 if (m := _EPOCH_FILE.fullmatch(p.name)) and p.is_file()]
        return sorted(found)

    def run_files(self) -> list[Path]:
        """The files of a run found here (checkpoints and logs of our naming)."""
        if not self.path.is_dir():
            return []
        named = [self.path / name for name in (LAST, BEST, INTERRUPTED, *_LOG_FILES)]
        plots = sorted(p for p in self.path.iterdir() if _EVALUATION_PLOT.fullmatch(p.name) and p.is_file())
        return [p for _, p in self.epoch_checkpoints()] + [p for p in named if p.is_file()] + plots

    def found(self) -> RunFiles:
        """The run files here, sorted into checkpoints, evaluations and other files."""
        checkpoints = [p for _, p in self.epoch_checkpoints()] + [
            self.path / n for n in (LAST, BEST, INTERRUPTED) if (self.path / n).is_file()]
        evaluations: list[Path] = []
        other: list[Path] = []
        for path in self.run_files():
            if path in checkpoints:
                continue
            if (path.name in (RESULTS_NAME, REPORT_NAME) or _EVALUATION_PLOT.fullmatch(path.name)
                    or _holds_evaluation(path)):
                evaluations.append(path)
            else:
                other.append(path)
        return RunFiles(checkpoints, evaluations, other)

    def describe(self, files: Optional[RunFiles] = None) -> str:
        """What was found, for messages: ``checkpoints epoch_0.pt, last.pt; evaluations results.json; other
        files log.jsonl`` (the empty kinds left out)."""
        files = files if files is not None else self.found()
        parts = [f"{kind} {_some(paths)}" for kind, paths in
                 (("checkpoints", files.checkpoints), ("evaluations", files.evaluations),
                  ("other files", files.other)) if paths]
        return "; ".join(parts) if parts else "no run files"

    def newest_checkpoint(self) -> Optional[Path]:
        """``last.pt`` when present (always the newest state), else the newest of
        ``interrupted.pt`` and the epoch files by modification time; None when there is none."""
        if (self.path / LAST).is_file():
            return self.path / LAST
        candidates = [p for _, p in self.epoch_checkpoints()]
        if (self.path / INTERRUPTED).is_file():
            candidates.append(self.path / INTERRUPTED)
        return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)

    def contains(self, path: PathLike) -> bool:
        """Whether ``path`` is a file directly in this folder."""
        try:
            return Path(path).resolve().parent == self.path.resolve()
        except OSError:
            return False

    # -- starting a run -----------------------------------------------------------------------

    def prepare(self, *, resuming_from: Optional[Path], overwrite: bool) -> list[str]:
        """Take the folder for a run (main rank, before anything is written); returns notes to log.

        ``resuming_from``: the checkpoint a resumed run continues (None: a fresh run). Errors
        name the config fields (``save``, ``resume``, ``overwrite``, ``checkpoint``) in ``fields``.
        """
        notes: list[str] = []
        found = self.found()
        existing = found.all
        resuming_here = resuming_from is not None and self.contains(resuming_from)
        # Leftovers of a start that failed before its first checkpoint (no checkpoint, no evaluation):
        # not a run; a fresh run, or a resumed one continuing elsewhere, replaces them.
        leftovers = existing if existing and not found.is_run and not resuming_here else []
        if resuming_from is not None:
            if overwrite:
                raise UserInputError(f"overwrite with a resumed run would delete the run being resumed; leave "
                                     f"it off to continue {self.path}, or give checkpoint alone to start afresh",
                                     fields=("overwrite", "checkpoint"))
            if found.is_run and not resuming_here:
                raise UserInputError(f"save {self.path} holds another run ({self.describe(found)}); resume from "
                                     "its own checkpoint or save the resumed run in a new folder",
                                     fields=("save", "resume"))
        elif found.is_run and not overwrite:
            raise UserInputError(f"save {self.path} holds another run ({self.describe(found)}): continue it with "
                                 "resume, pick a new folder, or pass overwrite to replace it",
                                 fields=("save", "resume", "overwrite"))
        self.path.mkdir(parents=True, exist_ok=True)
        note = self.acquire_lock()
        if note:
            notes.append(note)
        if leftovers:
            for path in leftovers:
                path.unlink()
            notes.append(f"{self.path} held no checkpoint and no evaluation, only what a start that failed "
                         f"left ({_some(leftovers)}): removed, starting afresh")
        elif resuming_from is None and existing:
            for path in existing:
                path.unlink()
            notes.append(f"overwrite: removed the previous run's {len(existing)} files from {self.path}")
        stale = self.remove_stale_temps()
        if stale:
            notes.append(f"removed {len(stale)} unfinished checkpoint temp file(s) of an interrupted write: "
                         f"{', '.join(p.name for p in stale)}")
        return notes

    def acquire_lock(self) -> Optional[str]:
        """Create the lock file (``O_EXCL``); take over one left by a dead process on this host, or
        an unreadable one older than :data:`LOCK_WRITE_GRACE` (never a live run's: a live run's
        lock holds its pid and host from its first ``LOCK_WRITE_GRACE`` seconds on)."""
        lock = self.path / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        content = json.dumps(me).encode()
        note: Optional[str] = None
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw, owner = _read_lock(lock)
                if raw is None:  # gone meanwhile: try again
                    continue
                if owner is None:
                    stale = f"an unreadable lock file ({_show(raw)}), left by a crash or not ours"
                elif owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    stale = f"the lock of a run that is no longer running (pid {owner.get('pid')})"
                else:
                    where = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
                    raise UserInputError(f"save {self.path}: another run is using this folder ({where}); wait for "
                                         f"it, or delete {lock} if that run is gone", fields=("save",)) from None
                if _replace_if_unchanged(lock, raw):
                    note = f"took over {stale}"
                continue
            except OSError as exc:
                raise UserInputError(f"save {self.path}: cannot create {LOCK_NAME} ({exc.strerror})",
                                     fields=("save",)) from None
            try:
                os.write(fd, content)  # one write: a reader sees all of it or (briefly) nothing
            finally:
                os.close(fd)
            self._locked = True
            return note
        raise UserInputError(f"save {self.path}: could not take {lock}", fields=("save",))

    def release_lock(self) -> None:
        if self._locked:
            self._locked = False
            with contextlib.suppress(FileNotFoundError):
                (self.path / LOCK_NAME).unlink()

    def remove_stale_temps(self) -> list[Path]:
        """Remove our checkpoint writer's leftover temp files (call with the lock held)."""
        if not self.path.is_dir():
            return []
        stale = sorted(p for p in self.path.iterdir() if _CHECKPOINT_TEMP.fullmatch(p.name) and p.is_file())
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stale

    # -- during a run -------------------------------------------------------------------------

    def save_epoch(self, epoch: int, state: Mapping[str, Any], *, best: bool) -> Path:
        """Write ``epoch_<epoch>.pt``, then point ``last.pt`` (and ``best.pt`` when ``best``) at it."""
        path = self.checkpoint(epoch_file_name(epoch))
        save_checkpoint(path, state)
        self.publish(path, LAST)
        if best:
            self.publish(path, BEST)
        return path

    def save_interrupted(self, state: Mapping[str, Any]) -> Path:
        """Write ``interrupted.pt`` (a signal stopped the run) and point ``last.pt`` at it."""
        path = self.checkpoint(INTERRUPTED)
        save_checkpoint(path, state)
        self.publish(path, LAST)
        return path

    def publish(self, source: Path, name: str) -> Path:
        """Make ``name`` (``last.pt``, ``best.pt``) hold ``source``'s content, atomically: a hard
        link renamed over it (no second write), or an atomic copy where links are not supported."""
        target = self.checkpoint(name)
        if source.resolve() == target.resolve():
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links
            with open(source, "rb") as src, atomic_write(target) as dst:
                shutil.copyfileobj(src, dst)
            return target
        try:
            with disk_errors_name(target):  # a full disk: one line, the previous last/best.pt kept
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path)
        return target

    def prune_epochs(self, keep_last: int) -> list[Path]:
        """Delete all but the ``keep_last`` newest ``epoch_<n>.pt`` (0: keep all)."""
        if keep_last <= 0:
            return []
        old = [p for _, p in self.epoch_checkpoints()[:-keep_last]]
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return old


def _some(paths: list[Path], shown: int = 3) -> str:
    names = [p.name for p in paths[:shown]]
    return ", ".join(names) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _holds_evaluation(path: Path) -> bool:
    """Whether a log or summary file records an evaluation (a log's ``eval`` record, a summary's
    ``evaluations``); unreadable counts as yes (never delete what cannot be judged)."""
    try:
        if path.name == LOG_NAME:
            with open(path, encoding="utf-8", errors="replace") as f:
                return any(_EVAL_RECORD in line for line in f)
        if path.name == METRICS_NAME:
            summary = json.loads(path.read_text(encoding="utf-8"))
            return not isinstance(summary, dict) or bool(summary.get("evaluations"))
    except (OSError, ValueError):
        return True
    return False


def _read_lock(lock: Path) -> tuple[Optional[bytes], Optional[dict[str, Any]]]:
    """(the lock's bytes or None when it is gone, its owner or None when unreadable). A lock
    younger than LOCK_WRITE_GRACE that does not parse is read again once that age is reached."""
    for attempt in range(2):
        try:
            raw = lock.read_bytes()
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise UserInputError(f"save {lock.parent}: cannot read {lock.name} ({exc.strerror}); if no run is "
                                 f"using this folder, delete {lock}", fields=("save",)) from None
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = None
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str):
            return raw, owner
        if attempt == 0 and 0 <= age < LOCK_WRITE_GRACE:
            time.sleep(LOCK_WRITE_GRACE - age)
    return raw, None


def _replace_if_unchanged(lock: Path, raw: bytes) -> bool:
    """Remove the stale lock, unless it changed since it was judged (another run took it)."""
    try:
        if lock.read_bytes() != raw:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UserInputError(f"save {lock.parent}: cannot replace the stale {lock.name} ({exc.strerror}); "
                             f"delete {lock}", fields=("save",)) from None
    return True


def _show(raw: bytes, limit: int = 40) -> str:
    if not raw.strip():
        return "empty"
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text) + ("..." if len(raw) > limit else "")


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # a pid we cannot check: assume its owner lives (never steal on a guess)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
