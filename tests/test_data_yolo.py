"""YOLO layout: class names (data.yaml list/dict, classes.txt), header sizes, both folder layouts, line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd300.data.coco import CocoDetection
from ssd300.data.layouts import detect_format, find_split, read_split
from ssd300.errors import UserInputError


def make_yolo(root: Path, images: dict[str, tuple[tuple[int, int], str | None]], split: str = "val",
              names: str = "names: [cat, dog]\n", roboflow: bool = False) -> Path:
    image_dir, label_dir = ((root / split / "images", root / split / "labels") if roboflow
                            else (root / "images" / split, root / "labels" / split))
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for name, (size, label) in images.items():
        Image.new("RGB", size, (80, 80, 80)).save(image_dir / name)
        if label is not None:
            (label_dir / (Path(name).stem + ".txt")).write_text(label)
    if names.startswith("names"):
        (root / "data.yaml").write_text(names)
    else:
        (root / "classes.txt").write_text(names)
    return root


IMAGES = {
    "b.png": ((200, 100), "1 0.5 0.5 0.25 0.5\n0 0.1 0.2 0.2 0.4\n"),
    "a.jpg": ((40, 80), "\n0 0.5 0.5 1 1\n"),
    "c.jpg": ((30, 30), None),          # no label file: no boxes
}


def test_reads_normalised_boxes_with_header_sizes(tmp_path):
    root = make_yolo(tmp_path / "y", IMAGES)
    assert detect_format(root) == "yolo"
    image_dir, parsed, source = read_split(root, "val")
    assert image_dir == root / "images" / "val" and source.annotations == root / "labels" / "val"
    assert parsed.categories == ((1, "cat"), (2, "dog"))
    assert parsed.image_ids.tolist() == [1, 2, 3]   # file-name order a, b, c
    names = [parsed.name_bytes[a:b].tobytes().decode() for a, b in zip(parsed.name_offsets[:-1],
                                                                         parsed.name_offsets[1:])]
    assert names == ["a.jpg", "b.png", "c.jpg"]
    assert parsed.sizes.tolist() == [[40, 80], [200, 100], [30, 30]]
    assert parsed.box_offsets.tolist() == [0, 1, 3, 3]
    np.testing.assert_allclose(parsed.boxes, [[0, 0, 40, 80], [75, 25, 125, 75], [0, 0, 40, 40]], atol=1e-5)
    assert parsed.category_ids.tolist() == [1, 2, 1] and parsed.difficult is None


@pytest.mark.parametrize("names", ["names: {0: cat, 1: dog}\n", "cat\ndog\n"], ids=["yaml-dict", "classes.txt"])
def test_class_names_from_yaml_dict_or_classes_txt(tmp_path, names):
    root = make_yolo(tmp_path / "y", IMAGES, names=names)
    assert read_split(root, "val").annotations.categories == ((1, "cat"), (2, "dog"))


def test_roboflow_layout_with_valid_split_trains(tmp_path):
    root = make_yolo(tmp_path / "y", {"000012.jpg": ((64, 64), "0 0.5 0.5 0.5 0.5\n")}, split="valid",
                     roboflow=True)
    source = find_split(root, "val")
    assert (source.format, source.image_dir) == ("yolo", root / "valid" / "images")
    dataset = CocoDetection.from_root(root, "val", train=True)
    assert len(dataset) == 1 and dataset.index.image_id(0) == 12   # numeric stems are the image ids


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.2", "expected 5 values 'class cx cy w h', got 4"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.1", "got 8 (a segmentation label? only boxes are read)"),
    ("2 0.5 0.5 0.2 0.2", "class 2 is not a class index of data.yaml (0..1)"),
    ("0.5 0.5 0.5 0.2 0.2", "class 0.5 is not a class index"),
    ("0 12 40 30 30", "coordinates must be normalised to [0, 1]"),
    ("0 0.5 0.5 -0.2 0.2", "negative width or height"),
    ("0 0.5 nan 0.2 0.2", "coordinates must be finite numbers"),
    ("a b c d e", "not numbers"),
])
def test_a_bad_line_is_named_file_and_line(tmp_path, line, problem):
    root = make_yolo(tmp_path / "y", {"x.jpg": ((20, 20), f"0 0.5 0.5 0.1 0.1\n\n{line}\n")})
    with pytest.raises(UserInputError) as caught:
        read_split(root, "val")
    assert str(caught.value).startswith(f"{root / 'labels' / 'val' / 'x.txt'}:3: ")
    assert problem in str(caught.value)


def test_missing_names_and_bad_yaml(tmp_path):
    root = make_yolo(tmp_path / "y", IMAGES)
    (root / "data.yaml").write_text("nc: 2\n")
    with pytest.raises(UserInputError, match="data.yaml: needs 'names'"):
        read_split(root, "val")
    (root / "data.yaml").write_text("names: {0: cat, 2: dog}\n")
    with pytest.raises(UserInputError, match=r"'names' keys must be the class indices 0..1"):
        read_split(root, "val")
    (root / "data.yaml").write_text("names: [cat, dog]\nnc: 3\n")
    with pytest.raises(UserInputError, match="'nc' is 3 but 'names' has 2 classes"):
        read_split(root, "val")
    (root / "data.yaml").unlink()
    with pytest.raises(UserInputError, match="needs data.yaml .'names'. or classes.txt"):
        read_split(root, "val")
    with pytest.raises(UserInputError, match=r"no labels folder for split 'train' \(expected labels/train or "):
        find_split(root, "train")
