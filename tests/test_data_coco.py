"""COCO-format datasets: layout, validation messages, counted skips, image modes, real photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.cli import main
from ssd300.commands.options import cli_message
from ssd300.data.annotations import read_annotation_file
from ssd300.data.coco import CocoDetection, resolve_split
from ssd300.data.images import open_image, to_rgb
from ssd300.errors import UserInputError


def _write_dataset(root: Path, images: list[tuple[str, np.ndarray]], annotations: list[dict],
                   categories=((1, "a"), (2, "b")), split_dir="train", ann_name="instances_train.json") -> Path:
    (root / split_dir).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, array) in enumerate(images):
        Image.fromarray(array).save(root / split_dir / name)
        entries.append({"id": i + 1, "file_name": name, "width": array.shape[1], "height": array.shape[0]})
    data = {"images": entries, "annotations": annotations,
            "categories": [{"id": cid, "name": n} for cid, n in categories]}
    path = root / "annotations" / ann_name
    path.write_text(json.dumps(data))
    return path


def _ann(i, image_id, category_id, bbox, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def _grey(h=40, w=60):
    return np.full((h, w, 3), 100, dtype=np.uint8)


def test_resolve_split_supports_coco2017_and_synthetic_layouts(tmp_path):
    coco = tmp_path / "coco"
    _write_dataset(coco, [("1.jpg", _grey())], [], split_dir="val2017", ann_name="instances_val2017.json")
    assert resolve_split(coco, "val") == (coco / "val2017", coco / "annotations" / "instances_val2017.json")
    synth = tmp_path / "synth"
    _write_dataset(synth, [("1.jpg", _grey())], [])
    assert resolve_split(synth, "train") == (synth / "train", synth / "annotations" / "instances_train.json")


def test_resolve_split_errors_name_the_problem(tmp_path):
    with pytest.raises(UserInputError, match="does not exist") as caught:
        resolve_split(tmp_path / "nope", "train")
    # The library names the field, the CLI its flag.
    assert str(caught.value) == f"data {tmp_path / 'nope'}: dataset folder does not exist"
    assert caught.value.fields == ("data",)
    assert cli_message(caught.value) == f"--data {tmp_path / 'nope'}: dataset folder does not exist"
    with pytest.raises(UserInputError, match="instances_train2017.json or annotations/instances_train.json"):
        resolve_split(tmp_path, "train")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(UserInputError, match="no image folder"):
        resolve_split(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(UserInputError, match="has no images"):
        resolve_split(tmp_path, "train")


def test_cli_names_the_missing_dataset_folder_by_its_flag(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train", "--data", str(missing), "--epochs", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ssd300 train: error: --data {missing}: dataset folder does not exist")


GOOD = {"images": [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}],
        "categories": [{"id": 3, "name": "x"}]}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\): missing key 'file_name'"),
    (lambda d: d["images"][0].update(width=-3), r"images\[0\] \(id 1\): 'width' must be a positive number"),
    (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 5\): refers to unknown image_id 99"),
    (lambda d: d["annotations"][0].update(category_id=7),
     r"annotations\[0\] \(id 5\): refers to unknown category_id 7"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, -2, 2]), "negative width or height"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 2]), "'bbox' must be 4 finite numbers"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 5\): missing key 'bbox'"),
    (lambda d: d["categories"].append({"id": 3, "name": "y"}), "duplicate category id 3"),
])
def test_malformed_annotations_fail_with_file_and_first_offending_entry(tmp_path, mutate, message):
    data = json.loads(json.dumps(GOOD))
    data["annotations"].append({"id": 6, "image_id": 42, "category_id": 3, "bbox": [0, 0, 1, 1]})  # also bad, later
    data["images"].append({"id": 42, "file_name": "2.jpg", "width": 5, "height": 5})
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=message) as info:
        read_annotation_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_annotation_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="broken.json: not a readable JSON file"):
        read_annotation_file(path)
    with pytest.raises(UserInputError, match="does not exist"):
        read_annotation_file(tmp_path / "missing.json")


def test_boxes_labels_skips_and_counts(tmp_path):
    annotations = [
        _ann(1, 1, 42, [10, 5, 20, 10]),              # -> label 1 (first category in the json)
        _ann(2, 1, 7, [0, 0, 60, 40]),                # -> label 2
        _ann(3, 1, 7, [5, 5, 30, 30], iscrowd=1),     # crowd: excluded
        _ann(4, 2, 42, [3, 3, 0.5, 10]),              # under 1 px wide: dropped -> image 2 empty
        _ann(5, 3, 7, [50, 30, 40, 40]),              # partly outside: clipped to the image
    ]
    path = _write_dataset(tmp_path, [("1.png", _grey()), ("2.png", _grey()), ("3.png", _grey())], annotations,
                          categories=((42, "cat"), (7, "dog")))
    train = CocoDetection(tmp_path / "train", path, train=True)
    assert train.label_map.names == ("background", "cat", "dog")
    assert train.label_map.category_ids == (0, 42, 7)
    assert (train.stats.crowd_boxes, train.stats.small_boxes, train.stats.images_without_boxes) == (1, 1, 1)
    assert train.image_ids == [1, 3]
    np.testing.assert_allclose(train.records[0].boxes, [[10, 5, 30, 15], [0, 0, 60, 40]])
    np.testing.assert_array_equal(train.records[0].labels, [1, 2])
    np.testing.assert_allclose(train.records[1].boxes, [[50, 30, 60, 40]])
    evaluation = CocoDetection(tmp_path / "train", path, train=False)
    assert evaluation.image_ids == [1, 2, 3]
    sample = evaluation[0]
    assert sample.image.shape == (3, 300, 300) and sample.image.dtype == torch.uint8
    torch.testing.assert_close(sample.boxes, torch.tensor([[10 / 60, 5 / 40, 30 / 60, 15 / 40], [0, 0, 1, 1]]))
    assert sample.image_size == (60, 40) and sample.image_id == 1
    assert len(evaluation[1].boxes) == 0


def test_empty_dataset_is_a_clear_error(tmp_path):
    path = _write_dataset(tmp_path, [("1.png", _grey())], [])
    with pytest.raises(UserInputError, match="no images with usable boxes"):
        CocoDetection(tmp_path / "train", path, train=True)
    with pytest.raises(UserInputError, match="image folder does not exist"):
        CocoDetection(tmp_path / "elsewhere", path, train=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(UserInputError, match=r"other: none of the images listed in instances_train.json is there"):
        CocoDetection(tmp_path / "other", path, train=False)


def test_missing_and_corrupt_images_are_skipped_and_reported_or_fatal_in_strict_mode(tmp_path):
    annotations = [_ann(i, i, 1, [2, 2, 20, 20]) for i in (1, 2, 3)]
    path = _write_dataset(tmp_path, [("1.jpg", _grey()), ("2.jpg", _grey()), ("3.jpg", _grey())], annotations)
    (tmp_path / "train" / "1.jpg").unlink()
    data = (tmp_path / "train" / "2.jpg").read_bytes()
    (tmp_path / "train" / "2.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    train = CocoDetection(tmp_path / "train", path, train=True)
    sample = train[0]   # 1 missing, 2 truncated -> 3 takes their place
    assert sample.image_id == 3
    assert len(sample.skipped) == 2
    assert "1.jpg" in sample.skipped[0] and "2.jpg" in sample.skipped[1]
    evaluation = CocoDetection(tmp_path / "train", path, train=False)
    from ssd300.data.loaders import collate
    batch = collate([evaluation[0], evaluation[1], evaluation[2]])
    assert batch.image_ids.tolist() == [3] and len(batch.skipped) == 2
    strict = CocoDetection(tmp_path / "train", path, train=True, strict=True)
    with pytest.raises(UserInputError, match="1.jpg"):
        strict[0]


def _modes(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    paths = {}
    Image.fromarray(rgb[:, :, 0], "L").save(paths.setdefault("gray", tmp_path / "gray.jpg"))
    rgba = Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)]), "RGBA")
    rgba.save(paths.setdefault("rgba", tmp_path / "rgba.png"))
    Image.fromarray(rgb).convert("CMYK").save(paths.setdefault("cmyk", tmp_path / "cmyk.jpg"))
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(paths.setdefault("palette", tmp_path / "palette.png"), transparency=0)
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(paths.setdefault("gray16", tmp_path / "gray16.png"))
    Image.fromarray(rgb[:, :, 0] > 128).save(paths.setdefault("bilevel", tmp_path / "bilevel.png"))
    return paths


def test_every_image_mode_becomes_rgb(tmp_path):
    for name, path in _modes(tmp_path).items():
        image = to_rgb(open_image(path))
        assert image.mode == "RGB" and image.size == (40, 30), name
    gray16 = np.asarray(to_rgb(open_image(tmp_path / "gray16.png")))
    gray8 = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)[:, :, 0]
    assert np.abs(gray16[:, :, 0].astype(int) - gray8).max() <= 1  # rescaled, not clipped at 255


def test_dataset_reads_real_photographs_in_several_formats(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photos = {"astronaut.jpg": skimage_data.astronaut(), "coffee.png": skimage_data.coffee(),
              "chelsea.jpg": skimage_data.chelsea(), "camera.png": skimage_data.camera(),
              "logo.png": skimage_data.logo(), "retina.jpg": skimage_data.retina()}
    (tmp_path / "train").mkdir()
    images, annotations = [], []
    for i, (name, array) in enumerate(photos.items()):
        Image.fromarray(array).save(tmp_path / "train" / name)
        h, w = array.shape[:2]
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        annotations.append(_ann(i + 1, i + 1, 1, [w * 0.25, h * 0.2, w * 0.5, h * 0.6]))
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    train = CocoDetection.from_root(tmp_path, "train", seed=3)
    evaluation = CocoDetection.from_root(tmp_path, "train", train=False)
    for index in range(len(train)):
        sample = train[(index, 0)]
        assert sample.image.shape == (3, 300, 300) and sample.image.dtype == torch.uint8
        assert len(sample.boxes) == 1 and 0 <= float(sample.boxes.min()) and float(sample.boxes.max()) <= 1
        assert float(sample.image.float().std()) > 5  # real content, not a blank
        original = Image.open(tmp_path / "train" / train.records[index].file_name)
        if original.format == "JPEG":
            original.draft(None, (300, 300))  # big JPEGs are decoded at a reduced scale (>= 300 px)
        reference = np.asarray(original.convert("RGB").resize((300, 300), Image.BILINEAR))
        got = evaluation[index].image.permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1  # PIL's bilinear, within rounding
        assert evaluation[index].image_size == (images[index]["width"], images[index]["height"])


# ----------------------------------------------------------------------------- the flat index vs a plain oracle


def _oracle_records(data, label_map, *, skip_empty):
    """The per-image implementation the flat index replaced: group annotations by image, xywh ->
    clipped ltrb pixels, drop crowd and boxes under 1 px, count what was left out."""
    to_label = label_map.category_id_to_label()
    counts = {"images": 0, "annotations": 0, "crowd": 0, "small": 0, "empty": 0}
    per_image = {}
    for ann in data["annotations"]:
        counts["annotations"] += 1
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        if ann["category_id"] not in to_label:
            raise UserInputError(f"category id {ann['category_id']} is not in the model's label map")
        per_image.setdefault(ann["image_id"], []).append((ann["bbox"], to_label[ann["category_id"]]))
    records = []
    for img in data["images"]:
        counts["images"] += 1
        width, height = int(round(img["width"])), int(round(img["height"]))
        entries = per_image.get(img["id"], [])
        boxes = np.zeros((len(entries), 4), dtype=np.float32)
        labels = np.zeros(len(entries), dtype=np.int64)
        for j, ((x, y, w, h), label) in enumerate(entries):
            boxes[j] = (x, y, x + w, y + h)
            labels[j] = label
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        usable = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        counts["small"] += int((~usable).sum())
        boxes, labels = boxes[usable], labels[usable]
        if len(boxes) == 0:
            counts["empty"] += 1
            if skip_empty:
                continue
        records.append((int(img["id"]), str(img["file_name"]), width, height, boxes, labels))
    return records, counts


def _random_annotations(num_images=60, seed=0):
    """Shuffled image ids and annotation order, crowd boxes, boxes under 1 px, boxes outside the
    image, images without annotations, non-contiguous category ids, int and float numbers,
    float image ids equal to an int, non-ASCII file names."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1000, 1000 + num_images)).tolist()
    images = []
    for n, image_id in enumerate(ids):
        width = int(rng.integers(20, 90)) if n % 3 else float(rng.uniform(20, 90))  # some fractional sizes
        images.append({"id": image_id, "file_name": f"{n}_é_{image_id}.png", "width": width,
                       "height": int(rng.integers(20, 90)), "license": 1})
    annotations = []
    for image in images:
        if rng.random() < 0.15:
            continue                                    # no annotations at all
        for _ in range(int(rng.integers(1, 6))):
            w, h = float(rng.uniform(0, 40)), float(rng.uniform(0, 40))
            if rng.random() < 0.15:
                w = float(rng.uniform(0, 1))            # under 1 px
            x, y = float(rng.uniform(-10, 80)), float(rng.uniform(-10, 80))  # may stick out
            bbox = [x, y, w, h] if rng.random() < 0.7 else [int(x), int(y), int(w), int(h)]
            ann = {"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(rng.choice([42, 7, 90])),
                   "bbox": bbox, "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h]]}
            if rng.random() < 0.1:
                ann["iscrowd"] = 1
            elif rng.random() < 0.3:
                ann["iscrowd"] = 0
            if rng.random() < 0.05:
                ann["image_id"] = float(image["id"])
            annotations.append(ann)
    order = rng.permutation(len(annotations))
    return {"images": images, "annotations": [annotations[i] for i in order],
            "categories": [{"id": 42, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "emu"}]}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_flat_index_yields_the_per_image_records_and_counts(tmp_path, train, seed):
    data = _random_annotations(seed=seed)
    (tmp_path / "train").mkdir()
    for image in data["images"]:
        Image.fromarray(_grey(4, 4)).save(tmp_path / "train" / image["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "train", path, train=train)
    expected, counts = _oracle_records(data, dataset.label_map, skip_empty=train)
    assert counts["crowd"] > 0 and counts["small"] > 0 and counts["empty"] > 0  # every skip is exercised
    stats = dataset.stats
    assert (stats.images, stats.annotations, stats.crowd_boxes, stats.small_boxes, stats.images_without_boxes) == \
        (counts["images"], counts["annotations"], counts["crowd"], counts["small"], counts["empty"])
    assert len(dataset) == len(expected) and dataset.image_ids == [r[0] for r in expected]
    for i, (image_id, file_name, width, height, boxes, labels) in enumerate(expected):
        record = dataset.records[i]
        assert (record.image_id, record.file_name, record.width, record.height) == (image_id, file_name, width, height)
        np.testing.assert_array_equal(record.boxes, boxes)   # same float32 arithmetic: exact
        np.testing.assert_array_equal(record.labels, labels)
        assert dataset.path_of(i) == tmp_path / "train" / file_name


def test_first_unknown_category_is_named_as_before(tmp_path):
    from ssd300.labels import LabelMap

    data = _random_annotations(seed=3)
    (tmp_path / "train").mkdir()
    for image in data["images"]:
        Image.fromarray(_grey(4, 4)).save(tmp_path / "train" / image["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    only_cat = LabelMap.from_categories([(42, "cat")])
    with pytest.raises(UserInputError) as expected:
        _oracle_records(data, only_cat, skip_empty=True)
    with pytest.raises(UserInputError) as got:
        CocoDetection(tmp_path / "train", path, train=True, label_map=only_cat)
    assert str(got.value) == str(expected.value)


def _reachable_objects(root) -> int:
    """Python objects reachable from ``root`` (a forked worker touches each one's refcount)."""
    import gc
    import types

    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_dataset_holds_no_per_image_python_objects(tmp_path):
    sizes = {}
    for num_images in (10, 200):
        root = tmp_path / str(num_images)
        names = [(f"{i}.png", _grey()) for i in range(num_images)]
        path = _write_dataset(root, names[:1], [])
        data = json.loads(path.read_text())
        data["images"] = [{"id": i + 1, "file_name": n, "width": 60, "height": 40} for i, (n, _) in enumerate(names)]
        data["annotations"] = [_ann(i + 1, i + 1, 1, [1, 1, 20, 20]) for i in range(num_images)]
        path.write_text(json.dumps(data))
        dataset = CocoDetection(root / "train", path, train=True)
        assert len(dataset) == num_images
        sizes[num_images] = _reachable_objects(dataset)
    assert sizes[200] == sizes[10]


# ----------------------------------------------------------------------------- the index cache


def _cache_case(tmp_path, monkeypatch):
    import ssd300.data.annotations as annotations

    monkeypatch.setattr(annotations, "CACHE_MIN_BYTES", 0)  # cache even a tiny file
    data = _random_annotations(seed=5)
    (tmp_path / "train").mkdir()
    for image in data["images"]:
        Image.fromarray(_grey(4, 4)).save(tmp_path / "train" / image["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return annotations, data, path


def _same_dataset(a, b):
    assert a.image_ids == b.image_ids and a.stats == b.stats and a.label_map == b.label_map
    for name in ("image_ids", "sizes", "name_offsets", "name_bytes", "box_offsets", "boxes", "labels", "rows"):
        np.testing.assert_array_equal(getattr(a.index, name), getattr(b.index, name))


def test_index_cache_is_used_for_the_same_content_and_never_when_it_changed(tmp_path, monkeypatch):
    annotations, _, path = _cache_case(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    uncached = CocoDetection(tmp_path / "train", path, train=True, cache_dir=None)
    first = CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))
    assert not (tmp_path / "instances.json.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["cache", "instances.json", "train"]                          # nothing next to the user's file
    _same_dataset(first, uncached)

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed although the index was cached")
    monkeypatch.setattr(annotations, "_parse_text", no_parse)
    _same_dataset(CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache), uncached)
    monkeypatch.undo()
    monkeypatch.setattr(annotations, "CACHE_MIN_BYTES", 0)

    # same size and mtime, different content (one character of the last file name): a new entry
    stat = path.stat()
    text = path.read_text()
    at = text.rindex('"file_name": "') + len('"file_name": "')
    path.write_text(text[:at] + ("7" if text[at] != "7" else "8") + text[at + 1:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    again = CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache)
    reparsed = CocoDetection(tmp_path / "train", path, train=True, cache_dir=None)
    _same_dataset(again, reparsed)
    assert not np.array_equal(reparsed.index.name_bytes, uncached.index.name_bytes)
    assert len(list(cache.glob("*.npz"))) == 2


def test_broken_or_unwritable_cache_falls_back_to_parsing(tmp_path, monkeypatch):
    _, _, path = _cache_case(tmp_path, monkeypatch)
    expected = CocoDetection(tmp_path / "train", path, train=True, cache_dir=None)
    cache = tmp_path / "cache"
    CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])                      # truncated
    _same_dataset(CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache), expected)
    _same_dataset(CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache), expected)  # rewritten
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _same_dataset(CocoDetection(tmp_path / "train", path, train=True, cache_dir=blocker / "cache"), expected)


def test_the_default_cache_is_the_package_cache_folder(tmp_path, monkeypatch):
    _cache_case(tmp_path, monkeypatch)
    monkeypatch.setenv("SSD300_CACHE_DIR", str(tmp_path / "package-cache"))
    expected = CocoDetection(tmp_path / "train", tmp_path / "instances.json", train=True, cache_dir=None)
    _same_dataset(CocoDetection(tmp_path / "train", tmp_path / "instances.json", train=True), expected)
    (entry,) = (tmp_path / "package-cache").rglob("*.npz")
    assert entry.parent == tmp_path / "package-cache" / "annotation-index"


def test_an_invalid_file_is_never_cached(tmp_path, monkeypatch):
    _, data, path = _cache_case(tmp_path, monkeypatch)
    data["annotations"][3]["bbox"] = [1, 2, -3, 4]
    path.write_text(json.dumps(data))
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.raises(UserInputError, match=r"annotations\[3\].*negative width or height"):
            CocoDetection(tmp_path / "train", path, train=True, cache_dir=cache)
    assert not cache.exists() or not list(cache.iterdir())
