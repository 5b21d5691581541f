"""End-to-end CPU inference: JPEG files -> detections, SSD300-ResNet50, batch 1 and 8.

Every path does the whole job: JPEG decode + preprocessing + forward + post-processing (decode
boxes, per-class NMS, best 200 per image). Paths, all in the same run:

* baseline, reference style: per image PIL decode + resize + ToTensor/Normalize, fp32 forward of
  the unmodified model, then per image and per class: threshold, top 200 and a greedy NMS
  written as a Python loop (one IoU row per kept box), as the reference's decoder does;
* PyTorch fp32: ``ssd300.inference.Detector`` (BatchNorm folded, channels-last, uint8 resize,
  batched post-processing, next batch decoded on a thread while the network runs);
* PyTorch bf16: the same with the network in bfloat16 channels-last;
* onnxruntime fp32: the exported full detector (NMS inside the graph) with the same decoding
  and preprocessing (and the same decode thread);
* Detector, onnxruntime backend: the Detector with the network (no NMS) run by onnxruntime and
  our batched post-processing (``ssd300 detect --backend onnxruntime``).

Weights are random (nothing is downloaded); the background bias of the confidence heads is set
so that about ``--candidates`` class scores per image exceed the 0.05 threshold, like a trained
model, so that post-processing does realistic work. Latency = wall time per batch in a stream
of batches; images/s = images / total time. Forward-only times (the network on a ready batch)
show what preprocessing and post-processing add.

    .venv/bin/python benchmarks/bench_inference.py [--iters-b1 12] [--iters-b8 4] [--candidates 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torchvision
from PIL import Image

from ssd300.box_coder import decode_boxes
from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.export import export_model
from ssd300.inference import Detector, load_rgb
from ssd300.runtime import Runtime
from ssd300.labels import LabelMap
from ssd300.model import SSD300

from common import make_jpegs, percentile, stream_timings, time_call

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- inputs and model


def calibrated_model(paths: list[str], candidates: int, logit_std: float = 3.0) -> tuple[SSD300, float]:
    """ResNet-50 SSD300 with random weights whose class scores look like a trained model's.

    An untrained trunk gives logits with a spread of ~20, i.e. saturated, arbitrary scores: the
    confidence heads are scaled to a spread of ``logit_std``, then the background bias is shifted
    so that about ``candidates`` class scores per image exceed the 0.05 threshold.
    """
    torch.manual_seed(0)
    model = SSD300("resnet50", num_classes=81).eval()
    images = EvalTransform().batch([load_rgb(p) for p in paths[:4]])
    with torch.inference_mode():
        _, logits = model(images)
        scale = logit_std / float(logits.std())
        logits = logits * scale

    def count(shift: float) -> float:
        shifted = logits.clone()
        shifted[:, 0] += shift
        return float((shifted.softmax(dim=1)[:, 1:] > 0.05).sum()) / logits.shape[0]

    low, high = -100.0, 100.0  # count() decreases as the background logit grows: bisect
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if count(mid) > candidates else (low, mid)
    shift = (low + high) / 2
    with torch.no_grad():
        for head, nd in zip(model.conf, model.boxes_per_location):
            head.weight.mul_(scale)
            head.bias.mul_(scale)
            # Conf channels are class-major (class * nd + box), so the background's are the first nd.
            head.bias[:nd] += shift
    return model, count(shift)


# ----------------------------------------------------------------------------- the baseline


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy NMS as a Python loop over kept boxes (scores sorted descending)."""
    keep: list[int] = []
    order = torch.arange(scores.shape[0])
    while order.numel() > 0:
        best = int(order[0])
        keep.append(best)
        if order.numel() == 1:
            break
        rest = order[1:]
        overlaps = torchvision.ops.box_iou(boxes[best][None], boxes[rest])[0]
        order = rest[overlaps <= iou]
    return keep


def reference_pipeline(model: SSD300) -> Callable[[list[str]], list]:
    from torchvision import transforms as T

    to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    dboxes = default_boxes_300()

    def run(paths: list[str]) -> list:
        batch = torch.stack([to_tensor(Image.open(p).convert("RGB").resize((300, 300), Image.BILINEAR))
                             for p in paths])
        with torch.no_grad():
            locs, logits = model(batch)
        results = []
        for i in range(len(paths)):
            boxes = decode_boxes(locs[i:i + 1], dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh)[0]
            probs = logits[i].softmax(dim=0)
            found = []
            for c in range(1, probs.shape[0]):
                scores = probs[c]
                idx = torch.nonzero(scores > 0.05).flatten()
                if idx.numel() == 0:
                    continue
                idx = idx[scores[idx].argsort(descending=True)[:200]]
                for k in _reference_nms(boxes[idx], scores[idx], 0.45):
                    found.append((float(scores[idx[k]]), c, boxes[idx[k]]))
            found.sort(key=lambda r: -r[0])
            results.append(found[:200])
        return results

    return run


# ----------------------------------------------------------------------------- onnxruntime path


