"""ssd300 convert (VOC/YOLO/LabelMe -> COCO, COCO -> YOLO/VOC): lossless round trips; and the three layouts
of one synthetic dataset giving the same ground truth, training and the same 12 COCO numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.cli import main
from ssd300.coco_eval import evaluate_results
from ssd300.data.annotations import read_annotation_file
from ssd300.data.convert import coco_to_voc, coco_to_yolo, labelme_to_coco, split_to_coco
from ssd300.data.layouts import find_split, load_ground_truth, read_split
from ssd300.errors import UserInputError

FLOAT_BOXES = [[10.123456789, 5.5, 20.25, 7.1], [0.0, 0.0, 63.0, 47.0], [33.3333333, 12.1, 0.7, 30.000001]]


def _coco(root: Path, split: str = "train", boxes=FLOAT_BOXES, crowd_last: bool = False) -> Path:
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    for name, size in (("000005.jpg", (64, 48)), ("000009.jpg", (50, 40))):
        Image.new("RGB", size, (70, 70, 70)).save(root / split / name)
    anns = [{"id": k + 1, "image_id": 5 if k < 2 else 9, "category_id": 7 if k % 2 else 3, "bbox": b,
             "iscrowd": int(crowd_last and k == len(boxes) - 1)} for k, b in enumerate(boxes)]
    data = {"images": [{"id": 5, "file_name": "000005.jpg", "width": 64, "height": 48},
                       {"id": 9, "file_name": "000009.jpg", "width": 50, "height": 40}],
            "annotations": anns, "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def _by_image(data: dict) -> dict:
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {i["id"]: (i["file_name"], i["width"], i["height"]) for i in data["images"]}
    out: dict = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"], a.get("iscrowd", 0)))
    return out


def test_coco_to_yolo_to_coco_is_equal(tmp_path):
    original = _coco(tmp_path / "coco")
    report = coco_to_yolo(original, tmp_path / "coco" / "train", tmp_path / "yolo", "train")
    assert (report.images, report.boxes, report.categories) == (2, 3, 2)
    assert (tmp_path / "yolo" / "images" / "train" / "000005.jpg").is_file()
    back = split_to_coco(tmp_path / "yolo", "train", tmp_path / "back.json")
    assert back.output == tmp_path / "back.json"
    a, b = read_annotation_file(original), read_annotation_file(tmp_path / "back.json")
    assert [c["name"] for c in b["categories"]] == ["cat", "dog"]
    assert [i["id"] for i in b["images"]] == [5, 9]                 # numeric file stems keep the ids
    before, after = _by_image(a), _by_image(b)
    assert before.keys() == after.keys()
    for key in before:
        assert [(n, c) for n, _, c in before[key]] == [(n, c) for n, _, c in after[key]]
        np.testing.assert_allclose([x for _, x, _ in after[key]], [x for _, x, _ in before[key]], rtol=1e-6,
                                   atol=1e-9)


def test_crowd_regions_dropped_for_yolo_and_difficult_for_voc(tmp_path):
    original = _coco(tmp_path / "coco", crowd_last=True)
    report = coco_to_yolo(original, tmp_path / "coco" / "train", tmp_path / "yolo", "train", images="none")
    assert report.boxes == 2 and report.notes == ["1 crowd regions dropped (YOLO has no ignore regions)"]
    assert not (tmp_path / "yolo" / "images").exists()
    report = coco_to_voc(original, tmp_path / "coco" / "train", tmp_path / "voc", "train")
    assert report.notes == ["1 crowd regions written as difficult objects"]
    assert read_split(tmp_path / "voc", "train").annotations.difficult.tolist() == [False, False, True]


def test_voc_to_coco_keeps_the_xml_boxes(tmp_path):
    original = _coco(tmp_path / "coco", boxes=[[10.5, 5, 20.25, 7], [0, 0, 63, 47], [1.25, 2.5, 3, 4]])
    coco_to_voc(original, tmp_path / "coco" / "train", tmp_path / "voc", "train")
    xml = (tmp_path / "voc" / "Annotations" / "000005.xml").read_text()
    assert "<xmin>10.5</xmin><ymin>5</ymin><xmax>30.75</xmax><ymax>12</ymax>" in xml
    assert (tmp_path / "voc" / "labels.txt").read_text() == "cat\ndog\n"
    main_rc = main(["convert", "--from", "voc", "--to", "coco", "--data", str(tmp_path / "voc"), "--split", "train",
                    "--out", str(tmp_path / "voc.json")])
    assert main_rc == 0
    back = read_annotation_file(tmp_path / "voc.json")
    assert [a["bbox"] for a in back["annotations"]] == [[10.5, 5, 20.25, 7], [0, 0, 63, 47], [1.25, 2.5, 3, 4]]
    assert _by_image(back) == _by_image(read_annotation_file(original))


def test_labelme_to_coco(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    shapes = [{"label": "cat", "points": [[30.5, 20], [10, 5.25]], "shape_type": "rectangle"},
              {"label": "dog", "points": [[1, 1], [9, 2], [4, 8]], "shape_type": "polygon"},
              {"label": "dog", "points": [[5, 5]], "shape_type": "point"}]
    (folder / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "imageWidth": 40, "imageHeight": 30,
                                               "shapes": shapes}))
    report = labelme_to_coco(folder, tmp_path / "lm.json")
    assert report.notes == ["1 shapes that are not boxes, polygons or circles skipped"]
    data = read_annotation_file(tmp_path / "lm.json")
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert [a["bbox"] for a in data["annotations"]] == [[10.0, 5.25, 20.5, 14.75], [1.0, 1.0, 8.0, 7.0]]
    (folder / "b.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"b.json: not a LabelMe annotation"):
        labelme_to_coco(folder, tmp_path / "lm2.json")


def test_outputs_checked_first_and_never_overwritten(tmp_path, capsys):
    original = _coco(tmp_path / "coco")
    coco_to_yolo(original, tmp_path / "coco" / "train", tmp_path / "yolo", "train")
    with pytest.raises(UserInputError, match="exists .give overwrite") as caught:
        coco_to_yolo(original, tmp_path / "coco" / "train", tmp_path / "yolo", "train")
    assert caught.value.fields == ("output", "overwrite")
    coco_to_yolo(original, tmp_path / "coco" / "train", tmp_path / "yolo", "train", overwrite=True)
    (tmp_path / "x.json").write_text("keep")
    assert main(["convert", "--from", "yolo", "--to", "coco", "--data", str(tmp_path / "yolo"), "--split", "train",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"ssd300 convert: error: --out {tmp_path / 'x.json'}: exists "
                                               "(give --overwrite to replace it)")
    assert (tmp_path / "x.json").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        coco_to_voc(original, tmp_path / "coco" / "train", tmp_path / "file" / "voc", "train")
    assert main(["convert", "--from", "voc", "--to", "yolo", "--data", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "convert to COCO first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one dataset, three layouts


@pytest.fixture(scope="module")
def layouts(synthetic_dataset, tmp_path_factory) -> dict[str, Path]:
    coco = synthetic_dataset(num_train=4, num_val=4, seed=5, num_classes=2)
    out = tmp_path_factory.mktemp("layouts")
    for split in ("train", "val"):
        assert main(["convert", "--from", "coco", "--to", "yolo", "--data", str(coco), "--split", split,
                     "--out", str(out / "yolo")]) == 0
    assert main(["convert", "--from", "coco", "--to", "voc", "--data", str(coco), "--out", str(out / "voc"),
                 "--prefix", "{split}_"]) == 0
    return {"coco": coco, "voc": out / "voc", "yolo": out / "yolo"}


def test_three_layouts_give_the_same_index_and_metrics(layouts):
    parsed = {name: read_split(root, "val").annotations for name, root in layouts.items()}
    for name in ("voc", "yolo"):
        for field in ("categories", "image_ids", "sizes", "box_offsets", "category_ids"):
            assert np.array_equal(np.asarray(getattr(parsed[name], field)), np.asarray(getattr(parsed["coco"], field)),
                                  ), (name, field)
        np.testing.assert_array_equal(parsed[name].boxes, parsed["coco"].boxes)
    # crafted detections: every ground-truth box shifted a little, plus false positives
    gt = read_annotation_file(find_split(layouts["coco"], "val").annotations)
    rng = np.random.default_rng(0)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.uniform(0.3, 1)),
                "bbox": [v + float(rng.uniform(-4, 4)) for v in a["bbox"]]} for a in gt["annotations"]]
    results += [{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 30, 30]}]
    stats = {name: evaluate_results(load_ground_truth(find_split(root, "val").annotations), results).stats
             for name, root in layouts.items()}
    assert 0.2 < stats["coco"][0] < 1
    np.testing.assert_array_equal(stats["voc"], stats["coco"])
    np.testing.assert_array_equal(stats["yolo"], stats["coco"])


@pytest.mark.slow
def test_three_layouts_train_and_evaluate_alike(layouts, tmp_path):
    from ssd300.training import TrainConfig, run

    base = dict(backbone="resnet18", epochs=1, batch_size=2, eval_batch_size=2, seed=0, num_workers=0, amp=False,
                warmup=0, learning_rate=0.05, log_interval=1, progress=False, device="cpu")
    weights = {}
    for name, root in layouts.items():
        result = run(TrainConfig(data=root, save=tmp_path / name, evaluation=(), **base))
        assert len(result.loss_history) == 2
        weights[name] = torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)["model"]
    checkpoint = tmp_path / "coco" / "last.pt"
    metrics = {name: run(TrainConfig(mode="evaluation", checkpoint=checkpoint, data=root, **base)).metrics.stats
               for name, root in layouts.items()}
    np.testing.assert_array_equal(metrics["voc"], metrics["coco"])
    np.testing.assert_array_equal(metrics["yolo"], metrics["coco"])
    for name in ("voc", "yolo"):   # the same images, boxes and order: the same training
        assert all(torch.equal(weights[name][k], weights["coco"][k]) for k in weights["coco"]), name
