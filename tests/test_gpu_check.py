"""tools/gpu_check.sh and gpu_check.py without a GPU: syntax, flags, the CPU smoke of every
benchmark code path in an environment like the GPU machine's (no DALI, pycocotools,
faster-coco-eval, onnx), the CUDA tests collecting there, and the goal bookkeeping
(met / missed / not run)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


# Absent on the GPU machine, or possibly absent (its image has no DALI, pycocotools or
# faster-coco-eval; onnx and onnxruntime are there today, but nothing on its path may need them).
ABSENT_ON_THE_GPU_MACHINE = ("nvidia.dali", "pycocotools", "faster_coco_eval", "onnx", "onnxruntime", "openvino",
                             "nncf")


def _without(folder: Path, modules: tuple[str, ...]) -> str:
    """A folder whose ``sitecustomize`` makes ``modules`` unimportable (for PYTHONPATH)."""
    folder.mkdir()
    lines = ["import sys", *(f"sys.modules[{name!r}] = None" for name in modules)]
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return str(folder)


def _run_script(*args: str, out: Path | None = None, blocked: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    if blocked is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (blocked, env.get("PYTHONPATH")) if p)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, message", [(["--budget", "8m"], "whole number of seconds"),
                                           (["--frobnicate"], "unknown argument '--frobnicate'"),
                                           (["--tests-only", "--bench-only"], "exclude each other")])
def test_bad_arguments_exit_2_with_one_line(args, message):
    proc = _run_script(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # the whole CPU smoke
def test_without_a_gpu_it_says_so_and_smokes_every_code_path(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(out=out, blocked=_without(tmp_path / "site", ABSENT_ON_THE_GPU_MACHINE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_check: no CUDA GPU here") and "CPU smoke" in lines[0]
    assert lines[1].startswith("gpu_check: not installed here")
    assert {"nvidia-dali", "pycocotools", "faster-coco-eval", "onnx"} <= set(lines[1].split(": ")[-1].split())
    assert lines[-1] == "gpu_check: CPU smoke passed"
    # The CUDA tests import and collect with the packages left, and each skips with its reason.
    junit = (out / "pytest_cuda.xml").read_text()
    assert 'errors="0"' in junit and 'failures="0"' in junit and 'skipped="0"' not in junit
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["environment"]["device"] == "cpu"
    measured = {row["key"] for row in report["rows"]}
    # Model bound; the real loader (PyTorch DataLoader on synthetic JPEGs made there); the
    # Detector; the torchvision decode path of nvJPEG, run on CPU tensors.
    assert {"train", "infer_forward", "infer_detector", "infer_nvjpeg", "loader_train"} <= measured
    assert all(row["images_per_second"] > 0 for row in report["rows"])
    assert "channels-last" in next(row["config"] for row in report["rows"] if row["key"] == "train")
    assert not [line for line in report["skipped"] if "FAILED" in line]
    assert any(line.startswith("dali: NVIDIA DALI is not importable") for line in report["skipped"])
    goals = report["goals"]
    assert [goal["status"] for goal in goals][:1] == ["missed"]  # a CPU is far from 1,450 img/s
    assert "real loader" in goals[1]["goal"] and goals[1]["status"] != "not run"  # DataLoader without DALI
    profiles = report["profile"]
    assert any("decode (PIL" in stage for stages in profiles.values() for stage in stages)
    assert any("decode (nvJPEG)" in stage for stages in profiles.values() for stage in stages)
    assert "| goal | training >= 1,450 img/s" in proc.stdout


@pytest.mark.slow  # a DALI pipeline and a training step
def test_the_dali_part_smokes_where_dali_is_installed(tmp_path):
    from ssd300.data.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not importable here")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--smoke", "--parts", "dali",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {row["key"] for row in report["rows"]} == {"dali_loader", "dali_train"}
    assert all(row["images_per_second"] > 0 for row in report["rows"])


def _row(key: str, batch: int, rate: float):
    return gpu_check.Row(key, key.split("_")[0], f"config of {key}", batch, rate, 1000 * batch / rate)


def test_goals_are_marked_met_missed_or_not_run():
    report = gpu_check.Report()
    for row in (_row("train", 64, 1400.0), _row("train", 128, 1500.0), _row("dali_train", 128, 1300.0),
                _row("infer_detector", 64, 450.0), _row("infer_nvjpeg", 64, 2100.0),
                _row("infer_nvjpeg", 8, 5000.0)):
        report.rows.append(row)
    goals = gpu_check.evaluate_goals(report)
    assert [g["status"] for g in goals] == ["met", "missed", "missed", "met"]
    assert goals[0]["measured"] == 1500.0
    assert goals[1]["measured"] == pytest.approx(1300.0 / 1500.0)
    assert [g["measured"] for g in goals[2:]] == [450.0, 2100.0]  # batch 64 only
    table = gpu_check.format_table(report, goals)
    assert table.count("**met**") == 2 and table.count("**missed**") == 2
    assert "| 0.87 |" in table  # the loader ratio, not an images/s figure

    # A compiled run that is faster counts for the training goal; the loader ratio stays eager's.
    report.rows.append(_row("train_compiled", 128, 1700.0))
    goals = gpu_check.evaluate_goals(report)
    assert goals[0]["measured"] == 1700.0 and goals[1]["measured"] == pytest.approx(1300.0 / 1500.0)

    # Without DALI the PyTorch DataLoader is the real loader; the faster of the two counts.
    report.rows.append(_row("loader_train", 128, 1400.0))
    goals = gpu_check.evaluate_goals(report)
    assert goals[1]["measured"] == pytest.approx(1400.0 / 1500.0) and goals[1]["status"] == "met"
    report.rows = [row for row in report.rows if row.key != "dali_train"]
    assert gpu_check.evaluate_goals(report)[1]["measured"] == pytest.approx(1400.0 / 1500.0)

    empty = gpu_check.evaluate_goals(gpu_check.Report())
    assert [g["status"] for g in empty] == ["not run"] * 3


def test_parts_and_budget_are_checked():
    assert gpu_check.parse_args(["--parts", "infer,train", "--budget-s", "60"]).parts == ("infer", "train")
    for argv in (["--parts", "train,warp"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(argv)
        assert exit_info.value.code == 2
