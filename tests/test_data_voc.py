"""Pascal VOC layout: reading, difficult boxes (training and evaluation), hardened XML, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd300.cli import main
from ssd300.coco_eval import evaluate_results
from ssd300.commands.train import add_arguments, config_from_args
from ssd300.data.coco import CocoDetection, resolve_split
from ssd300.data.layouts import detect_format, find_split, load_ground_truth, read_split, to_coco_dict
from ssd300.errors import UserInputError


def _xml(filename: str, size: tuple[int, int] | None, objects: list[tuple[str, tuple, int]]) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                   f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def make_voc(root: Path, images: dict[str, tuple[tuple[int, int], list]], split: str = "train",
             labels: list[str] | None = None, write_size: bool = True) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (size, objects) in images.items():
        Image.new("RGB", size, (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            _xml(f"{image_id}.jpg", size if write_size else None, objects))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    if labels is not None:
        (root / "labels.txt").write_text("".join(f"{n}\n" for n in labels))
    return root


IMAGES = {
    "img_a": ((64, 48), [("dog", (10, 5, 40.5, 30), 0), ("cat", (0, 0, 20, 20), 1)]),
    "img_b": ((50, 60), [("cat", (5, 6, 45, 59), 0)]),
    "img_c": ((40, 40), []),
}


def test_reads_boxes_classes_difficult_and_ids(tmp_path):
    root = make_voc(tmp_path / "voc", IMAGES)
    assert detect_format(root) == "voc"
    image_dir, parsed, source = read_split(root, "train")
    assert image_dir == root / "JPEGImages" and source.annotations == root / "ImageSets/Main/train.txt"
    assert parsed.categories == ((1, "cat"), (2, "dog"))       # no class list: sorted names, ids 1..K
    assert parsed.image_ids.tolist() == [1, 2, 3]               # non-numeric ids: 1..N in list order
    assert parsed.sizes.tolist() == [[64, 48], [50, 60], [40, 40]]
    assert parsed.box_offsets.tolist() == [0, 2, 3, 3]
    np.testing.assert_array_equal(parsed.boxes, [[10, 5, 40.5, 30], [0, 0, 20, 20], [5, 6, 45, 59]])
    assert parsed.category_ids.tolist() == [2, 1, 1]
    assert parsed.difficult.tolist() == [False, True, False]
    # a class list fixes the order; numeric ids are kept
    other = make_voc(tmp_path / "voc2", {"0007": IMAGES["img_a"], "0003": IMAGES["img_b"]},
                     labels=["dog", "cat", "bird"])
    parsed = read_split(other, "train").annotations
    assert parsed.categories == ((1, "dog"), (2, "cat"), (3, "bird"))
    assert parsed.image_ids.tolist() == [7, 3] and parsed.category_ids.tolist() == [1, 2, 2]


def test_size_from_the_image_header_when_the_xml_has_none(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": ((33, 21), [("x", (1, 1, 5, 5), 0)])}, write_size=False)
    assert read_split(root, "train").annotations.sizes.tolist() == [[33, 21]]


def test_difficult_boxes_left_out_of_training_unless_kept(tmp_path):
    root = make_voc(tmp_path / "voc", IMAGES)
    dataset = CocoDetection.from_root(root, "train")
    assert dataset.stats.difficult_boxes == 1 and "1 difficult boxes" in dataset.stats.summary()
    assert [len(dataset.index.targets(i)[0]) for i in range(len(dataset))] == [1, 1]   # img_c: no boxes
    kept = CocoDetection.from_root(root, "train", keep_difficult=True)
    assert kept.stats.difficult_boxes == 0
    assert [kept.index.targets(i)[1].tolist() for i in range(len(kept))] == [[2, 1], [1]]


def test_difficult_boxes_are_ignored_in_evaluation(tmp_path):
    """A detection on a difficult box is neither a true nor a false positive; missing it costs nothing."""
    root = make_voc(tmp_path / "voc", IMAGES)
    gt_dict = to_coco_dict(read_split(root, "train").annotations)
    assert [a["iscrowd"] for a in gt_dict["annotations"]] == [0, 1, 0]
    gt = load_ground_truth(find_split(root, "train").annotations, backend="pycocotools")
    hits = [{"image_id": 1, "category_id": 2, "bbox": [10, 5, 30.5, 25], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [5, 6, 40, 53], "score": 0.8}]
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.95}
    base = evaluate_results(gt, hits).stats
    assert base[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(evaluate_results(gt, [*hits, on_difficult]).stats, base)


def test_train_and_evaluate_flags(tmp_path):
    import argparse

    root = make_voc(tmp_path / "voc", IMAGES)
    make_voc(root, {"img_v": ((30, 30), [("cat", (1, 1, 9, 9), 0)])}, split="val")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--data", str(root), "--data-format", "voc", "--keep-difficult"]))
    assert config.data_format == "voc" and config.keep_difficult
    assert resolve_split(root, "val", "voc") == (root / "JPEGImages", root / "ImageSets/Main/val.txt")
    with pytest.raises(UserInputError, match="no annotation file for split 'train'"):
        resolve_split(root, "train", "coco")
    with pytest.raises(SystemExit) as exited:
        main(["train", "--data", str(root), "--data-format", "yaml"])
    assert exited.value.code == 2
    with pytest.raises(UserInputError, match="data_format must be one of auto, coco, voc, yolo, got 'yaml'"):
        config.replace(data_format="yaml")


@pytest.mark.parametrize("content, problem", [
    ("<annotation><object>", "not well-formed XML"),
    ("<foo/>", "not a VOC annotation (root element <foo>"),
    ("<annotation><size><width>10</width><height>10</height></size><object><name>a</name><bndbox><xmin>1</xmin>"
     "<ymin>x</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>",
     "object 1 (a): <bndbox>/<ymin> must be a number, got 'x'"),
    ("<annotation><size><width>10</width><height>10</height></size><object><name>a</name><bndbox><xmin>6</xmin>"
     "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>", "xmax/ymax below xmin/ymin"),
    ("<annotation><size><width>10</width><height>10</height></size><object><name>a</name></object></annotation>",
     "object 1 (a): missing <bndbox>"),
])
def test_bad_xml_is_one_line_naming_the_file(tmp_path, content, problem):
    root = make_voc(tmp_path / "voc", {"a": ((10, 10), [])})
    (root / "Annotations" / "a.xml").write_text(content)
    with pytest.raises(UserInputError) as caught:
        read_split(root, "train")
    message = str(caught.value)
    assert message.startswith(f"{root / 'Annotations' / 'a.xml'}: ") and problem in message and "\n" not in message


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>&xxe;</filename></annotation>"""


