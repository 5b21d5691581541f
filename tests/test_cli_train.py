"""Command line of train/evaluate: bad flags and inputs fail in one line before any work;
reference-style invocation; evaluation of our and reference-format checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TWO_CLASSES

from ssd300.cli import main
from ssd300.labels import LabelMap
from ssd300.model import SSD300


@pytest.fixture(scope="module")
def data_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(num_train=2, num_val=2, seed=0, **TWO_CLASSES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_tiny_model) -> Path:
    """A resnet18 checkpoint in the reference's format: only ``model`` and ``label_map``."""
    model = make_tiny_model(3)
    path = tmp_path_factory.mktemp("ckpt") / "reference_style.pt"
    torch.save({"model": model.state_dict(), "label_map": {0: "background", 1: "disc", 2: "rectangle"}}, path)
    return path


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--bs", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--learning-rate must be > 0"),
    (["--epochs", "-2"], "--epochs must be >= 1 to train, got -2"),
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--multistep", "-1"], "--multistep takes epoch numbers >= 0"),
    (["--no-cuda", "--device", "cuda"], "--no-cuda contradicts --device cuda"),
    (["--mode", "evaluation"], "--mode 'evaluation' needs --checkpoint"),
    (["--mode", "evaluation", "--dali", "--checkpoint", "x.pt"], "--dali is a training loader"),
    (["--dali", "--no-iou-crop"], "--no-iou-crop: the DALI pipeline always crops"),
    (["--bs", "1"], "--batch-size 1: BatchNorm needs at least 2 images"),
    (["--bn-recalibration", "-1"], "--bn-recalibration must be >= 0"),
    (["--checkpoint", "/no/such/file.pt"], "--checkpoint /no/such/file.pt: file not found"),
    (["--backbone-path", "/no/such/r50.pth"], "--backbone-path /no/such/r50.pth: file not found"),
])
def test_bad_flags_are_one_line_errors(capsys, data_dir, flags, message):
    err = _error(capsys, ["train", "--data", str(data_dir), *flags])
    assert message in err


def test_bad_data_paths(capsys, data_dir, tmp_path):
    assert "dataset folder does not exist" in _error(capsys, ["train", "--data", str(tmp_path / "nope")])
    err = _error(capsys, ["train", "--data", str(data_dir), "--train-images", str(data_dir / "train")])
    assert "--data and --train-images contradict each other" in err
    err = _error(capsys, ["train", "--train-images", str(data_dir / "train")])
    assert "--train-annotations is missing" in err
    err = _error(capsys, ["train", "--train-images", str(tmp_path), "--train-annotations", str(tmp_path / "a.json")])
    assert "--train-images" in err and "a.json" in err or "no images" in err or "not found" in err
    assert "no train data" in _error(capsys, ["train", "--evaluation"])


def test_reference_style_command_line_is_routed_to_train(capsys):
    # `ssd300 --mode evaluation ...` (no command word), as the reference's main.py is called
    assert "--mode 'evaluation' needs --checkpoint" in _error(capsys, ["--mode", "evaluation", "--data", "/x"])


def test_cuda_requested_without_cuda(capsys, data_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _error(capsys, ["train", "--data", str(data_dir), "--device", "cuda", "--epochs", "1", "--evaluation"])
    assert "--device cuda: CUDA is not available" in err  # runtime names the field; the CLI writes the flag


def test_checkpoint_that_does_not_fit_the_model(capsys, data_dir, checkpoint, tmp_path):
    err = _error(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir),
                          "--backbone", "resnet34", "--device", "cpu"])
    assert "resnet18" in err and "resnet34" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    err = _error(capsys, ["evaluate", "--checkpoint", str(corrupt), "--data", str(data_dir), "--device", "cpu"])
    assert str(corrupt) in err
    # a 4-class checkpoint against a 2-class dataset
    torch.manual_seed(0)
    other = tmp_path / "other.pt"
    torch.save({"model": SSD300("resnet18", num_classes=5).state_dict(),
                **LabelMap.generic(5).to_checkpoint()}, other)
    err = _error(capsys, ["train", "--checkpoint", str(other), "--data", str(data_dir), "--device", "cpu",
                          "--epochs", "1", "--evaluation"])
    assert "other.pt" in err


