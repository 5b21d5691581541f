"""``ssd300 check-data`` / :func:`ssd300.data.check.check_dataset`: a crafted dataset with every fault
planted once is reported fault by fault; a clean synthetic dataset passes (exit 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ssd300.cli import main
from ssd300.data.check import DataReport, check_dataset, smallest_default_box
from ssd300.data.images import EXIF_ORIENTATION_TAG
from ssd300.default_boxes import DefaultBoxesConfig

W, H = 64, 48


def _image(path: Path, seed: int, size: tuple[int, int] = (W, H), orientation: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if orientation:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        image.save(path, "JPEG", exif=exif.tobytes())
    else:
        image.save(path, "JPEG")


def _coco(images: list[tuple[str, int, int]], boxes: list[tuple[int, list[float], int]],
          categories: list[tuple[int, str]]) -> dict[str, Any]:
    return {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(images)],
            "annotations": [{"id": k + 1, "image_id": i, "bbox": b, "category_id": c, "iscrowd": 0}
                            for k, (i, b, c) in enumerate(boxes)],
            "categories": [{"id": c, "name": n} for c, n in categories]}


# Every fault, planted once (the findings each produces, with its count):
PLANTED = {
    ("images_without_boxes", "train"): 1,        # b.jpg: no annotation
    ("duplicate_images", None): 1,               # c.jpg: a byte copy of a.jpg
    ("boxes_outside_image", "train"): 1,         # d.jpg: x + w = 80 on a 64 px wide image
    ("degenerate_boxes", "train"): 1,            # e.jpg: a box 0 px wide
    ("exif_rotated_size_mismatch", "train"): 1,  # f.jpg: stored 64x48, EXIF orientation 6, json 48x64
    ("size_mismatch", "train"): 1,               # h.jpg: json says 70 px wide
    ("unreadable_images", "train"): 1,           # i.jpg: not an image
    ("missing_images", "train"): 1,              # g.jpg: listed, not on disk
    ("empty_classes", "train"): 1,               # category 3 "unused": no box anywhere (error in train ...
    ("empty_classes", "val"): 1,                 # ... and a warning in val)
    ("class_mismatch", None): 2,                 # val calls category 2 "rect": (2, rectangle) / (2, rect)
    ("split_overlap", None): 1,                  # val/v1.jpg: a byte copy of train/d.jpg
    ("split_overlap_names", None): 1,            # a.jpg in train and in val, different pictures
}


def make_bad_dataset(root: Path) -> Path:
    train, val = root / "train", root / "val"
    train.mkdir(parents=True)
    val.mkdir()
    (root / "annotations").mkdir()
    for seed, name in enumerate("abdefh"):
        _image(train / f"{name}.jpg", seed)
    _image(train / "f.jpg", 10, orientation=6)
    _image(train / "b.jpg", 11)
    shutil.copyfile(train / "a.jpg", train / "c.jpg")
    (train / "i.jpg").write_bytes(b"not a jpeg at all")
    categories = [(1, "disc"), (2, "rectangle"), (3, "unused")]
    images = [("a.jpg", W, H), ("b.jpg", W, H), ("c.jpg", W, H), ("d.jpg", W, H), ("e.jpg", W, H),
              ("f.jpg", H, W), ("g.jpg", W, H), ("h.jpg", 70, H), ("i.jpg", W, H)]
    boxes = [(1, [10, 10, 20, 20], 1), (1, [40, 30, 2, 2], 2),      # a: a 2x2 px box (small, not a fault)
             (3, [5, 5, 30, 30], 2), (4, [50, 10, 30, 20], 1), (5, [10, 10, 0, 20], 1), (6, [5, 5, 20, 20], 1),
             (7, [5, 5, 20, 20], 2), (8, [5, 5, 20, 20], 1), (9, [5, 5, 20, 20], 2)]
    (root / "annotations" / "instances_train.json").write_text(json.dumps(_coco(images, boxes, categories)))
    _image(val / "a.jpg", 20)
    shutil.copyfile(train / "d.jpg", val / "v1.jpg")
    _image(val / "v2.jpg", 21)
    val_categories = [(1, "disc"), (2, "rect"), (3, "unused")]
    val_boxes = [(1, [10, 10, 20, 20], 1), (2, [10, 10, 20, 20], 2), (3, [10, 10, 20, 20], 1)]
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps(_coco([("a.jpg", W, H), ("v1.jpg", W, H), ("v2.jpg", W, H)], val_boxes, val_categories)))
    return root


def _found(report: DataReport) -> dict[tuple[str, Any], int]:
    found = {}
    for f in report.findings:
        split = next((s for s in ("train", "val") if f.message.startswith(f"{s}: ")), None)
        found[(f.kind, split)] = f.count
    return found


def test_every_planted_fault_is_found(tmp_path: Path) -> None:
    report = check_dataset(make_bad_dataset(tmp_path / "bad"))
    assert _found(report) == PLANTED
    by_kind = {f.kind: f for f in report.findings}
    assert "c.jpg" in by_kind["duplicate_images"].examples[0] and "a.jpg" in by_kind["duplicate_images"].examples[0]
    assert "d.jpg" in by_kind["boxes_outside_image"].examples[0]
    assert "e.jpg" in by_kind["degenerate_boxes"].examples[0]
    assert "f.jpg" in by_kind["exif_rotated_size_mismatch"].examples[0]
    assert "EXIF orientation 6" in by_kind["exif_rotated_size_mismatch"].examples[0]
    assert "h.jpg" in by_kind["size_mismatch"].examples[0] and "i.jpg" in by_kind["unreadable_images"].examples[0]
    assert by_kind["missing_images"].examples == [str(tmp_path / "bad" / "train" / "g.jpg")]
    assert "unused" in by_kind["empty_classes"].message
    assert "v1.jpg" in by_kind["split_overlap"].examples[0] and by_kind["split_overlap_names"].examples == ["a.jpg"]
    mismatch = by_kind["class_mismatch"].message
    assert "only in train: rectangle (id 2)" in mismatch and "only in val: rect (id 2)" in mismatch
    train = report.splits[0]
    assert (train.images, train.boxes, train.images_without_boxes) == (9, 9, 1)
    assert train.class_boxes == {"disc": 5, "rectangle": 4, "unused": 0}
    assert train.class_images == {"disc": 5, "rectangle": 4, "unused": 0}
    # below the smallest default box at 300x300: the 2x2 box (9.4 x 12.5 px) and the 0 px wide one
    assert train.below_smallest_default == 2 and sum(train.size_counts) == 9
    assert report.exit_status() == 1


def test_smallest_default_box_comes_from_the_geometry() -> None:
    config = DefaultBoxesConfig()
    assert smallest_default_box() == pytest.approx(config.scales[0] / config.figure_size * 300, rel=1e-6)


def test_cli_bad_dataset_exits_1_with_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_bad_dataset(tmp_path / "bad")
    assert main(["check-data", str(root), "--header-checks", "0"]) == 1
    out = capsys.readouterr().out
    assert "duplicate_images" in out and "exif_rotated_size_mismatch" not in out   # headers not read
    assert main(["check-data", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exit_status"] == 1 and {f["kind"] for f in data["findings"]} == {k for k, _ in PLANTED}


def test_clean_synthetic_dataset_exits_0(synthetic_dataset: Any, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = synthetic_dataset(6, 3, num_classes=2, min_width=64, max_width=96, min_height=64, max_height=96)
    out = tmp_path / "report"
    assert main(["check-data", str(root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OK: 0 problems" in text and "disc" in text
    saved = json.loads((out / "check-data.json").read_text())
    # the generator numbers files per split: the same names in train/ and val/ are only a warning
    assert [f["kind"] for f in saved["findings"]] == ["split_overlap_names"]
    assert (out / "check-data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["check-data", str(root), "--strict"]) == 1


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["check-data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no known dataset layout" in err and "empty" in err
    assert main(["check-data", str(tmp_path / "empty"), "--data-format", "coco"]) == 2
    assert "no split of train, val found in its coco layout" in capsys.readouterr().err


def _small_coco(root: Path) -> Path:
    """train: a.jpg, b.jpg (a box past the right edge), c.jpg (a box 0 px wide), d.jpg (a copy of a.jpg)."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    for seed, name in enumerate("abc"):
        _image(root / "train" / f"{name}.jpg", seed)
    shutil.copyfile(root / "train" / "a.jpg", root / "train" / "d.jpg")
    boxes = [(1, [10, 10, 20, 20], 1), (2, [50, 10, 30, 20], 2), (3, [10, 10, 0, 20], 1), (4, [5, 5, 20, 20], 2)]
    annotation_file = root / "annotations" / "instances_train.json"
    annotation_file.write_text(json.dumps(_coco([(f"{n}.jpg", W, H) for n in "abcd"], boxes,
                                                [(1, "disc"), (2, "rectangle")])))
    return annotation_file