@pytest.mark.parametrize("content", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["billion-laughs", "external-entity"])
def test_entity_attacks_are_refused_in_one_line(tmp_path, content, capsys):
    root = make_voc(tmp_path / "voc", {"a": ((10, 10), [])})
    xml = root / "Annotations" / "a.xml"
    xml.write_text(content)
    with pytest.raises(UserInputError) as caught:
        read_split(root, "train")
    assert str(caught.value).startswith(f"{xml}: refused: the XML declares entities")
    assert main(["convert", "--from", "voc", "--to", "coco", "--data", str(root), "--split", "train",
                 "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ssd300 convert: error: {xml}: refused") and "\n" not in err
    assert not (tmp_path / "out.json").exists()


def test_listing_errors_name_the_list_and_line(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": ((10, 10), [])})
    (root / "ImageSets/Main/train.txt").write_text("a\n\nmissing\n")
    with pytest.raises(UserInputError, match=r"missing.xml: annotation file does not exist \(listed in .*txt:3\)"):
        read_split(root, "train")
    (root / "ImageSets/Main/train.txt").write_text("a\na\n")
    with pytest.raises(UserInputError, match=r"train.txt:2: image 'a' is listed twice"):
        read_split(root, "train")
    root2 = make_voc(tmp_path / "voc2", {"a": ((10, 10), [("zebra", (1, 1, 2, 2), 0)])}, labels=["cat"])
    with pytest.raises(UserInputError, match=r"labels.txt: does not list class 'zebra'"):
        read_split(root2, "train")
    with pytest.raises(UserInputError, match=r"no image-set list for split 'val' \(expected ImageSets/Main/val.txt\)"):
        find_split(root2, "val")


def test_int8_calibration_uses_the_training_list(tmp_path):
    from ssd300.quantize import calibration_files

    root = make_voc(tmp_path / "voc", IMAGES)
    make_voc(root, {"val_only": ((30, 30), [("cat", (1, 1, 9, 9), 0)])}, split="val")
    assert [p.name for p in calibration_files(root)] == ["img_a.jpg", "img_b.jpg", "img_c.jpg"]
