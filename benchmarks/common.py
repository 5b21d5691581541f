"""What the benchmarks share: one timer and one image maker.

Timing: ``timed(fn)`` returns one call's result and seconds, ``seconds(fn)`` only the seconds;
``time_call(fn, repeats, warmup=1)`` gives a :class:`Timing` (median, min, max) over ``repeats``
calls after ``warmup`` untimed ones;
``time_interleaved(calls, rounds)`` does the same for several calls round-robin, so that a load
drift on the machine hits every contender alike (``interleaved`` is the same round-robin for runs
that return their own figure, e.g. images/s); ``stream_timings`` times the batches a pipeline
yields from a stream of files; ``percentile`` reads a latency percentile.

Images: ``make_jpegs`` writes 640x480 JPEGs (quality 90) cut from scikit-image's photographs
(real JPEG statistics, like COCO images); ``photo_crop`` is its one-image step for scripts that
draw boxes from the same random generator.

The scripts import this as ``from common import ...``: run as ``python benchmarks/bench_x.py``,
the script's folder is on ``sys.path``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call of the timed calls (warm-up excluded)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    return timed(fn)[1]


def interleaved(runs: Mapping[str, Callable[[], T]], rounds: int, warmup: int = 0,
                max_samples: Optional[Mapping[str, int]] = None) -> dict[str, list[T]]:
    """Call every run once per round, round-robin, and collect what each returns.

    The first ``warmup`` rounds are not collected. A run named in ``max_samples`` stops once it
    has that many collected results (e.g. a very slow contender measured once).
    """
    results: dict[str, list[T]] = {name: [] for name in runs}
    caps = max_samples or {}
    for round_index in range(warmup + rounds):
        for name, run in runs.items():
            if name in caps and len(results[name]) >= caps[name]:
                continue
            value = run()
            if round_index >= warmup:
                results[name].append(value)
    return results


def time_interleaved(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                     max_samples: Optional[Mapping[str, int]] = None) -> dict[str, Timing]:
    """:class:`Timing` of each call over ``rounds`` round-robin rounds, after ``warmup`` rounds."""
    timers = {name: (lambda call=call: seconds(call)) for name, call in calls.items()}
    return {name: Timing(tuple(values)) for name, values in interleaved(timers, rounds, warmup, max_samples).items()}


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """:class:`Timing` of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return time_interleaved({"call": fn}, repeats, warmup)["call"]


def stream_timings(run_batches: Callable[[list[str]], Iterable], paths: list[str], batch_size: int,
                   iters: int) -> list[float]:
    """Seconds per batch over a stream of ``iters`` batches (after one warm-up batch): the time
    between the batches ``run_batches`` yields, so that overlapped work (decoding the next batch
    on a thread) counts as it does in use."""
    for _ in run_batches(paths[:batch_size]):
        pass
    stream = [paths[(i * batch_size + j) % len(paths)] for i in range(iters) for j in range(batch_size)]
    times, last = [], time.perf_counter()
    for _ in run_batches(stream):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


# ----------------------------------------------------------------------------- images

# scikit-image's bundled photographs (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photos(names: Sequence[str] = PHOTOS) -> list[np.ndarray]:
    import skimage.data as data

    return [getattr(data, name)() for name in names]


def photo_crop(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = (640, 480),
               zoom: tuple[float, float] = (1.3, 1.8)):
    """A ``size`` (width, height) crop at a random place of ``photo`` enlarged by a random factor
    in ``zoom`` beyond what covers ``size`` (draws scale, x, y from ``rng``, in that order)."""
    from PIL import Image

    width, height = size
    image = Image.fromarray(photo)
    scale = rng.uniform(*zoom) * max(width / image.width, height / image.height)
    big = image.resize((int(image.width * scale) + 1, int(image.height * scale) + 1), Image.BILINEAR)
    x, y = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
    return big.crop((x, y, x + width, y + height))


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (640, 480),
               zoom: Optional[tuple[float, float]] = (1.3, 1.8), seed: int = 0, names: Sequence[str] = PHOTOS,
               pattern: str = "{:04d}.jpg", quality: int = 90) -> list[str]:
    """``count`` JPEGs named ``pattern.format(i)`` in ``folder``, cycling through ``names``: a
    random crop (``photo_crop``) of each, or with ``zoom=None`` the whole photograph resized to
    ``size``. Returns their paths."""
    from PIL import Image

    sources = photos(names)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = sources[i % len(sources)]
        image = Image.fromarray(photo).resize(size, Image.BILINEAR) if zoom is None else photo_crop(photo, rng, size,
                                                                                                      zoom)
        path = folder / pattern.format(i)
        image.save(path, quality=quality)
        paths.append(str(path))
    return paths