def test_voc_layout_faults_are_found_as_in_coco(tmp_path: Path) -> None:
    from ssd300.data.convert import coco_to_voc

    annotation_file = _small_coco(tmp_path / "coco")
    coco_to_voc(annotation_file, tmp_path / "coco" / "train", tmp_path / "voc", "train", images="copy")
    expected = {("boxes_outside_image", "train"): 1, ("degenerate_boxes", "train"): 1, ("duplicate_images", None): 1}
    coco, voc = check_dataset(tmp_path / "coco"), check_dataset(tmp_path / "voc")
    assert _found(coco) == expected and _found(voc) == expected
    assert voc.data_format == "voc" and voc.splits[0].class_boxes == coco.splits[0].class_boxes == {"disc": 2,
                                                                                                 "rectangle": 2}
    outside = next(f for f in voc.findings if f.kind == "boxes_outside_image")
    assert outside.examples == [f"{tmp_path / 'voc' / 'Annotations' / 'b.xml'}: box [50.0, 10.0, 80.0, 30.0] (ltrb) "
                                "outside 64x48"]


def test_yolo_coordinates_outside_the_image_are_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssd300.data.convert import coco_to_yolo

    annotation_file = _small_coco(tmp_path / "coco")
    data = json.loads(annotation_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]   # YOLO cannot hold a 0 px box
    annotation_file.write_text(json.dumps(data))
    coco_to_yolo(annotation_file, tmp_path / "coco" / "train", tmp_path / "yolo", "train", images="copy")
    assert main(["check-data", str(tmp_path / "yolo")]) == 2   # the reader refuses values past 1, naming file:line
    assert f"{tmp_path / 'yolo' / 'labels' / 'train' / 'b.txt'}:1" in capsys.readouterr().err
    (tmp_path / "yolo" / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 0.25 0.25\n")
    report = check_dataset(tmp_path / "yolo")
    assert report.data_format == "yolo"
    assert _found(report) == {("duplicate_images", None): 1, ("images_without_boxes", "train"): 1}   # c.jpg
    assert report.splits[0].class_boxes == {"disc": 1, "rectangle": 2}
