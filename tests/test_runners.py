"""Runners: every backend's outputs agree with the PyTorch runner on the same weights; onnxruntime's
providers follow the device; describe() is one line; the factories refuse contradictions in one
line; exporters leave nothing at the output path when they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd300.commands.options import cli_message
from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.errors import UserInputError
from ssd300.export import export_model, input_description
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.postprocess import PostprocessConfig, PostProcessor
from ssd300.runners import (
    ExportedProgramRunner,
    FileRunner,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    TorchScriptRunner,
    build_runner,
    load_exported,
    onnxruntime_providers,
)
from ssd300.runtime import Runtime

onnxruntime = pytest.importorskip("onnxruntime")

LABEL_MAP = LabelMap.from_categories([(3, "disc"), (7, "rectangle"), (11, "triangle")])
CPU = torch.device("cpu")
FP32 = Runtime.resolve("cpu", amp=False)


@pytest.fixture(scope="module")
def model() -> SSD300:
    torch.manual_seed(0)
    net = SSD300("resnet18", num_classes=4).eval()
    with torch.no_grad():  # spread the untrained scores: detections above the threshold, few ties
        for conf in net.conf:
            conf.weight.mul_(0.3)
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(3, 3, 300, 300, generator=generator) * 255).to(torch.uint8)
    return EvalTransform().normalize(pixels)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runners")
    return {
        "onnx_raw": export_model(model, LABEL_MAP, folder / "raw.onnx", "onnx", raw=True, exporter="legacy"),
        "pt2_raw": export_model(model, LABEL_MAP, folder / "raw.pt2", "pt2", raw=True),
        "ts_raw": export_model(model, LABEL_MAP, folder / "raw.ts", "torchscript", raw=True),
        "onnx": export_model(model, LABEL_MAP, folder / "full.onnx", "onnx", exporter="legacy",
                             score_threshold=0.2, max_detections=50),
    }


@pytest.fixture(scope="module")
def reference(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    return TorchRunner(model, FP32).forward(images)


def _close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], atol: float) -> None:
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)


def test_torch_runner_is_the_plain_model_on_a_copy(model, images, reference):
    with torch.no_grad():
        plain = model(images)  # no BatchNorm folding, NCHW
    _close(reference, plain, atol=1e-4)  # folding only reorders float sums
    assert next(model.parameters()).dtype == torch.float32 and not model.training  # caller's model untouched
    unfused = TorchRunner(model, Runtime.resolve("cpu", amp=False, channels_last=False), fuse=False)
    _close(unfused.forward(images), plain, atol=1e-5)
    # bf16 forced on (emulated where the CPU lacks it): the whole network cast, 8 bits of mantissa.
    bf16 = TorchRunner(model, Runtime.resolve("cpu", amp=True, bf16_available=True))
    assert bf16.bf16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    locs, logits = bf16.forward(images)
    assert locs.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference[1], atol=0.15, rtol=0.05)


@pytest.mark.parametrize("kind, cls", [("onnx_raw", OnnxRuntimeRunner), ("pt2_raw", ExportedProgramRunner),
                                       ("ts_raw", TorchScriptRunner), ("onnx_raw/openvino", OpenVinoRunner)])
def test_file_runners_agree_with_the_torch_runner(files, images, reference, kind, cls):
    name, _, runtime = kind.partition("/")
    if cls is OpenVinoRunner:
        pytest.importorskip("openvino")
    runner = load_exported(files[name], runtime=runtime or "auto")
    assert type(runner) is cls and runner.raw and runner.label_map == LABEL_MAP and runner.device == CPU
    _close(runner.forward(images), reference, atol=1e-3)  # fp32 in other kernels


PINNING_PROBE = """
import os, sys
from ssd300.runners import load_exported
cores = sorted(os.sched_getaffinity(0))
shared = load_exported(sys.argv[1], runtime="openvino", threads=1)  # one core's worth of all the cores
whole = load_exported(sys.argv[1], runtime="openvino")
os.sched_setaffinity(0, cores[:1])
own = load_exported(sys.argv[1], runtime="openvino", threads=1)  # a process given its own core
prop = lambda runner, key: runner.compiled.get_property(key)
print(len(cores), prop(shared, "INFERENCE_NUM_THREADS"), prop(shared, "ENABLE_CPU_PINNING"),
      prop(whole, "INFERENCE_NUM_THREADS"), prop(own, "ENABLE_CPU_PINNING"))
