"""GPU verification benchmarks: SSD300-ResNet50 training and inference throughput on one CUDA GPU.

Parts, most important first, each time-boxed so that the whole fits ``--budget-s``:

1. ``train``: full training steps (box encoding, forward, loss, backward, SGD) with AMP (fp16 +
   GradScaler) and channels-last, on synthetic uint8 batches already on the GPU (model bound),
   batch 64 and 128;
2. ``infer``: the :class:`~ssd300.inference.Detector` (BatchNorm folded, fp16, channels-last) at
   batch 1, 8 and 64: forward only, and end to end from JPEG files (decode + preprocess + forward
   + NMS + results on the host), once with the Detector's own decoding (PIL on a thread) and once
   with nvJPEG (``torchvision.io.decode_jpeg`` on the GPU), plus a per-stage profile at batch 64;
3. ``loader``: training through the PyTorch DataLoader (CPU workers, pinned memory) on synthetic
   JPEGs (640x480), batch 64 and 128, against the model-bound rate;
4. ``dali``: the DALI GPU training loader on the same JPEGs: the loader alone, and training
   through it (pipeline bound), batch 64 and 128, against the model-bound rate ("skipped" where
   DALI is not installed, as on the GPU machine this project is lent: the DataLoader then stands
   for the real loader in the goal);
5. ``compile``: training at batch 128 with ``torch.compile`` (only if the budget left allows).

Prints one table with the issues' goals marked met/missed and writes ``gpu_check.json`` under
``--out`` (default: ``$OUT`` when set). ``--smoke`` runs every code path with tiny sizes on the
CPU (ResNet-18, batch 2, channels-last, one timed step; the nvJPEG path's torchvision decode on CPU
tensors), which is what CI and machines without a GPU run. Needs torch and torchvision only;
runs from this working tree (``src/`` is put on ``sys.path``).

    python tools/gpu_check.py [--budget-s 300] [--out DIR] [--parts train,infer,dali,compile]
    python tools/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

# The package from this working tree (the GPU machine has no install of it, only PYTHONPATH).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ssd300.data.loaders import Batch  # noqa: E402
from ssd300.labels import LabelMap  # noqa: E402
from ssd300.model import SSD300  # noqa: E402
from ssd300.runtime import Runtime  # noqa: E402
from ssd300.trainer import Trainer  # noqa: E402

PARTS = ("train", "infer", "loader", "dali", "compile")
# The issues' goals (published for NVIDIA's code on 1x A100 80GB, AMP: training 724 img/s at
# batch 128, inference 1058 img/s at batch 64).
TRAIN_GOAL = 1450.0           # img/s, training at batch 128, model bound
LOADER_GOAL_RATIO = 0.9       # training through a real loader (the faster of the PyTorch DataLoader
                              # and DALI) / model-bound training, batch 128
INFER_GOAL = 2000.0           # img/s, end to end at batch 64


@dataclass
class Settings:
    device: torch.device
    backbone: str
    train_batches: tuple[int, ...]
    infer_batches: tuple[int, ...]
    warmup: int
    iterations: int
    seconds_per_measure: float   # a measurement stops after this long (at least 2 timed steps)
    image_size: tuple[int, int]  # synthetic JPEGs, (width, height)
    unique_images: int
    dali_images: int
    compile_min_seconds: float   # run the compile part only with this much budget left
    smoke: bool


def settings_for(smoke: bool) -> Settings:
    if smoke:
        return Settings(device=torch.device("cpu"), backbone="resnet18", train_batches=(2,), infer_batches=(1,),
                        warmup=0, iterations=1, seconds_per_measure=5.0, image_size=(320, 240), unique_images=4,
                        dali_images=8, compile_min_seconds=float("inf"), smoke=True)
    return Settings(device=torch.device("cuda", 0), backbone="resnet50", train_batches=(64, 128),
                    infer_batches=(1, 8, 64), warmup=8, iterations=30, seconds_per_measure=12.0,
                    image_size=(640, 480), unique_images=128, dali_images=2048, compile_min_seconds=150.0,
                    smoke=False)


@dataclass
class Row:
    key: str     # what was measured, for the goals: train, train_compiled, dali_loader, dali_train,
                 # infer_forward, infer_detector, infer_nvjpeg
    part: str
    config: str
    batch: int
    images_per_second: Optional[float] = None
    ms_per_batch: Optional[float] = None
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  measured: {row.part} {row.config} batch {row.batch}: "
              f"{_fmt(row.images_per_second)} img/s {row.note}", file=sys.stderr, flush=True)
        return row

    def rate(self, key: str, batch: int) -> Optional[float]:
        for row in self.rows:
            if (row.key, row.batch) == (key, batch):
                return row.images_per_second
        return None


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


class OutOfTime(Exception):
    """SIGTERM arrived (the caller's time limit): stop measuring, print what was measured."""


# Measurements stop at this perf_counter() time (set from --budget-s in main()).
DEADLINE = float("inf")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(step: Callable[[int], int], device: torch.device, warmup: int, iterations: int,
               seconds: float) -> tuple[float, float]:
    """Run ``step(i)`` (returns images done) ``warmup`` times, then up to ``iterations`` times or
    ``seconds`` (at least 2 timed steps) -> (images/s, median ms per step)."""
    for i in range(warmup):
        step(i)
    sync(device)
    times: list[float] = []
    images = 0
    start = time.perf_counter()
    for i in range(iterations):
        tick = time.perf_counter()
        images += step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - tick)
        now = time.perf_counter()
        if (now - start > seconds and len(times) >= 2) or now > DEADLINE:
            break
    elapsed = time.perf_counter() - start
    return images / elapsed, 1000.0 * statistics.median(times)


