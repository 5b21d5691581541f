"""Data the annotation file gets wrong: image sizes that contradict the json (EXIF-rotated phone
photos, labelling tools' wrong sizes) and background categories (labelme's ``_background_``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.data.coco import SIZE_MISMATCH, CocoDetection, skipped_summary
from ssd300.data.images import exif_orientation
from ssd300.data.loaders import collate
from ssd300.errors import UserInputError
from ssd300.inference import load_rgb
from ssd300.labels import LabelMap, category_mismatch, is_background_category

ORIENTATION = 0x0112


def _save_jpeg(path: Path, width: int, height: int, orientation: int | None = None) -> None:
    """A JPEG stored ``width`` x ``height``: left half red, right half blue (orientation visible)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (220, 30, 30)
    pixels[:, width // 2:] = (30, 30, 220)
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())


def _dataset(root: Path, images: list[tuple[str, int, int]], categories=((1, "a"),), annotations=None) -> Path:
    """An annotation file listing ``(file name, json width, json height)``; one box per image."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(images)]
    if annotations is None:
        annotations = [{"id": i + 1, "image_id": i + 1, "category_id": categories[-1][0], "bbox": [2, 2, 20, 16]}
                       for i in range(len(images))]
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": c, "name": n} for c, n in categories]}))
    return path


def _phone_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """ok.jpg: 60x40 as the json says; phone.jpg: stored 60x40 with EXIF orientation 6 (displayed
    40x60) and the json giving the displayed 40x60; tool.jpg: the json's size is just wrong."""
    images = tmp_path / "images"
    images.mkdir()
    _save_jpeg(images / "ok.jpg", 60, 40)
    _save_jpeg(images / "phone.jpg", 60, 40, orientation=6)
    _save_jpeg(images / "tool.jpg", 60, 40)
    annotations = _dataset(tmp_path, [("ok.jpg", 60, 40), ("phone.jpg", 40, 60), ("tool.jpg", 64, 48)])
    return images, annotations


def test_generated_jpeg_carries_its_exif_orientation(tmp_path):
    _save_jpeg(tmp_path / "x.jpg", 60, 40, orientation=6)
    with Image.open(tmp_path / "x.jpg") as image:
        assert exif_orientation(image) == 6 and image.size == (60, 40)


@pytest.mark.parametrize("train", [True, False])
def test_images_whose_size_contradicts_the_json_are_skipped_and_reported(tmp_path, caplog, train):
    images, annotations = _phone_dataset(tmp_path)
    dataset = CocoDetection(images, annotations, train=train, seed=0)
    caplog.set_level(logging.WARNING, logger="ssd300.data.coco")
    samples = [dataset[(i, 0)] for i in range(len(dataset))]
    batch = collate(samples)
    reasons = batch.skipped
    if train:  # the next image replaces a skipped one: every sample is ok.jpg's, never a misaligned one
        assert batch.image_ids.tolist() == [1, 1, 1]
    else:      # evaluation drops them (and evaluates the rest)
        assert batch.image_ids.tolist() == [1]
    phone = [r for r in reasons if "phone.jpg" in r]
    tool = [r for r in reasons if "tool.jpg" in r]
    assert phone and tool and all(SIZE_MISMATCH in r for r in reasons)
    assert "60x40" in phone[0] and "(40x60)" in phone[0] and "EXIF orientation 6" in phone[0]
    assert "EXIF" not in tool[0] and "(64x48)" in tool[0]
    assert any("skipping image" in m and "phone.jpg" in m for m in caplog.messages)


def test_size_mismatch_is_fatal_in_strict_mode(tmp_path):
    images, annotations = _phone_dataset(tmp_path)
    dataset = CocoDetection(images, annotations, train=True, seed=0, strict=True)
    assert dataset[(0, 0)].image_id == 1
    fatal = r"phone\.jpg: decoded size 60x40 .*EXIF orientation 6.*\(fatal in strict mode\)$"
    with pytest.raises(UserInputError, match=fatal):
        dataset[(1, 0)]


def test_epoch_summary_counts_size_mismatches(tmp_path):
    images, annotations = _phone_dataset(tmp_path)
    dataset = CocoDetection(images, annotations, train=False)
    reasons = collate([dataset[(i, 0)] for i in range(3)]).skipped + [f"{images}/gone.jpg: missing"]
    line = skipped_summary(reasons)
    assert line.startswith("3 images skipped (2 not the size the annotation file gives)") and "phone.jpg" in line


