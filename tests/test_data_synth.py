"""The built-in synthetic dataset: real COCO format, deterministic, knobs respected, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssd300.cli import main
from ssd300.commands.options import cli_message
from ssd300.data.synth import SHAPES, SynthConfig, generate_synthetic_dataset, render_image
from ssd300.errors import UserInputError


def test_written_dataset_loads_in_pycocotools_and_boxes_fit_images(tmp_path):
    from pycocotools.coco import COCO

    root = generate_synthetic_dataset(tmp_path / "d", num_train=12, num_val=5, seed=1)
    for split, count in (("train", 12), ("val", 5)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [s[0] for s in SHAPES[:5]]
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(root / split / image["file_name"]) as pil:
                assert pil.format == "JPEG" and pil.size == (image["width"], image["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert 1 <= len(anns) <= 4
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
                assert w >= 8 and h >= 8 and ann["iscrowd"] == 0


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", 4, 2, seed=7)
    b = generate_synthetic_dataset(tmp_path / "b", 4, 2, seed=7)
    c = generate_synthetic_dataset(tmp_path / "c", 4, 2, seed=8)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000003.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train/000003.jpg").read_bytes() != (c / "train/000003.jpg").read_bytes()
    # the train and val splits are different images
    assert (a / "train/000001.jpg").read_bytes() != (a / "val/000001.jpg").read_bytes()


def test_existing_identical_split_is_kept_and_changed_knobs_rewrite_only_with_overwrite(tmp_path):
    root = generate_synthetic_dataset(tmp_path, 3, 1, seed=0)
    target = root / "annotations" / "instances_train.json"
    stamp = target.stat().st_mtime_ns
    generate_synthetic_dataset(tmp_path, 3, 1, seed=0)
    assert target.stat().st_mtime_ns == stamp
    with pytest.raises(UserInputError, match="is not empty") as caught:
        generate_synthetic_dataset(tmp_path, 3, 1, seed=0, num_classes=3)
    assert str(caught.value) == (f"out_dir {tmp_path} is not empty (it holds a different dataset); pass overwrite "
                                 "to write the synthetic dataset into it anyway, or pick an empty folder")
    assert cli_message(caught.value) == (f"--out {tmp_path} is not empty (it holds a different dataset); pass "
                                         "--overwrite to write the synthetic dataset into it anyway, or pick an "
                                         "empty folder")
    assert target.stat().st_mtime_ns == stamp
    generate_synthetic_dataset(tmp_path, 3, 1, seed=0, num_classes=3, overwrite=True)
    assert len(json.loads(target.read_text())["categories"]) == 3


def test_drawn_objects_sit_under_their_boxes():
    """Solid shapes (disc, rectangle, cross, diamond, star) cover their box centre with one colour."""
    config = SynthConfig(num_classes=7, random_color_prob=0.0, max_covered=0.0)
    checked = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        image, objects = render_image(rng, config)
        pixels = np.asarray(image).astype(int)
        for (x, y, w, h), category in objects:
            name = SHAPES[category - 1][0]
            if name in ("ring", "triangle"):
                continue  # hollow centre / off-centre apex
            cx, cy = int(x + w / 2), int(y + h / 2)
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
            assert np.ptp(patch, axis=0).max() == 0, (seed, name)  # flat fill, not background noise
            checked += 1
    assert checked > 20


def test_knobs_are_respected():
    config = SynthConfig(num_classes=2, min_objects=3, max_objects=3, min_size=0.3, max_size=0.4, max_covered=1.0)
    for seed in range(10):
        image, objects = render_image(np.random.default_rng(seed), config)
        assert len(objects) == 3
        shorter = min(image.size)
        for (_, _, w, h), category in objects:
            assert category in (1, 2)
            assert 0.3 * shorter - 2 <= max(w, h) <= 0.4 * shorter + 2


def test_bad_knobs_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="^num_classes must be between 1 and 7, got 0$") as caught:
        generate_synthetic_dataset(tmp_path, 1, 1, num_classes=0)
    assert cli_message(caught.value) == "--classes must be between 1 and 7, got 0"
    with pytest.raises(UserInputError, match="objects per image") as caught:
        generate_synthetic_dataset(tmp_path, 1, 1, min_objects=3, max_objects=2)
    assert cli_message(caught.value) == "objects per image: need 1 <= --min-objects (3) <= --max-objects (2)"
    with pytest.raises(UserInputError, match="^image counts must be >= 0, got num_train -1, num_val 1$") as caught:
        generate_synthetic_dataset(tmp_path, -1, 1)
    assert cli_message(caught.value) == "image counts must be >= 0, got --train -1, --val 1"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserInputError, match="^out_dir .*a_file: exists and is not a folder$") as caught:
        generate_synthetic_dataset(tmp_path / "a_file", 1, 1)
    assert cli_message(caught.value) == f"--out {tmp_path / 'a_file'}: exists and is not a folder"
    with pytest.raises(TypeError):
        generate_synthetic_dataset(tmp_path, 1, 1, colour="red")


def test_cli_writes_a_dataset_and_reports_bad_flags(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--seed", "4",
                 "--classes", "4", "--max-objects", "2"]) == 0
    data = json.loads((tmp_path / "cli" / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 2 and len(data["categories"]) == 4
    assert "--data" in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path / "bad"), "--classes", "99"]) == 2
    assert capsys.readouterr().err == "ssd300 synth: error: --classes must be between 1 and 7, got 99\n"
    assert main(["synth", "--out", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--seed", "5"]) == 2
    assert capsys.readouterr().err.startswith(f"ssd300 synth: error: --out {tmp_path / 'cli'} is not empty")