# ----------------------------------------------------------------------------- training


def synthetic_batches(count: int, batch_size: int, device: torch.device, boxes_per_image: int = 7) -> list[Batch]:
    """uint8 noise images with COCO-like box counts, already on ``device`` (still uint8: the
    training step normalises them there, as it does loader batches)."""
    batches = []
    for index in range(count):
        g = torch.Generator().manual_seed(index)
        images = torch.randint(0, 256, (batch_size, 3, 300, 300), dtype=torch.uint8, generator=g)
        xy = torch.rand(batch_size, boxes_per_image, 2, generator=g) * 0.7
        wh = 0.05 + torch.rand(batch_size, boxes_per_image, 2, generator=g) * 0.4
        boxes = torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=2)
        counts = torch.randint(1, boxes_per_image + 1, (batch_size,), generator=g)
        labels = torch.randint(1, 81, (batch_size, boxes_per_image), generator=g)
        batch = Batch(images=images, boxes=boxes, labels=labels, num_boxes=counts,
                      image_ids=torch.arange(batch_size), image_sizes=torch.full((batch_size, 2), 300),
                      is_padding=torch.zeros(batch_size, dtype=torch.bool))
        moved = batch.to(device)  # everything but the images, which stay uint8
        batches.append(replace(moved, images=images.to(device)))
    return batches


def make_trainer(settings: Settings, compiled: bool = False) -> Trainer:
    """The Trainer as ``ssd300 train`` builds it on CUDA (AMP, channels-last), 81 classes."""
    device = settings.device
    torch.manual_seed(0)
    model = SSD300(settings.backbone, num_classes=81).to(device)
    # AMP is fp16 + GradScaler on CUDA; the CPU smoke stays in fp32 (bf16 is emulated on AVX2 CPUs).
    amp = device.type == "cuda"
    # Channels-last on the CPU too, so that the smoke runs the GPU run's memory-format path.
    runtime = Runtime.resolve(device, amp, channels_last=True)
    if runtime.channels_last(training=True):
        model = model.to(memory_format=torch.channels_last)
    trainer = Trainer.build(model, runtime=runtime, label_map=LabelMap.generic(81), learning_rate=1e-3, multistep=[])
    if compiled:
        trainer.model = torch.compile(model)
    trainer.model.train()
    return trainer


def measure_training(trainer: Trainer, batches: Callable[[int], Batch], settings: Settings,
                     warmup: Optional[int] = None) -> tuple[float, float]:
    def step(i: int) -> int:
        batch = batches(i)
        trainer.train_step(batch)
        return len(batch)

    return timed_loop(step, settings.device, settings.warmup if warmup is None else warmup, settings.iterations,
                      settings.seconds_per_measure)


def part_train(settings: Settings, report: Report) -> None:
    trainer = make_trainer(settings)
    for batch_size in settings.train_batches:
        batches = synthetic_batches(2, batch_size, settings.device)
        rate, ms = measure_training(trainer, lambda i: batches[i % len(batches)], settings)
        report.add(Row("train", "train", f"model bound (batches on the device), {describe(trainer)}", batch_size,
                       rate, ms))
    _release(settings.device)