def test_detect_applies_exif_orientation(tmp_path):
    _save_jpeg(tmp_path / "phone.jpg", 60, 40, orientation=6)  # stored landscape, displayed portrait
    image = load_rgb(tmp_path / "phone.jpg", draft=False)
    assert image.size == (40, 60) and image.info["original_size"] == (40, 60)
    pixels = np.asarray(image)
    # orientation 6: the viewer turns the picture 90 degrees clockwise, so the stored left half (red)
    # ends up on top
    assert pixels[5, 20, 0] > 150 and pixels[5, 20, 2] < 100
    assert pixels[55, 20, 2] > 150 and pixels[55, 20, 0] < 100
    drafted = load_rgb(tmp_path / "phone.jpg", draft=True)
    assert drafted.info["original_size"] == (40, 60)


def test_detector_reports_boxes_in_the_upright_picture(tmp_path):
    from ssd300.inference import Detector
    from ssd300.model import SSD300

    _save_jpeg(tmp_path / "phone.jpg", 60, 40, orientation=6)
    torch.manual_seed(0)
    detector = Detector(SSD300("resnet18", num_classes=2), LabelMap.from_categories([(1, "a")]), device="cpu",
                        score_threshold=0.0)
    result = detector(str(tmp_path / "phone.jpg"))
    assert result.image_size == (40, 60)
    assert float(result.boxes[:, 0::2].max()) <= 40 and float(result.boxes[:, 1::2].max()) <= 60


# ------------------------------------------------------------------ background categories


@pytest.mark.parametrize("category", [(0, "_background_"), (0, "anything"), (5, "Background"), (7, "__background__")])
def test_background_category_names_and_id_zero(category):
    assert is_background_category(*category)


def test_ordinary_categories_are_not_background():
    assert not is_background_category(1, "person") and not is_background_category(3, "background_noise")


def test_labelme_background_category_is_not_an_object_class(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        _save_jpeg(images / name, 60, 40)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 16]},
            {"id": 2, "image_id": 1, "category_id": 0, "bbox": [0, 0, 60, 40]},   # background "object"
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 5, 30, 30]}]
    annotations = _dataset(tmp_path, [("a.jpg", 60, 40), ("b.jpg", 60, 40)],
                           categories=((0, "_background_"), (1, "cat"), (2, "dog")), annotations=anns)
    caplog.set_level(logging.WARNING, logger="ssd300.data.coco")
    dataset = CocoDetection(images, annotations, train=True)
    assert dataset.label_map.names == ("background", "cat", "dog")
    assert dataset.label_map.category_ids == (0, 1, 2)
    assert dataset.stats.background_boxes == 1
    assert [r.labels.tolist() for r in dataset.records] == [[1], [2]]
    note = [m for m in caplog.messages if "treated as" in m]
    assert len(note) == 1 and "category 0 '_background_' is treated as the background" in note[0]
    assert "1 of its annotations dropped" in note[0]
    assert "1 background-category boxes" in dataset.stats.summary()


def test_only_background_categories_is_a_clear_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _save_jpeg(images / "a.jpg", 60, 40)
    annotations = _dataset(tmp_path, [("a.jpg", 60, 40)], categories=((0, "_background_"),))
    with pytest.raises(UserInputError, match=r"instances\.json: no object categories"):
        CocoDetection(images, annotations, train=False)


# ------------------------------------------------------------------ label map comparisons


def test_category_mismatch_names_the_first_difference():
    model = LabelMap.from_categories([(1, "cat"), (2, "dog"), (3, "emu")])
    assert category_mismatch(model, model) is None
    assert category_mismatch(model, LabelMap.from_categories([(1, "Cat"), (2, "dog"), (3, "emu")])) is None
    renamed = LabelMap.from_categories([(1, "cat"), (2, "wolf"), (3, "emu")])
    assert category_mismatch(model, renamed) == "category id 2 is 'dog' in the checkpoint but 'wolf' in the dataset"
    extra = LabelMap.from_categories([(1, "cat"), (9, "yak")])
    assert category_mismatch(model, extra, subset_ok=True) == \
        "category id 9 ('yak') of the dataset is not in the checkpoint"
    subset = LabelMap.from_categories([(3, "emu")])
    assert category_mismatch(model, subset, subset_ok=True) is None
    assert "category id 1 ('cat') of the checkpoint is not in the dataset" == category_mismatch(model, subset)
    shuffled = LabelMap.from_categories([(2, "dog"), (1, "cat"), (3, "emu")])
    assert "another order" in category_mismatch(model, shuffled)
