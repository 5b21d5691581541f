"""INT8 vs fp32: COCO AP/AP50 on a validation set, and end-to-end CPU speed at batch 1 and 8.

Accuracy (``--checkpoint`` on ``--data``'s validation split): PyTorch fp32 (the Detector), and the
INT8 ONNX file of each quantiser (onnxruntime, nncf; calibrated on ``--calibration-images`` of the
training split) run by onnxruntime and by OpenVINO, all through the same pre/post-processing.

Speed (JPEG files -> detections, everything included, as benchmarks/bench_inference.py): the
reference-style baseline, PyTorch fp32, PyTorch bf16 (only where the CPU has native bf16), the
fp32 ONNX file, and the INT8 files, all run with :meth:`ssd300.inference.Detector.from_exported`
and the same decode thread. ``--speed-model resnet50`` (default) times bench_inference's
ResNet-50 SSD300 with random, score-calibrated weights (the issue's goals are for it) with INT8
calibrated on its photographs; ``checkpoint`` times the --checkpoint model.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_int8.py --checkpoint runs/demo/last.pt --data runs/demo/data
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import calibrated_model, detector_batches, per_batch_calls, reference_pipeline
from common import make_jpegs, percentile, stream_timings, timed

from ssd300.checkpoint import load_model
from ssd300.coco_eval import evaluate_results, load_coco_ground_truth
from ssd300.data.coco import resolve_split
from ssd300.export import export_model
from ssd300.inference import Detector
from ssd300.labels import LabelMap
from ssd300.quantize import export_int8
from ssd300.runtime import Runtime, native_bf16


def int8_files(model: torch.nn.Module, label_map: LabelMap, folder: Path, calibration: Path, count: int,
               quantizers: list[str]) -> dict[str, Path]:
    files = {}
    for quantizer in quantizers:
        files[quantizer], export_seconds = timed(lambda: export_int8(
            model, label_map, folder / f"int8_{quantizer}.onnx", calibration, count, quantizer=quantizer))
        print(f"  INT8 ({quantizer}) export + calibration on {count} images: {export_seconds:.0f} s",
              file=sys.stderr)
    return files


def coco_metrics(detector: Detector, image_dir: Path, annotation_file: Path) -> tuple[float, float]:
    coco = load_coco_ground_truth(annotation_file)
    ids = sorted(coco.getImgIds())
    paths = [image_dir / coco.imgs[i]["file_name"] for i in ids]
    results = []
    for image_id, (_, result) in zip(ids, detector.detect_files(paths, on_error="raise")):
        results.extend(result.to_coco(image_id))
    metrics = evaluate_results(coco, results, ids)
    return metrics.ap, metrics.ap50


def accuracy(args: argparse.Namespace, quantizers: list[str], runtimes: list[str]) -> None:
    model, label_map, _ = load_model(args.checkpoint)
    image_dir, annotations = resolve_split(args.data, "val")
    with tempfile.TemporaryDirectory() as tmp:
        files = int8_files(model, label_map, Path(tmp), args.data, args.calibration_images, quantizers)
        rows = [("PyTorch fp32", *coco_metrics(Detector(model, label_map, device="cpu"), image_dir, annotations))]
        for quantizer, path in files.items():
            for runtime in runtimes:
                ap, ap50 = coco_metrics(Detector.from_exported(path, runtime=runtime), image_dir, annotations)
                rows.append((f"INT8 {quantizer} quantiser, {runtime}", ap, ap50))
    print(f"\naccuracy: {args.checkpoint} on {annotations} ({args.calibration_images} calibration images "
          "from the training split)\n")
    print("| path | AP | AP50 | dAP | dAP50 |\n|---|---|---|---|---|")
    for name, ap, ap50 in rows:
        print(f"| {name} | {ap:.4f} | {ap50:.4f} | {ap - rows[0][1]:+.4f} | {ap50 - rows[0][2]:+.4f} |")


def speed(args: argparse.Namespace, quantizers: list[str], runtimes: list[str]) -> None:
    has_bf16 = native_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "jpegs").mkdir()
        paths = make_jpegs(folder / "jpegs", 16)
        if args.speed_model == "resnet50":
            model, _ = calibrated_model(paths, 400)
            label_map = LabelMap.coco2017()
            calibration = folder / "jpegs"
        else:
            model, label_map, _ = load_model(args.checkpoint)
            calibration = args.data
        fp32_onnx = export_model(model, label_map, folder / "fp32.onnx", "onnx")
        files = int8_files(model, label_map, folder, calibration, args.calibration_images, quantizers)
        detectors: dict[str, Detector] = {
            "PyTorch fp32": Detector(model, label_map, device="cpu"),
            "ONNX fp32 (onnxruntime)": Detector.from_exported(fp32_onnx),
        }
        if has_bf16:  # emulated bf16 is 5-10x slower: only where the CPU has it natively
            detectors["PyTorch bf16 channels-last"] = Detector(model, label_map,
                                                               runtime=Runtime.resolve("cpu", amp=True))
        for quantizer, path in files.items():
            for runtime in runtimes:
                detectors[f"INT8 {quantizer}, {runtime}"] = Detector.from_exported(path, runtime=runtime)
        print(f"\nspeed: {args.speed_model} SSD300, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {has_bf16}\n")
        rows = []
        for batch_size, iters in ((1, args.iters_b1), (8, args.iters_b8)):
            runs = {"reference style (baseline)": per_batch_calls(reference_pipeline(model.eval()), batch_size)}
            for name, detector in detectors.items():
                detector.batch_size = batch_size
                runs[name] = detector_batches(detector, batch_size)
            measured = {}
            for name, run in runs.items():
                times = stream_timings(run, paths, batch_size, iters)
                measured[name] = (batch_size * len(times) / sum(times), times)
                print(f"  done: batch {batch_size}, {name}", file=sys.stderr)
            baseline = measured["reference style (baseline)"][0]
            best_float = max(ips for name, (ips, _) in measured.items() if not name.startswith("INT8"))
            for name, (ips, times) in measured.items():
                rows.append((batch_size, name, ips, percentile(times, 50), percentile(times, 90), ips / baseline,
                             ips / best_float))
    print("| batch | path | images/s | p50 ms | p90 ms | vs baseline | vs best non-INT8 |")
    print("|---|---|---|---|---|---|---|")
    for batch_size, name, ips, p50, p90, ratio, vs_best in rows:
        print(f"| {batch_size} | {name} | {ips:.2f} | {p50 * 1000:.0f} | {p90 * 1000:.0f} | {ratio:.2f}x | "
              f"{vs_best:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint (e.g. the demo's)")
    parser.add_argument("--data", type=Path, required=True, help="its COCO-format dataset root (val split scored)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--quantizers", default="onnxruntime,nncf", help="comma-separated: onnxruntime,nncf")
    parser.add_argument("--runtimes", default="onnxruntime,openvino", help="comma-separated: onnxruntime,openvino")
    parser.add_argument("--speed-model", choices=("resnet50", "checkpoint"), default="resnet50")
    parser.add_argument("--iters-b1", type=int, default=12, help="batches of 1 per path")
    parser.add_argument("--iters-b8", type=int, default=4, help="batches of 8 per path")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    quantizers = [q for q in args.quantizers.split(",") if q]
    runtimes = [r for r in args.runtimes.split(",") if r]
    if not args.skip_accuracy:
        accuracy(args, quantizers, runtimes)
    if not args.skip_speed:
        speed(args, quantizers, runtimes)


if __name__ == "__main__":
    main()