def part_compile(settings: Settings, report: Report) -> None:
    trainer = make_trainer(settings, compiled=True)
    batch_size = settings.train_batches[-1]
    batches = synthetic_batches(2, batch_size, settings.device)
    start = time.perf_counter()
    trainer.train_step(batches[0])  # compiles forward and backward
    sync(settings.device)
    compile_seconds = time.perf_counter() - start
    rate, ms = measure_training(trainer, lambda i: batches[i % len(batches)], settings, warmup=3)
    report.add(Row("train_compiled", "train", f"model bound, {describe(trainer)}, torch.compile", batch_size, rate,
                   ms, f"(first step {compile_seconds:.0f} s)"))
    _release(settings.device)


def describe(trainer: Trainer) -> str:
    return f"{trainer.runtime.precision}, {'channels-last' if trainer.channels_last else 'NCHW'}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- synthetic JPEGs


def make_dataset(folder: Path, settings: Settings) -> Path:
    """``settings.unique_images`` synthetic JPEGs rendered once, hard-linked (or copied) up to
    ``settings.dali_images`` training images with their annotations, so that a long epoch costs
    no extra rendering. Returns the dataset root (train/ + annotations/)."""
    from ssd300.data.synth import generate_synthetic_dataset

    width, height = settings.image_size
    source = generate_synthetic_dataset(folder / "unique", num_train=settings.unique_images, num_val=0, seed=0,
                                        min_width=width, max_width=width, min_height=height, max_height=height,
                                        num_classes=7, max_objects=8, min_size=0.1)
    data = json.loads((source / "annotations" / "instances_train.json").read_text())
    root = folder / "data"
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for index in range(settings.dali_images):
        original = data["images"][index % len(data["images"])]
        name = f"{index + 1:06d}.jpg"
        target = root / "train" / name
        try:
            os.link(source / "train" / original["file_name"], target)
        except OSError:
            shutil.copyfile(source / "train" / original["file_name"], target)
        images.append({**original, "id": index + 1, "file_name": name})
        for annotation in data["annotations"]:
            if annotation["image_id"] == original["id"]:
                annotations.append({**annotation, "id": len(annotations) + 1, "image_id": index + 1})
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({**data, "images": images, "annotations": annotations}))
    return root


# ----------------------------------------------------------------------------- DALI


def part_loader(settings: Settings, report: Report, root: Path) -> None:
    """Training through the PyTorch DataLoader (workers decode + augment on the CPU, pinned
    memory on CUDA), as ``ssd300 train`` without ``--dali``: how far the CPU pipeline keeps up."""
    from ssd300.data.coco import CocoDetection
    from ssd300.data.loaders import build_train_loader

    dataset = CocoDetection.from_root(root, "train", train=True)
    workers = 0 if settings.smoke else min(8, os.cpu_count() or 1)  # the train command's default
    trainer = make_trainer(settings)
    for batch_size in settings.train_batches:
        loader = build_train_loader(dataset, batch_size, num_workers=workers, seed=0)
        stream = _endless(loader)
        rate, ms = measure_training(trainer, lambda i: next(stream), settings, warmup=min(settings.warmup, 4))
        model_bound = report.rate("train", batch_size)
        ratio = f"({rate / model_bound:.2f} x model bound)" if model_bound else ""
        report.add(Row("loader_train", "loader", f"training through the PyTorch DataLoader, {workers} workers, "
                       f"{describe(trainer)}", batch_size, rate, ms, ratio))
    _release(settings.device)


def part_dali(settings: Settings, report: Report, root: Path) -> None:
    from ssd300.data.dali import dali_available

    if not dali_available():
        report.skipped.append("dali: NVIDIA DALI is not importable here (pip install 'ssd300[dali]')")
        return
    from ssd300.data.coco import CocoDetection
    from ssd300.data.dali import build_dali_train_loader

    dataset = CocoDetection.from_root(root, "train", train=True)
    device_id = settings.device.index if settings.device.type == "cuda" else None
    threads = min(8, os.cpu_count() or 1)  # the train command's default
    trainer = make_trainer(settings)
    for batch_size in settings.train_batches:
        loader = build_dali_train_loader(dataset, batch_size, num_threads=threads, seed=0, device_id=device_id)
        stream = _endless(loader)

        def load(i: int) -> int:
            return len(next(stream))

        rate, ms = timed_loop(load, settings.device, settings.warmup, settings.iterations, settings.seconds_per_measure)
        where = "GPU" if device_id is not None else "CPU"
        report.add(Row("dali_loader", "dali", f"DALI {where} loader alone, {threads} threads", batch_size, rate, ms))
        rate, ms = measure_training(trainer, lambda i: next(stream), settings)
        report.add(Row("dali_train", "dali", f"training through the DALI {where} loader, {describe(trainer)}",
                       batch_size, rate, ms))
    _release(settings.device)


