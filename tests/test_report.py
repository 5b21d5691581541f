"""The evaluation report (ssd300.report): self-contained HTML, rendered by headless Chromium with
every image loaded; a training run's report and stored F1-best thresholds, used by
``detect --score-threshold best``; ``evaluate --out``'s report and its overwrite policy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd300.checkpoint import load_checkpoint
from ssd300.cli import main
from ssd300.coco_eval import evaluate_results, load_coco_ground_truth, rows_to_results
from ssd300.diagnostics import best_thresholds_of, diagnose
from ssd300.report import ReportPaths, write_report
from ssd300.training import TrainConfig, train

from conftest import ONE_LARGE_OBJECT
from test_diagnostics import CATEGORIES, GROUND_TRUTH, ROWS

NAMES = {1: "a", 2: "b", 3: "c"}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            if tag != "img" and values.get(key):
                self.links.append(values[key] or "")


def _write_report(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    paths = {}
    for image_id in (1, 2, 3, 4):
        paths[image_id] = images / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(paths[image_id])
    coco_gt = load_coco_ground_truth(GROUND_TRUTH, backend="pycocotools")
    metrics = evaluate_results(coco_gt, rows_to_results(ROWS))
    result = diagnose(coco_gt, ROWS, [1, 2, 3, 4], CATEGORIES, score_threshold=0.0)
    del paths[4]  # an image whose file is unknown is named, not drawn
    return write_report(ReportPaths.in_folder(tmp_path / "report"), metrics, result, NAMES, title="hand-made",
                        image_paths=paths)


def test_report_is_self_contained_with_tables_figures_and_worst_images(tmp_path: Path) -> None:
    page_path = _write_report(tmp_path)
    page = page_path.read_text(encoding="utf-8")
    tags = _Tags()
    tags.feed(page)
    # 3 figures + the worst images 1 and 3 (image 4's file is unknown)
    assert len(tags.images) == 5
    assert all(src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in tags.images)
    assert tags.links == []
    assert not re.search(r"https?://|url\(|<script|<link", page)
    for name in ("report.html", "per_class_ap.png", "confusion_matrix.png", "thresholds.png"):
        assert (page_path.parent / name).is_file()
    # per-class row of b: id 2, 2 boxes, AP .8 x AP50 (its TP has IoU .877: 8 of 10 IoU thresholds),
    # AP50 51/101 x .5, TP 1, FP 1 (.85 on image 4), 1 miss (the b seen as c)
    row_b = re.search(r"<tr><th>b</th>(.*?)</tr>", page)
    assert row_b is not None
    cells = re.findall(r"<td>(.*?)</td>", row_b.group(1))
    assert cells[:7] == ["2", "2", "0.202", "0.252", "1", "1", "1"]
    assert cells[7] == "0.400"   # F1-best threshold of b
    assert "image 1 (1.png): 3 false positives, 1 misses, 2 true positives" in page
    assert "image 4: 1 false positives, 0 misses, 0 true positives: no image file known" in page
    assert "score &ge; 0.000\n(as given)" in page  # the threshold and where it came from


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("SSD300_REQUIRE_BROWSER") == "1":
        pytest.fail("SSD300_REQUIRE_BROWSER=1 but no chromium on PATH")
    return found


_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.textContent = "IMAGES " + images.length + " LOADED " + loaded;
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    page_path = _write_report(tmp_path)
    # the page itself has no script: a copy with one that counts the loaded images
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text(encoding="utf-8") + _IMAGE_CHECK, encoding="utf-8")
    flags = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=90).stdout
    assert re.search(r"IMAGES 5 LOADED 5", dom), dom[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={shot}", page_path.as_uri()],
                   capture_output=True, timeout=90)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("RGB"))
    # not blank: the figures' and images' pixels differ from the white page
    assert (pixels < 200).any(axis=2).mean() > 0.05
    if os.environ.get("SSD300_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["SSD300_REPORT_SCREENSHOT"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset) -> tuple[Path, Path]:
    """A 1-epoch ResNet-18 run with one evaluation: (dataset root, run folder)."""
    data = synthetic_dataset(4, 4, seed=0, **ONE_LARGE_OBJECT)  # large boxes: some matches even this early
    run = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(data=data, backbone="resnet18", epochs=1, batch_size=2, learning_rate=0.01, evaluation=(0,),
                      seed=0, num_workers=0, save=run, progress=False, device="cpu"))
    return data, run


def test_training_run_writes_the_report_and_stores_best_thresholds(trained_run: tuple[Path, Path]) -> None:
    _, run = trained_run
    for name in ("report.html", "report_epoch_0.html", "confusion_epoch_0.png", "thresholds_epoch_0.png",
                 "evaluation_epoch_0.png"):
        assert (run / name).is_file(), name
    assert (run / "report.html").read_bytes() == (run / "report_epoch_0.html").read_bytes()
    summary = json.loads((run / "metrics.json").read_text())
    record = summary["evaluations"][-1]["diagnostics"]
    counts = np.asarray(record["confusion_matrix"]["counts"])
    assert counts.shape == (3, 3)
    stored = {b["category_id"]: b["threshold"] for b in record["best_thresholds"] if b["threshold"] is not None}
    assert counts.sum() > 0
    # the checkpoint of the evaluated epoch holds the same thresholds (none when nothing matched yet)
    assert best_thresholds_of(load_checkpoint(run / "last.pt")) == (pytest.approx(stored) if stored else None)


def test_detect_score_threshold_best_filters_per_class(make_tiny_model, make_tiny_checkpoint, tmp_path: Path,
                                                       synthetic_dataset) -> None:
    images = sorted((synthetic_dataset(4, 4, seed=0, **ONE_LARGE_OBJECT) / "val").iterdir())
    model = make_tiny_model(conf_scale=0.3).eval()  # spread scores
    plain = make_tiny_checkpoint(tmp_path / "plain.pt", model=model)
    argv = [*map(str, images), "--no-images", "--device", "cpu"]
    assert main(["detect", "--checkpoint", str(plain), *argv, "--out", str(tmp_path / "all")]) == 0
    every = json.loads((tmp_path / "all" / "coco_results.json").read_text())
    # thresholds between the scores each class got, stored as a training run stores them
    thresholds = {cid: float(np.median([r["score"] for r in every if r["category_id"] == cid]))
                  for cid in sorted({r["category_id"] for r in every})}
    assert len(thresholds) == 2
    record = {"best_thresholds": [{"category_id": cid, "threshold": t} for cid, t in thresholds.items()]}
    stored = make_tiny_checkpoint(tmp_path / "stored.pt", model=model, metrics={"epoch": 3, "AP": 0.1},
                                  evaluations=[{"epoch": 1}, {"epoch": 3, "diagnostics": record}])
    assert main(["detect", "--checkpoint", str(stored), *argv, "--out", str(tmp_path / "best"),
                 "--score-threshold", "best"]) == 0
    best = json.loads((tmp_path / "best" / "coco_results.json").read_text())
    expected = [r for r in every if r["score"] >= thresholds[r["category_id"]]]
    assert 0 < len(best) < len(every)
    assert sorted((r["image_id"], r["category_id"], r["score"]) for r in best) == \
        sorted((r["image_id"], r["category_id"], r["score"]) for r in expected)


def test_detect_score_threshold_best_without_stored_thresholds_is_one_line(tiny_checkpoint: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    rc = main(["detect", "--checkpoint", str(tiny_checkpoint), str(image), "--out", str(tmp_path / "o"),
               "--score-threshold", "best"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "F1-best score thresholds" in err[0] and "--score-threshold" in err[0], err


def test_evaluate_out_writes_the_report_and_refuses_to_overwrite(trained_run: tuple[Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data, run = trained_run
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--num-workers", "0"]
    assert main(argv) == 0
    for name in ("report.html", "report_epoch_0.html", "confusion_epoch_0.png", "metrics.json", "results.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    # the same model and data: the same confusion counts as the training run's evaluation
    assert (summary["evaluations"][-1]["diagnostics"]["confusion_matrix"]
            == trained["evaluations"][-1]["diagnostics"]["confusion_matrix"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "earlier evaluation" in err and "--overwrite" in err
    # replaced with --overwrite; the other backend, the same matching and counts
    assert main([*argv, "--overwrite", "--eval-backend", "pycocotools"]) == 0
    again = json.loads((out / "metrics.json").read_text())["evaluations"][-1]
    assert again["diagnostics"] == summary["evaluations"][-1]["diagnostics"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("eval") == 1  # the earlier evaluation's log was removed
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--out", str(run),
                 "--device", "cpu"]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert (run / "last.pt").is_file()  # the run folder was left as it was


def test_detector_refuses_thresholds_of_unknown_classes(tiny_model) -> None:
    from conftest import TINY_LABEL_MAP

    from ssd300.errors import UserInputError
    from ssd300.inference import Detector

    detector = Detector(tiny_model, TINY_LABEL_MAP, device="cpu", class_score_thresholds={1: 0.5, 2: 0.9})
    assert detector.class_score_thresholds == {1: 0.5, 2: 0.9}
    with pytest.raises(UserInputError, match=r"category ids \[7\] are not classes of the model \(1, 2\)"):
        Detector(tiny_model, TINY_LABEL_MAP, device="cpu", class_score_thresholds={7: 0.5})