"""


def test_openvino_runner_pins_threads_only_on_cores_of_its_own(files):
    """A share of cores other processes also use (``threads`` < the process's cores): no pinning, or
    every such process's threads sit on the same first cores and they take turns (measured: half the
    throughput of 2 server workers on 2 cores). A process given its own cores (a server worker, see
    claim_worker_cores) keeps OpenVINO's pinning. Run in its own process: with pinning off, OpenVINO
    2026.4 makes a later SIGCHLD crash a process whose Python code handles SIGCHLD (this one does,
    after a DataLoader with workers); see OpenVinoRunner."""
    pytest.importorskip("openvino")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    done = subprocess.run([sys.executable, "-c", PINNING_PROBE, str(files["onnx_raw"])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cores, shared_threads, shared_pinning, whole_threads, own_pinning = done.stdout.split()[-5:]
    assert shared_threads == "1" and own_pinning == "True"
    if int(cores) > 1:
        assert shared_pinning == "False"
        assert whole_threads != "1"  # one process, all cores: OpenVINO's choice


def test_onnxruntime_backend_of_a_model_agrees(model, images, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("SSD300_CACHE_DIR", str(tmp_path))
    runner = build_runner(model, FP32, backend="onnxruntime")
    assert isinstance(runner, OnnxRuntimeRunner) and runner.file is None  # the cache's file, not the user's
    assert runner.path.parent == tmp_path / "onnx"
    _close(runner.forward(images), reference, atol=1e-3)


def test_full_detector_file_runner_detects_like_torch_plus_postprocessor(model, files, images):
    config = PostprocessConfig(score_threshold=0.2, max_detections=50)
    postprocessor = PostProcessor(default_boxes_300(), config)
    sizes = torch.tensor([[640.0, 480.0]] * images.shape[0])
    want = TorchRunner(model, FP32).detect(images, postprocessor, sizes)
    runner = load_exported(files["onnx"])
    assert not runner.raw and runner.baked_settings["score_threshold"] == pytest.approx(0.2)
    got = runner.detect(images, postprocessor, sizes)
    assert sum(len(w) for w in want) > 20
    for g, w in zip(got, want):
        assert len(g) == len(w) and sorted(g.labels.tolist()) == sorted(w.labels.tolist())
        torch.testing.assert_close(g.scores.sort().values, w.scores.sort().values, atol=1e-4, rtol=1e-4)
        assert g.boxes_pixels is not None and float(g.boxes_pixels.max()) <= 640.0
    with pytest.raises(ValueError, match="whole detector"):
        runner.forward(images)


def test_onnxruntime_providers_follow_the_device():
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnxruntime_providers(CPU, everything) == ["CPUExecutionProvider"]
    assert onnxruntime_providers(torch.device("cuda"), everything) == [
        ("TensorrtExecutionProvider", {"device_id": 0}), ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider"]
    assert onnxruntime_providers(torch.device("cuda:1"), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(UserInputError, match="^device cuda: this onnxruntime has no CUDA provider") as error:
        onnxruntime_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    assert error.value.fields == ("device",) and cli_message(error.value).startswith("--device cuda:")


def test_onnxruntime_runner_asks_the_session_for_the_chosen_providers(files, monkeypatch):
    asked: list[object] = []
    real_session = onnxruntime.InferenceSession

    def session(path, options=None, providers=None):
        asked.append(providers)
        return real_session(path, options, providers=["CPUExecutionProvider"])  # only the CPU build is here

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    runner = OnnxRuntimeRunner(files["onnx_raw"], torch.device("cuda:0"))
    assert asked == [[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]]
    assert runner.describe() == (f"onnxruntime: cuda:0 (CUDAExecutionProvider, CPUExecutionProvider), fp32, "
                                 f"{files['onnx_raw']}")


def test_describe_is_one_line_naming_backend_device_precision_file(model, files):
    assert TorchRunner(model, FP32).describe() == \
        "torch: cpu, fp32, channels_last, BatchNorm folded, model SSD300(resnet18)"
    assert load_exported(files["onnx_raw"]).describe() == \
        f"onnxruntime: cpu (CPUExecutionProvider), fp32, {files['onnx_raw']}"
    assert load_exported(files["pt2_raw"]).describe() == f"torch: cpu, fp32, pt2 {files['pt2_raw']}"
    assert load_exported(files["ts_raw"]).describe() == f"torch: cpu, fp32, torchscript {files['ts_raw']}"


def _one_line(error: pytest.ExceptionInfo, fields: tuple[str, ...]) -> str:
    message = str(error.value)
    assert "\n" not in message and "--" not in message and error.value.fields == fields
    return message


def test_factories_refuse_contradictions_in_one_line(model, files):
    runner = load_exported(files["onnx"])
    assert isinstance(runner, FileRunner) and build_runner(runner, FP32) is runner
    with pytest.raises(UserInputError, match="amp/bf16 do not apply") as error:
        build_runner(runner, Runtime.resolve("cpu", amp=True, bf16_available=True))
    _one_line(error, ("amp",))
    with pytest.raises(UserInputError, match="backend does not apply") as error:
        build_runner(runner, FP32, backend="onnxruntime")
    _one_line(error, ("backend",))
    with pytest.raises(UserInputError, match="^backend must be one of torch, onnxruntime") as error:
        build_runner(model, FP32, backend="tensorrt")
    _one_line(error, ("backend",))
    with pytest.raises(UserInputError, match="runs the network in fp32") as error:
        build_runner(model, Runtime.resolve("cpu", amp=True, bf16_available=True), backend="onnxruntime")
    _one_line(error, ("backend", "amp"))
    with pytest.raises(UserInputError, match="^runtime openvino cannot run") as error:
        load_exported(files["pt2_raw"], runtime="openvino")
    _one_line(error, ("runtime",))
    with pytest.raises(UserInputError, match="^device cuda: openvino runs raw.onnx on the CPU") as error:
        OpenVinoRunner(files["onnx_raw"], torch.device("cuda"))
    _one_line(error, ("device",))
    with pytest.raises(UserInputError, match="baked in.*score threshold 0.05 < the file's 0.2"):
        runner.check_postprocess(PostprocessConfig(score_threshold=0.05))


@pytest.mark.parametrize("fmt, suffix, writer", [("torchscript", ".ts", "torch.jit.save"),
                                                 ("pt2", ".pt2", "torch.export.save"),
                                                 ("onnx", ".onnx", "ssd300.export._export_onnx_legacy")])
def test_a_failed_export_leaves_nothing_at_the_output_path(model, tmp_path, monkeypatch, fmt, suffix, writer):
    def half_written(module_or_program, path, *args, **kwargs):
        if hasattr(path, "write"):  # TorchScript and pt2 are serialised to a buffer, then written
            path.write(b"half a model")
        else:
            Path(path).write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(writer, half_written)
    out = tmp_path / f"model{suffix}"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model(model, LABEL_MAP, out, fmt, exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_metadata_input_comes_from_the_preprocessing():
    assert input_description() == ("images float32 (N,3,300,300): RGB resized to 300x300, /255, normalised with "
                                   "mean (0.485,0.456,0.406) std (0.229,0.224,0.225)")