def _endless(loader: Any) -> Iterator[Batch]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------- inference


def calibrate(model: SSD300, images: torch.Tensor, candidates: float = 400.0, logit_std: float = 3.0) -> float:
    """Scale the confidence heads of a random-weight model so that its class scores look like a
    trained model's: a logit spread of ``logit_std`` and about ``candidates`` scores > 0.05 per
    image (so that post-processing does realistic work). Returns the candidates reached."""
    with torch.inference_mode():
        _, logits = model(images)
        scale = logit_std / float(logits.float().std())
        logits = logits.float() * scale

    def count(shift: float) -> float:
        shifted = logits.clone()
        shifted[:, 0] += shift
        return float((shifted.softmax(dim=1)[:, 1:] > 0.05).sum()) / logits.shape[0]

    low, high = -100.0, 100.0  # count() falls as the background logit rises: bisect
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if count(mid) > candidates else (low, mid)
    shift = (low + high) / 2
    with torch.no_grad():
        for head in model.conf:
            head.weight.mul_(scale)
            head.bias.mul_(scale)
            # Conf channels are class-major (class * boxes per cell + box): the background's come first.
            head.bias[: head.out_channels // model.num_classes] += shift
    return count(shift)


def nvjpeg_pipeline(detector: Any, device: torch.device) -> Callable[..., list]:
    """Files -> detections with the JPEGs decoded by nvJPEG and resized on the GPU (float
    antialiased bilinear, like the uint8 CPU resize up to rounding); network and post-processing
    are the Detector's."""
    import torchvision
    from torchvision.io import decode_jpeg

    from ssd300.data.transforms import normalize

    def run(paths: list[str], stages: Optional[dict[str, list[float]]] = None) -> list:
        def mark(name: str, since: float) -> float:
            if stages is not None:
                sync(device)
                now = time.perf_counter()
                stages.setdefault(name, []).append(now - since)
                return now
            return since

        tick = time.perf_counter()
        data = [torchvision.io.read_file(p) for p in paths]
        tick = mark("read files", tick)
        decoded = decode_jpeg(data, device=device)
        tick = mark("decode (nvJPEG)", tick)
        sizes = torch.tensor([[image.shape[2], image.shape[1]] for image in decoded], dtype=torch.float32)
        groups = [torch.stack(decoded)] if len({image.shape for image in decoded}) == 1 else [d[None] for d in decoded]
        resized = [torch.nn.functional.interpolate(group.float(), size=(300, 300), mode="bilinear", antialias=True,
                                                   align_corners=False) for group in groups]
        images = normalize(torch.cat(resized).round_().clamp_(0, 255).to(torch.uint8))
        tick = mark("resize + normalise", tick)
        locs, logits = detector.predict_tensor(images)
        tick = mark("forward", tick)
        results = detector.detections_from_outputs(locs, logits, sizes)
        mark("post-process (decode, NMS, to host)", tick)
        return results

    return run


def detector_pipeline(detector: Any) -> Callable[..., list]:
    def run(paths: list[str], stages: Optional[dict[str, list[float]]] = None) -> list:
        return [result for _, result in detector.detect_files(paths, on_error="raise")]

    return run


def detector_profile(detector: Any, paths: list[str], device: torch.device) -> dict[str, float]:
    """Where the Detector's time goes for one batch, stage by stage (serial, synchronised)."""
    from ssd300.inference import load_rgb

    stages: dict[str, float] = {}
    tick = time.perf_counter()
    decoded = [load_rgb(p, draft=detector.draft) for p in paths]
    stages["decode (PIL, one thread)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    prepared = [detector._prepare(image, None) for image in decoded]
    pixels = torch.stack([p.pixels for p in prepared]).to(device)
    images = detector.transform.normalize(pixels)
    sync(device)
    stages["resize (CPU) + copy + normalise"] = time.perf_counter() - tick
    tick = time.perf_counter()
    locs, logits = detector.predict_tensor(images)
    sync(device)
    stages["forward"] = time.perf_counter() - tick
    tick = time.perf_counter()
    detector.detections_from_outputs(locs, logits, torch.tensor([p.size for p in prepared], dtype=torch.float32))
    sync(device)
    stages["post-process (decode, NMS, to host)"] = time.perf_counter() - tick
    return {name: 1000.0 * seconds for name, seconds in stages.items()}


def part_infer(settings: Settings, report: Report, root: Path) -> None:
    from ssd300.data.transforms import EvalTransform
    from ssd300.inference import Detector, load_rgb

    device = settings.device
    paths = sorted(str(p) for p in (root / "train").glob("*.jpg"))[: settings.unique_images]
    torch.manual_seed(0)
    model = SSD300(settings.backbone, num_classes=81).eval().to(device)
    sample = EvalTransform().batch([load_rgb(p) for p in paths[:2 if settings.smoke else 8]], device=device)
    candidates = calibrate(model, sample)
    gpu = device.type == "cuda"
    detector = Detector(model.cpu(), LabelMap.coco2017(), device=device, amp=gpu, batch_size=1)
    precision = "fp16, channels-last" if gpu else "fp32"
    pipelines = {
        ("infer_detector", "end to end, Detector (PIL decode on a thread)"): detector_pipeline(detector),
        ("infer_nvjpeg", "end to end, nvJPEG decode + resize on the device"): nvjpeg_pipeline(detector, device),
    }
    for batch_size in settings.infer_batches:
        detector.batch_size = batch_size
        images = torch.randn(batch_size, 3, 300, 300, device=device)
        rate, ms = timed_loop(lambda i: (detector.predict_tensor(images), batch_size)[1], device, settings.warmup,
                              settings.iterations, settings.seconds_per_measure)
        report.add(Row("infer_forward", "infer", f"forward only, {precision}, BatchNorm folded", batch_size, rate, ms))
        for (key, name), pipeline in list(pipelines.items()):
            def step(i: int) -> int:
                start = (i * batch_size) % len(paths)
                chunk = [paths[(start + k) % len(paths)] for k in range(batch_size)]
                return len(pipeline(chunk))

            try:
                rate, ms = timed_loop(step, device, min(settings.warmup, 3), settings.iterations,
                                      settings.seconds_per_measure)
            except OutOfTime:
                raise
            except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
                report.skipped.append(f"infer, {name}: FAILED at batch {batch_size}: {_one_line(error)}")
                del pipelines[(key, name)]
                continue
            report.add(Row(key, "infer", name, batch_size, rate, ms, f"({candidates:.0f} candidates/image)"))
    batch_size = settings.infer_batches[-1]
    chunk = [paths[k % len(paths)] for k in range(batch_size)]
    report.profile[f"Detector, batch {batch_size} (ms)"] = detector_profile(detector, chunk, device)
    stages: dict[str, list[float]] = {}
    nvjpeg = next((p for (key, _), p in pipelines.items() if key == "infer_nvjpeg"), None)
    repeats = 1 if settings.smoke else 3
    if nvjpeg is not None:
        for _ in range(repeats):
            nvjpeg(chunk, stages)
        report.profile[f"nvJPEG path, batch {batch_size} (ms, median of {repeats})"] = {
            name: 1000.0 * statistics.median(values) for name, values in stages.items()}
    _release(device)


# ----------------------------------------------------------------------------- goals and output


def evaluate_goals(report: Report, train_batch: int = 128, infer_batch: int = 64) -> list[dict[str, Any]]:
    """The issues' goals against the measured rows -> [{goal, measured, target, status}]."""
    train = report.rate("train", train_batch)
    compiled = report.rate("train_compiled", train_batch)
    loaders = [r for r in (report.rate("loader_train", train_batch), report.rate("dali_train", train_batch))
               if r is not None]
    loader = max(loaders, default=None)
    e2e = {row.config: row.images_per_second for row in report.rows
           if row.key in ("infer_detector", "infer_nvjpeg") and row.batch == infer_batch}
    best_train = max((r for r in (train, compiled) if r is not None), default=None)

    def status(value: Optional[float], target: float) -> str:
        return "not run" if value is None else ("met" if value >= target else "missed")

    goals = [{"goal": f"training >= {TRAIN_GOAL:,.0f} img/s at batch {train_batch} (model bound, best of "
                      "eager/compiled)", "measured": best_train, "target": TRAIN_GOAL,
              "status": status(best_train, TRAIN_GOAL)}]
    ratio = loader / train if loader is not None and train else None
    goals.append({"goal": f"training through the real loader (best of DataLoader, DALI) >= {LOADER_GOAL_RATIO} x "
                          f"model bound at batch {train_batch}",
                  "measured": ratio, "target": LOADER_GOAL_RATIO, "status": status(ratio, LOADER_GOAL_RATIO)})
    for name, value in (e2e.items() or [("end to end", None)]):
        goals.append({"goal": f"inference {name} >= {INFER_GOAL:,.0f} img/s at batch {infer_batch}",
                      "measured": value, "target": INFER_GOAL, "status": status(value, INFER_GOAL)})
    return goals


def format_table(report: Report, goals: list[dict[str, Any]]) -> str:
    lines = ["| part | configuration | batch | images/s | ms/batch (median) | note |", "|---|---|---|---|---|---|"]
    for row in report.rows:
        lines.append(f"| {row.part} | {row.config} | {row.batch} | {_fmt(row.images_per_second)} | "
                     f"{_fmt(row.ms_per_batch, 2)} | {row.note} |")
    for goal in goals:
        measured = goal["measured"]
        shown = "-" if measured is None else (f"{measured:.2f}" if goal["target"] < 10 else f"{measured:,.0f}")
        lines.append(f"| goal | {goal['goal']} | | {shown} | | **{goal['status']}** |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every code path, no figures")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_check.json (default: $OUT when set)")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    args.parts = parts
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU here; use --smoke for the CPU run of the code paths", file=sys.stderr)
        return 2
    settings = settings_for(args.smoke)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    global DEADLINE
    deadline = DEADLINE = time.perf_counter() + args.budget_s

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime

    signal.signal(signal.SIGTERM, out_of_time)
    Runtime.resolve(settings.device, amp=True).configure()  # the train command's defaults (TF32, cuDNN autotune)
    report = Report()
    info = environment(settings.device)
    print(f"gpu_check: {info}", file=sys.stderr, flush=True)
    # Share of what is left that each part may use (the compile part takes the rest, if enough).
    shares = {"train": 0.3, "infer": 0.35, "loader": 0.3, "dali": 0.5, "compile": 1.0}
    longest_measure = settings.seconds_per_measure
    with tempfile.TemporaryDirectory(prefix="ssd300-gpu-check-") as tmp:
        root: Optional[Path] = None
        for part in PARTS:
            if part not in args.parts:
                continue
            left = deadline - time.perf_counter()
            if part == "compile" and left < settings.compile_min_seconds:
                needs = f"{left:.0f} s left, needs {settings.compile_min_seconds:.0f}"
                reason = "smoke run" if settings.smoke else needs
                report.skipped.append(f"compile: skipped ({reason})")
                continue
            if left < 10 and not settings.smoke:
                report.skipped.append(f"{part}: skipped (budget spent)")
                continue
            settings.seconds_per_measure = min(longest_measure, max(2.0, left * shares[part] / 8))
            start = time.perf_counter()
            try:
                if part in ("infer", "loader", "dali") and root is None:
                    root = make_dataset(Path(tmp), settings)
                if part == "train":
                    part_train(settings, report)
                elif part == "infer":
                    part_infer(settings, report, root)
                elif part == "loader":
                    part_loader(settings, report, root)
                elif part == "dali":
                    part_dali(settings, report, root)
                else:
                    part_compile(settings, report)
            except OutOfTime:
                report.skipped.append(f"{part}: stopped by SIGTERM (time limit); later parts not run")
                break
            except Exception as error:  # noqa: BLE001 - report the part as failed, go on with the others
                report.skipped.append(f"{part}: FAILED: {_one_line(error)}")
                print(f"gpu_check: part {part} failed", file=sys.stderr)
                import traceback

                traceback.print_exc()
            print(f"  part {part}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    goals = evaluate_goals(report, settings.train_batches[-1], settings.infer_batches[-1])
    print(f"\nGPU check on {info.get('gpu', 'CPU (smoke run: figures mean nothing)')}, torch {info['torch']}")
    print(format_table(report, goals))
    for name, stages in report.profile.items():
        print(f"\nprofile, {name}: " + ", ".join(f"{stage} {ms:.1f}" for stage, ms in stages.items()))
    for line in report.skipped:
        print(f"skipped: {line}")
    if args.out is not None:
        out = {"environment": info, "smoke": settings.smoke, "rows": [asdict(r) for r in report.rows],
               "goals": goals, "profile": report.profile, "skipped": report.skipped}
        (args.out / "gpu_check.json").write_text(json.dumps(out, indent=1))
    failed = [line for line in report.skipped if "FAILED" in line]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
