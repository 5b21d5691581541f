"""Run logging: progress bar or plain lines, a JSON-lines log, optional TensorBoard.

Only the main rank logs; other ranks get a silent logger. On an interactive terminal a tqdm bar
shows loss, learning rate, images/s and ETA; otherwise (CI, files, ``nohup``) a plain line is
printed every ``log_interval`` iterations, which keeps logs readable. :class:`Progress` is the
same for evaluation and ``detect`` (a bar, or a plain line every few seconds). While a bar is
shown, ``logging`` records (library warnings included) are written above it through tqdm
(``logging_redirect_tqdm``) instead of breaking it; :func:`configure_logging` is the commands'
logging setup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional, TextIO

from ssd300.files import json_ready
from ssd300.optional import install_hint

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _TqdmWriteHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write``: above any live bar, or plainly when there is none."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    """The commands' logging: WARNING and above (ours, libraries', and ``warnings.warn`` through
    ``logging.captureWarnings``) to stderr, written so that progress bars stay intact. Leaves a
    logging setup the application already has alone."""
    root = logging.getLogger()
    if root.handlers:  # ours already, or the application's own
        return
    handler = _TqdmWriteHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def _redirect_logging() -> contextlib.AbstractContextManager[Any]:
    """While a bar is shown: console logging handlers write through tqdm (no-op when configured)."""
    root = logging.getLogger()
    if any(isinstance(h, _TqdmWriteHandler) for h in root.handlers):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


class Progress:
    """Progress over ``total`` items: a tqdm bar on a terminal, else a plain line every
    ``interval`` seconds and at the end (``desc: 120/500 images (24%), 12.3 images/s, eta 0:31``).

    ``enabled=None``: a bar when ``stream`` is a terminal; ``False``: plain lines; ``silent``: nothing
    (other ranks). Use as a context manager; ``update(n)`` after each batch.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "images", enabled: Optional[bool] = None,
                 silent: bool = False, stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, float(interval)
        self.stream = stream or sys.stderr
        self.silent = silent
        self.done = 0
        self._closed = False
        self._bar: Any = None
        self._redirect: Any = None
        self._start = self._last = time.perf_counter()
        use_bar = (self.stream.isatty() if enabled is None else enabled) and not silent
        if use_bar:
            from tqdm import tqdm

            self._redirect = _redirect_logging()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, desc=desc, unit=unit.rstrip("s") or unit, file=self.stream,
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if not self.silent and now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s, "
              f"eta {_duration(eta)}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        if self.silent:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is None and not self.silent and self.done and self.done >= self.total and \
                time.perf_counter() - self._start >= self.interval:
            self._line(time.perf_counter())  # the last plain line: done
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RunLogger:
    """Step and evaluation records to the console, a JSON-lines file and TensorBoard.

    Numbering (one for all records, console lines and TensorBoard steps): ``epoch`` and
    ``iteration`` from 0; a ``train`` record's ``iteration`` is its step's, an ``eval`` record's
    the last step before the evaluation. Console lines also count ``iter 5/10`` within the epoch."""

    def __init__(self, *, enabled: bool = True, jsonl_path: str | Path | None = None,
                 tensorboard_dir: str | Path | None = None, log_interval: int = 20,
                 progress: Optional[bool] = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.log_interval = max(1, int(log_interval))
        self.stream = stream or sys.stderr
        self.progress = (self.stream.isatty() if progress is None else progress) and enabled
        self._jsonl: BinaryIO | None = None
        self._jsonl_path: Path | None = None
        self._tb: Any = None
        self._bar: Any = None
        self._redirect: Any = None
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        if jsonl_path is not None:
            path = Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path, "ab", buffering=0)  # each record is one os.write: see _append
            self._jsonl_path = path
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info(f"tensorboard is not installed ({install_hint('tensorboard')}); no TensorBoard log")
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    # -- console -----------------------------------------------------------------------------

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, total_epochs: int, iterations: int, initial: int = 0) -> None:
        self._epoch_start = time.perf_counter()
        if self.progress:
            from tqdm import tqdm

            self._redirect = _redirect_logging()
            self._redirect.__enter__()
            self._bar = tqdm(total=iterations, initial=initial, desc=f"epoch {epoch} ({epoch + 1}/{total_epochs})",
                             file=self.stream, dynamic_ncols=True, leave=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def progress_bar(self, total: int, desc: str, unit: str = "images") -> Progress:
        """A :class:`Progress` following this logger's choice (bar, plain lines, or silent)."""
        return Progress(total, desc, unit=unit, enabled=self.progress, silent=not self.enabled, stream=self.stream)

    # -- records -----------------------------------------------------------------------------

    def record(self, kind: str, **fields: Any) -> None:
        """Append one record to the history and the JSON-lines file."""
        if not self.enabled:
            return
        entry = {"kind": kind, "time": round(time.time(), 3), **json_ready(fields)}
        self.history.append(entry)
        if self._jsonl is not None:
            self._append(json.dumps(entry) + "\n")

    def _append(self, line: str) -> None:
        """Append one whole line to the JSON-lines file, or nothing.

        A write the disk refuses (full, quota, I/O error) does not stop the run: the file is cut
        back to its last whole line, the one-line warning naming it is shown once, and the records
        from then on stay in memory only (``history``); the evaluations still reach metrics.json and the
        losses curves.png, from their own owners.
        The log is a convenience; the checkpoints are the run's state, and their own write fails
        the run in one line if the disk stays full.
        """
        assert self._jsonl is not None
        fd = self._jsonl.fileno()
        data = memoryview(line.encode())
        start: Optional[int] = None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            with contextlib.suppress(OSError):
                self._jsonl.close()
            self._jsonl = None
            self.info(f"warning: {self._jsonl_path}: could not be written ({exc.strerror or exc}); "
                      "the run goes on, its records are no longer appended to this file")

    def step(self, *, epoch: int, iteration: int, batch_in_epoch: int, iterations_in_epoch: int,
             loss: float, lr: float, images_per_second: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}",
                                  refresh=False)
        if (iteration + 1) % self.log_interval and batch_in_epoch + 1 != iterations_in_epoch:
            return
        self.record("train", epoch=epoch, iteration=iteration, loss=loss, lr=lr,
                    images_per_second=images_per_second)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, iteration)
            self._tb.add_scalar("train/lr", lr, iteration)
            self._tb.add_scalar("train/images_per_second", images_per_second, iteration)
        if self._bar is None:
            elapsed = time.perf_counter() - self._epoch_start
            done = batch_in_epoch + 1
            eta = elapsed / max(done, 1) * (iterations_in_epoch - done)
            self.info(f"epoch {epoch} iter {done}/{iterations_in_epoch} (iteration {iteration}) "
                      f"loss {loss:.4f} lr {lr:.3e} {images_per_second:.1f} img/s eta {_duration(eta)}")

    def evaluation(self, *, epoch: int, iteration: int, metrics: dict[str, float], seconds: float,
                   per_class: Optional[list[dict[str, Any]]] = None) -> None:
        if not self.enabled:
            return
        extra = {"per_class": per_class} if per_class is not None else {}
        self.record("eval", epoch=epoch, iteration=iteration, seconds=seconds, **metrics, **extra)
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"eval/{name}", value, iteration)

    def close(self) -> None:
        self.end_epoch()
        if self._jsonl is not None:
            with contextlib.suppress(OSError):
                self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