def onnx_pipeline(onnx_path: Path, batch_size: int) -> Callable[[list[str]], Iterable]:
    import concurrent.futures

    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    transform = EvalTransform()

    def decode(paths: list[str]) -> list[Image.Image]:
        return [load_rgb(p) for p in paths]

    def run(paths: list[str]) -> Iterable:
        # As the Detector: decode on a thread, resize (torch, OpenMP) next to the session's run.
        batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(decode, batches[0])
            for index in range(len(batches)):
                images = pending.result()
                if index + 1 < len(batches):
                    pending = pool.submit(decode, batches[index + 1])
                sizes = np.array([im.info["original_size"] for im in images], dtype=np.float32)
                batch = transform.normalize(torch.stack([transform.resize_uint8(im) for im in images])).numpy()
                boxes, scores, labels, counts = session.run(None, {"images": batch})
                pixels = boxes * np.tile(sizes, 2)[:, None, :]
                yield [(pixels[i, :n], scores[i, :n], labels[i, :n]) for i, n in enumerate(counts)]

    return run


# ----------------------------------------------------------------------------- timing


def detector_batches(detector: Detector, batch_size: int) -> Callable[[list[str]], Iterable]:
    def run(paths: list[str]) -> Iterable:
        batch = []
        for _, result in detector.detect_files(paths, on_error="raise"):
            batch.append(result)
            if len(batch) == batch_size:
                yield batch
                batch = []

    return run


def per_batch_calls(fn: Callable[[list[str]], list], batch_size: int) -> Callable[[list[str]], Iterable]:
    def run(paths: list[str]) -> Iterable:
        for i in range(0, len(paths), batch_size):
            yield fn(paths[i:i + batch_size])

    return run


def forward_only(detector: Detector, batch_size: int, iters: int) -> float:
    """Median seconds of the network alone on a ready batch (after one warm-up call)."""
    images = torch.randn(batch_size, 3, 300, 300)
    return time_call(lambda: detector.predict_tensor(images), iters).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-b1", type=int, default=12, help="batches of 1 per path")
    parser.add_argument("--iters-b8", type=int, default=4, help="batches of 8 per path")
    parser.add_argument("--candidates", type=int, default=400, help="class scores > 0.05 per image")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 path: auto = only on CPUs with native bf16 (emulated bf16 is very slow)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    amp_runtime = Runtime.resolve("cpu", amp=True)  # the policy every command uses
    native_bf16 = amp_runtime.native_bf16
    run_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    # --bf16 on forces the bf16 path even where it is emulated (to measure how slow that is).
    bf16_runtime = amp_runtime if native_bf16 else Runtime.resolve("cpu", amp=True, bf16_available=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_jpegs(folder, 16)
        model, candidates = calibrated_model(paths, args.candidates)
        onnx_path = export_model(model, LabelMap.coco2017(), folder / "ssd300.onnx", "onnx")
        fp32 = Detector(model, LabelMap.coco2017(), device="cpu", batch_size=8)
        ort_backend = Detector(model, LabelMap.coco2017(), device="cpu", batch_size=8, backend="onnxruntime")
        bf16 = Detector(model, LabelMap.coco2017(), batch_size=8, runtime=bf16_runtime) if run_bf16 else None
        detections = np.mean([len(r) for r in fp32(paths[:8])])
        print(amp_runtime.describe())
        print(f"torch {torch.__version__}, {threads} threads, native bf16: {native_bf16}; "
              f"{candidates:.0f} candidates and {detections:.0f} detections per image\n")

        rows = []
        for batch_size, iters in ((1, args.iters_b1), (8, args.iters_b8)):
            fp32.batch_size = batch_size
            paths_b = {
                "reference style (baseline)": per_batch_calls(reference_pipeline(model), batch_size),
                "PyTorch fp32": detector_batches(fp32, batch_size),
                "onnxruntime fp32 (exported detector)": onnx_pipeline(onnx_path, batch_size),
                "Detector, onnxruntime backend": detector_batches(ort_backend, batch_size),
            }
            ort_backend.batch_size = batch_size
            if bf16 is not None:
                bf16.batch_size = batch_size
                paths_b["PyTorch bf16 channels-last"] = detector_batches(bf16, batch_size)
            forward = {"PyTorch fp32": forward_only(fp32, batch_size, max(3, iters // 2)),
                       "Detector, onnxruntime backend": forward_only(ort_backend, batch_size, max(3, iters // 2))}
            if bf16 is not None:
                forward["PyTorch bf16 channels-last"] = forward_only(bf16, batch_size, max(3, iters // 2))
            baseline_ips = None
            for name, run in paths_b.items():
                times = stream_timings(run, paths, batch_size, iters)
                ips = batch_size * len(times) / sum(times)
                baseline_ips = baseline_ips or ips
                fwd = forward.get(name)
                rows.append((batch_size, name, ips, percentile(times, 50), percentile(times, 90),
                             percentile(times, 99), ips / baseline_ips,
                             f"{fwd * 1000:.0f} ms ({statistics.median(times) / fwd:.2f}x)" if fwd else "-"))
                print(f"  done: batch {batch_size}, {name}", file=sys.stderr)
        if bf16 is None:
            print("bf16 path skipped: this CPU has no native bfloat16 (pass --bf16 on to force it)\n")

    print("| batch | path | images/s | p50 ms | p90 ms | p99 ms | vs baseline | forward only (end-to-end / forward) |")
    print("|---|---|---|---|---|---|---|---|")
    for batch_size, name, ips, p50, p90, p99, ratio, fwd in rows:
        print(f"| {batch_size} | {name} | {ips:.2f} | {p50 * 1000:.0f} | {p90 * 1000:.0f} | {p99 * 1000:.0f} | "
              f"{ratio:.2f}x | {fwd} |")


if __name__ == "__main__":
    main()
