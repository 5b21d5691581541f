"""The one runtime policy: what amp means and which memory format runs, per (device, native bf16, amp);
every command reports the same choice on the same machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ssd300.cli import main
from ssd300.errors import UserInputError
from ssd300.runtime import Runtime, native_bf16, resolve_device


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from ssd300.data.synth import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=2, num_val=1, seed=0, num_classes=2,
                                      max_objects=1, min_width=240, max_width=260, min_height=200, max_height=220)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA exists so the CUDA policy can be checked on a CPU-only machine (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("amp", [True, False])
def test_cpu_policy(monkeypatch, has_bf16, amp):
    monkeypatch.setattr("ssd300.runtime.native_bf16", lambda: has_bf16)
    runtime = Runtime.resolve("cpu", amp)
    bf16 = amp and has_bf16
    assert runtime.dtype == (torch.bfloat16 if bf16 else None)
    assert runtime.precision == ("bf16" if bf16 else "fp32")
    assert not runtime.uses_grad_scaler and runtime.grad_scaler() is None  # bf16 has fp32's range
    assert runtime.amp_fell_back == (amp and not has_bf16)
    # channels-last for bf16 and for inference; fp32 CPU training stays NCHW
    assert runtime.channels_last(training=True) == bf16
    assert runtime.channels_last(training=False)
    line = runtime.describe()
    assert line.startswith("runtime: cpu (") and len(line.splitlines()) == 1
    assert (", native bf16)" in line) == has_bf16 and (", no native bf16)" in line) == (not has_bf16)
    if bf16:
        assert "amp: bf16 autocast" in line and "channels_last" in line and "NCHW" not in line
    elif amp:
        assert "amp: fp32 (this CPU has no native bf16" in line and "channels_last (training NCHW)" in line
    else:
        assert "amp off: fp32" in line


@pytest.mark.parametrize("amp", [True, False])
def test_cuda_policy(fake_cuda, monkeypatch, amp):
    monkeypatch.setattr("ssd300.runtime.native_bf16", lambda: False)
    runtime = Runtime.resolve("cuda:0", amp, allow_tf32=True)
    assert runtime.device == torch.device("cuda", 0)
    assert runtime.dtype == (torch.float16 if amp else None)
    assert runtime.uses_grad_scaler == amp
    assert runtime.channels_last(training=True) and runtime.channels_last(training=False)
    assert runtime.tf32 and not runtime.amp_fell_back
    line = runtime.describe()
    assert "cuda:0 (Fake GPU), TF32 on" in line
    assert ("amp: fp16 autocast + GradScaler" in line) == amp
    assert Runtime.resolve("cuda", amp, allow_tf32=False).tf32 is False


def test_explicit_layout_overrides_the_rule_and_tf32_is_cuda_only():
    runtime = Runtime.resolve("cpu", False, channels_last=True)
    assert runtime.channels_last(training=True) and runtime.channels_last(training=False)
    runtime = Runtime.resolve("cpu", True, channels_last=False, bf16_available=True)
    assert not runtime.channels_last(training=False) and runtime.memory_format(False) == torch.contiguous_format
    assert Runtime.resolve("cpu", True, allow_tf32=True).tf32 is False


def test_autocast_runs_the_chosen_dtype():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    with Runtime.resolve("cpu", True, bf16_available=True).autocast():
        assert conv(x).dtype == torch.bfloat16
    with Runtime.resolve("cpu", True, bf16_available=False).autocast():
        assert conv(x).dtype == torch.float32


def test_native_bf16_is_oneDNNs_answer():
    expected = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16() is expected
    assert Runtime.resolve("cpu").native_bf16 is expected


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserInputError, match="^device 'tpu:7': not a device") as info:
        resolve_device("tpu:7")
    assert info.value.fields == ("device",)
    with pytest.raises(UserInputError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserInputError, match="threads must be >= 1"):
        Runtime.resolve("cpu", threads=0)


def _runtime_lines(text: str) -> list[str]:
    return re.findall(r"runtime: [^\n]*", text)


def test_train_evaluate_and_detect_report_the_same_runtime(capsys, tiny_dataset: Path, tmp_path,
                                                           make_tiny_checkpoint):
    from ssd300.data.annotations import label_map_from_annotations, read_annotation_file
    from ssd300.data.coco import resolve_split

    checkpoint = tmp_path / "model.pt"
    label_map = label_map_from_annotations(read_annotation_file(resolve_split(tiny_dataset, "val")[1]))
    make_tiny_checkpoint(checkpoint, label_map)
    common = ["--device", "cpu", "--num-workers", "0"]
    assert main(["train", "--data", str(tiny_dataset), "--backbone", "resnet18", "--epochs", "1", "--bs", "2",
                 "--evaluation", "--no-progress", *common]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_dataset), "--ebs", "2",
                 *common]) == 0
    image = next((tiny_dataset / "val").glob("*.jpg"))
    assert main(["detect", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--amp", "--no-images"]) == 0
    captured = capsys.readouterr()
    lines = _runtime_lines(captured.out + captured.err)
    assert len(lines) == 3, captured
    assert len(set(lines)) == 1, lines
    assert lines[0] == Runtime.resolve("cpu", True).describe()
