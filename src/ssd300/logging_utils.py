"""Run logging: progress bar or plain lines, a JSON-lines log, optional TensorBoard.

Only the main rank logs; other ranks get a silent logger. On an interactive terminal a tqdm bar
shows loss, learning rate, images/s and ETA; otherwise (CI, files, ``nohup``) a plain line is
printed every ``log_interval`` iterations, which keeps logs readable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from ssd300.files import json_ready
from ssd300.optional import install_hint


class RunLogger:
    """Step and evaluation records to the console, a JSON-lines file and TensorBoard."""

    def __init__(self, *, enabled: bool = True, jsonl_path: str | Path | None = None,
                 tensorboard_dir: str | Path | None = None, log_interval: int = 20,
                 progress: Optional[bool] = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.log_interval = max(1, int(log_interval))
        self.stream = stream or sys.stderr
        self.progress = (self.stream.isatty() if progress is None else progress) and enabled
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._bar: Any = None
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        if jsonl_path is not None:
            path = Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path, "a", buffering=1)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info(f"tensorboard is not installed ({install_hint('tensorboard')}); --tensorboard ignored")
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

            self._bar = tqdm(total=iterations, initial=initial, desc=f"epoch {epoch + 1}/{total_epochs}",
                             file=self.stream, dynamic_ncols=True, leave=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- records -----------------------------------------------------------------------------

    def record(self, kind: str, **fields: Any) -> None:
        """Append one record to the history and the JSON-lines file."""
        if not self.enabled:
            return
        entry = {"kind": kind, "time": round(time.time(), 3), **json_ready(fields)}
        self.history.append(entry)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(entry) + "\n")

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
            self.info(f"epoch {epoch + 1} iter {done}/{iterations_in_epoch} (global {iteration + 1}) "
                      f"loss {loss:.4f} lr {lr:.3e} {images_per_second:.1f} img/s eta {_duration(eta)}")

    def evaluation(self, *, epoch: int, iteration: int, metrics: dict[str, float], seconds: float) -> None:
        if not self.enabled:
            return
        self.record("eval", epoch=epoch, iteration=iteration, seconds=seconds, **metrics)
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"eval/{name}", value, iteration)

    def close(self) -> None:
        self.end_epoch()
        if self._jsonl is not None:
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
