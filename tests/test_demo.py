"""`ssd300 demo` end to end on a tiny configuration: every promised artefact is written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ssd300.cli import main

pytestmark = pytest.mark.slow  # the demo: a training run


def test_demo_writes_checkpoint_metrics_curves_and_predictions(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--num-train-images", "6", "--num-val-images", "3", "--epochs", "2", "--bs", "2",
            "--backbone", "resnet18", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "demo finished" in captured.out

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["AP50"] <= 1.0 and metrics["iterations"] == 6
    assert (out / "epoch_1.pt").is_file() and (out / "last.pt").is_file() and (out / "best.pt").is_file()
    with Image.open(out / "curves.png") as curves:
        assert curves.size[0] > 500
    predictions = sorted((out / "predictions").glob("*.jpg"))
    assert len(predictions) == 3
    with Image.open(predictions[0]) as drawn, Image.open(out / "data" / "val" / predictions[0].name) as source:
        assert drawn.size == source.size  # drawn on the original image, not the 300x300 input
    # the demo's short-run recipe (BENCHMARKS.md: AdamW + cosine reach AP50 ~0.8 where SGD + multistep stay ~0.4-0.5)
    import torch
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["scheduler"]["kind"] == "cosine" and checkpoint["scheduler"]["total_iterations"] == 6
    assert checkpoint["args"]["optimizer"] == "adamw"
    report = (out / "report.html").read_text()
    assert "<table" in report and "data:image/png;base64," in report  # the newest evaluation's, self-contained
    assert "report:" in captured.out and str(out / "report.html") in captured.out