def test_evaluate_reference_checkpoint_equals_train_mode_evaluation(capsys, data_dir, checkpoint, tmp_path):
    summary_a, summary_b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--device", "cpu",
                 "--num-workers", "0", "--json-summary", str(summary_a), "--results", str(tmp_path / "r.json"),
                 "--eval-backend", "pycocotools"]) == 0
    out = capsys.readouterr()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out.err + out.out
    assert "images, pycocotools)" in out.err + out.out               # the log line names the backend
    assert main(["--mode", "evaluation", "--checkpoint", str(checkpoint), "--data", str(data_dir), "--device", "cpu",
                 "--num-workers", "0", "--json-summary", str(summary_b), "--no-amp"]) == 0  # auto backend
    a, b = json.loads(summary_a.read_text()), json.loads(summary_b.read_text())
    assert a["AP"] == b["AP"] and a["AP50"] == b["AP50"]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2}
    assert all(len(r["bbox"]) == 4 for r in results)


def test_benchmark_modes_report_images_per_second(capsys, data_dir, checkpoint, tmp_path):
    summary = tmp_path / "bench.json"
    assert main(["train", "--mode", "benchmark-inference", "--checkpoint", str(checkpoint), "--data", str(data_dir),
                 "--device", "cpu", "--num-workers", "0", "--ebs", "2", "--benchmark-warmup", "1",
                 "--benchmark-iterations", "2", "--json-summary", str(summary)]) == 0
    figures = json.loads(summary.read_text())
    assert figures["forward_images_per_second"] > 0 and figures["end_to_end_images_per_second"] > 0
    assert main(["train", "--mode", "benchmark-training", "--data", str(data_dir), "--backbone", "resnet18",
                 "--device", "cpu", "--num-workers", "0", "--bs", "2", "--benchmark-warmup", "1",
                 "--benchmark-iterations", "1", "--json-summary", str(summary)]) == 0
    figures = json.loads(summary.read_text())
    assert figures["images_per_second"] > 0 and figures["iterations"] == 1
    assert "benchmark-training: images_per_second" in capsys.readouterr().err


def test_strict_images_makes_an_undecodable_image_fatal(capsys, synthetic_dataset, tmp_path):
    data = synthetic_dataset(num_train=2, num_val=2, seed=0, copy_to=tmp_path / "synth", **TWO_CLASSES)
    broken = sorted((data / "train").iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    argv = ["train", "--data", str(data), "--backbone", "resnet18", "--epochs", "1", "--bs", "2", "--num-workers", "0",
            "--device", "cpu", "--no-amp", "--evaluation", "--strict-images", "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's header lines
    assert error.startswith("ssd300 train: error: ") and str(broken) in error and "cannot be decoded" in error


@pytest.mark.slow  # a training run
def test_a_failed_start_leaves_no_run_behind_and_the_corrected_command_runs(capsys, data_dir, tmp_path, monkeypatch):
    """Each start below fails before its first checkpoint, leaving a log.jsonl; the next command
    must not be refused as "another run" (each assertion on the next failure's own message proves it)."""
    import shutil

    from ssd300.loss import SSDLoss

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "annotations" / "instances_train.json").write_text('{"images": [')  # truncated json
    save = tmp_path / "run"
    base = ["train", "--save", str(save), "--backbone", "resnet18", "--epochs", "1", "--bs", "2", "--seed", "0",
            "--device", "cpu", "--no-amp", "--num-workers", "0", "--no-progress", "--evaluation"]

    err = _error(capsys, [*base, "--data", str(broken)])  # bad json
    assert "instances_train.json" in err and "another run" not in err
    assert sorted(p.name for p in save.iterdir()) == ["log.jsonl"]  # what the failed start left

    with monkeypatch.context() as patched:  # NaN at the first step
        patched.setattr(SSDLoss, "forward", lambda self, locs, *rest: locs.sum() * float("nan"))
        assert main([*base, "--data", str(data_dir)]) == 3
    err = capsys.readouterr().err
    assert "loss is nan at iteration 0 (epoch 0" in err and "another run" not in err
    assert sorted(p.name for p in save.iterdir()) == ["log.jsonl"]

    assert main([*base, "--data", str(data_dir), "--bs", "4"]) == 2  # a batch larger than the dataset
    err = capsys.readouterr().err
    assert "2 training images are fewer than --batch-size 4" in err.splitlines()[-1] and "another run" not in err

    assert main([*base, "--data", str(data_dir)]) == 0  # the corrected command
    err = capsys.readouterr().err
    assert f"{save} held no checkpoint and no evaluation, only what a start that failed left (log.jsonl)" in err
    assert sorted(p.name for p in save.iterdir()) == ["curves.png", "epoch_0.pt", "last.pt", "log.jsonl",
                                                      "metrics.json"]
    records = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in records] == [("train", 0)]  # the failed starts' lines gone
