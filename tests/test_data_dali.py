"""DALI pipeline on the CPU: Batch layout, geometry, reproducibility, and BoxCoder agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.data.dali import dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI (extra 'dali') is not importable here")

from ssd300.data.coco import CocoDetection  # noqa: E402


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    root = synthetic_dataset(num_train=16, num_val=1, seed=2)
    return CocoDetection.from_root(root, "train")


def _loader(dataset, **kwargs):
    from ssd300.data.dali import build_dali_train_loader

    kwargs.setdefault("seed", 0)
    return build_dali_train_loader(dataset, 4, num_threads=1, device_id=None, **kwargs)


def test_batches_have_our_layout_and_valid_boxes(dataset):
    loader = _loader(dataset)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    records = {r.image_id: r for r in dataset.records}
    seen = []
    for batch in batches:
        assert batch.images.shape == (4, 3, 300, 300) and batch.images.dtype == torch.uint8
        assert batch.boxes.shape[0] == 4 and batch.boxes.shape[2] == 4
        for i in range(4):
            k = int(batch.num_boxes[i])
            boxes = batch.boxes[i, :k]
            assert k >= 1 and float(boxes.min()) >= 0 and float(boxes.max()) <= 1
            assert bool((boxes[:, 2:] > boxes[:, :2]).all())
            assert set(batch.labels[i, :k].tolist()) <= set(records[int(batch.image_ids[i])].labels.tolist())
            assert int(batch.labels[i, k:].abs().sum()) == 0
            record = records[int(batch.image_ids[i])]
            assert batch.image_sizes[i].tolist() == [record.width, record.height]
        seen += batch.image_ids.tolist()
        moved = batch.to("cpu")
        assert moved.images.dtype == torch.float32 and abs(float(moved.images.mean())) < 3
    assert sorted(seen) == sorted(dataset.image_ids)


def test_same_seed_reproduces_and_epochs_reshuffle(dataset):
    a, b = _loader(dataset, seed=5), _loader(dataset, seed=5)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert torch.equal(first_a.image_ids, first_b.image_ids)
    assert torch.equal(first_a.images, first_b.images) and torch.equal(first_a.boxes, first_b.boxes)
    a.set_epoch(1)
    assert not torch.equal(next(iter(a)).image_ids, first_a.image_ids)


def test_ranks_read_disjoint_shards(dataset):
    ids = [sum((batch.image_ids.tolist() for batch in _loader(dataset, rank=r, world_size=2)), []) for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 8 and not set(ids[0]) & set(ids[1])


def test_painted_boxes_follow_dali_geometry(tmp_path):
    """Red, green and blue boxes on black: after DALI's crop/flip/resize/colour, each box's interior
    is still dominated by its channel (the colour ops keep the channel order of pure colours)."""
    (tmp_path / "train").mkdir()
    (tmp_path / "annotations").mkdir()
    bboxes = [[20, 20, 140, 110], [230, 30, 150, 100], [60, 170, 150, 110]]
    images, annotations = [], []
    for i in range(8):
        array = np.zeros((300, 400, 3), dtype=np.uint8)
        for c, (x, y, w, h) in enumerate(bboxes):
            array[y:y + h, x:x + w, c] = 255
        Image.fromarray(array).save(tmp_path / "train" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 400, "height": 300})
        annotations += [{"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": b}
                        for c, b in enumerate(bboxes)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(("red", "green", "blue"))]}
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    dataset = CocoDetection.from_root(tmp_path, "train")
    checked = 0
    for epoch in range(3):
        loader = _loader(dataset, seed=epoch)
        for batch in loader:
            for i in range(len(batch)):
                pixels = batch.images[i].permute(1, 2, 0).numpy().astype(np.int32)
                for box, label in zip(batch.boxes[i, :int(batch.num_boxes[i])] * 300, batch.labels[i]):
                    l, t, r, b = box.tolist()
                    if r - l < 10 or b - t < 10:
                        continue
                    inner = pixels[int(t) + 3:int(np.ceil(b)) - 3, int(l) + 3:int(np.ceil(r)) - 3].mean(axis=(0, 1))
                    assert int(np.argmax(inner)) == int(label) - 1
                    checked += 1
    assert checked > 30


def _dali_box_encoder(boxes: list[np.ndarray], labels: list[np.ndarray], anchors_ltrb: torch.Tensor):
    import nvidia.dali as dali
    from nvidia.dali import fn

    pipe = dali.Pipeline(batch_size=len(boxes), num_threads=1, device_id=None, exec_dynamic=True)
    with pipe:
        b, l = fn.external_source(source=lambda: (boxes, labels), num_outputs=2, batch=True)
        encoded, encoded_labels = fn.box_encoder(b, l, anchors=anchors_ltrb.reshape(-1).tolist(), criteria=0.5,
                                                 offset=True, stds=[0.1, 0.1, 0.2, 0.2], scale=1.0)
        pipe.set_outputs(encoded, encoded_labels)
    pipe.build()
    encoded, encoded_labels = pipe.run()
    return ([torch.from_numpy(np.array(encoded[i])) for i in range(len(boxes))],
            [torch.from_numpy(np.array(encoded_labels[i])).long() for i in range(len(boxes))])


def test_encoding_dali_boxes_with_box_coder_equals_dali_box_encoder(dataset):
    """On the boxes DALI's augmentation produced, DALI's own SSD box_encoder and our BoxCoder give
    the same targets. The only freedom: when a ground truth's best IoU is tied between default
    boxes (symmetric grids), which of them it claims; then both claim exactly one."""
    box_coder = pytest.importorskip("ssd300.box_coder")
    default_boxes = pytest.importorskip("ssd300.default_boxes").default_boxes_300()
    from torchvision.ops import box_iou

    coder = box_coder.BoxCoder(default_boxes)
    compared = 0
    for batch in _loader(dataset, seed=1):
        loc_targets, labels = coder.encode(batch.boxes, batch.labels, batch.num_boxes)
        n = len(batch)
        gt = [batch.boxes[i, :int(batch.num_boxes[i])].numpy() for i in range(n)]
        gl = [batch.labels[i, :int(batch.num_boxes[i])].numpy().astype(np.int32) for i in range(n)]
        dali_locs, dali_labels = _dali_box_encoder(gt, gl, default_boxes.ltrb)
        for i in range(n):
            differ = dali_labels[i] != labels[i]
            if differ.any():
                iou = box_iou(torch.from_numpy(gt[i]), default_boxes.ltrb)
                best = iou.max(dim=1).values
                tied = (iou >= best[:, None] - 1e-6) & (best[:, None] <= 0.5)
                assert bool(tied.any(dim=0)[differ].all()), "a difference that is not a tie"
            same = ~differ
            torch.testing.assert_close(dali_locs[i].T[:, same], loc_targets[i][:, same], atol=1e-4, rtol=1e-4)
            assert int((labels[i] > 0).sum()) == int((dali_labels[i] > 0).sum())
            compared += int(same.sum())
    assert compared > 8732 * 10


def test_missing_file_is_skipped_and_reported(synthetic_dataset, tmp_path):
    root = synthetic_dataset(num_train=8, num_val=1, seed=4, copy_to=tmp_path / "d")
    (root / "train" / "000002.jpg").unlink()
    dataset = CocoDetection.from_root(root, "train")
    skipped = sum((batch.skipped for batch in _loader(dataset)), [])
    assert len(skipped) == 1 and "000002.jpg" in skipped[0]


def test_image_of_another_size_than_the_json_says_is_skipped_and_reported(synthetic_dataset, tmp_path):
    from ssd300.data.coco import SIZE_MISMATCH

    root = synthetic_dataset(num_train=8, num_val=1, seed=4, copy_to=tmp_path / "d")
    path = root / "train" / "000003.jpg"
    with Image.open(path) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(path)  # as a phone photo stored sideways
    dataset = CocoDetection.from_root(root, "train")
    skipped = sum((batch.skipped for batch in _loader(dataset)), [])
    assert len(skipped) == 1 and "000003.jpg" in skipped[0] and SIZE_MISMATCH in skipped[0]


def _dataset_with_awkward_files(synthetic_dataset, tmp_path, *, strict=False):
    """8 training images, of which a GIF, an int32 TIFF (mode "I") and a JPEG cut in half."""
    root = synthetic_dataset(num_train=8, num_val=1, seed=4, copy_to=tmp_path / "d")
    annotation_file = root / "annotations" / "instances_train.json"
    data = json.loads(annotation_file.read_text())

    def rewrite(position, suffix, save):
        record = data["images"][position]
        source = root / "train" / record["file_name"]
        with Image.open(source) as image:
            picture = image.convert("RGB")
        source.unlink()
        record["file_name"] = source.with_suffix(suffix).name
        save(picture, root / "train" / record["file_name"])

    def truncated_jpeg(picture, path):
        picture.save(path, quality=90)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    rewrite(0, ".gif", lambda picture, path: picture.save(path))
    rewrite(1, ".tif", lambda picture, path: Image.fromarray(
        np.asarray(picture.convert("L"), dtype=np.int32) * 100, "I").save(path))
    rewrite(2, ".jpg", truncated_jpeg)
    annotation_file.write_text(json.dumps(data))
    with Image.open(root / "train" / data["images"][1]["file_name"]) as tiff:
        assert tiff.mode == "I"
    return CocoDetection.from_root(root, "train", strict=strict), data["images"][2]["file_name"]


def test_gif_int32_tiff_and_truncated_jpeg_are_used_and_skipped_as_by_the_pytorch_loader(
        synthetic_dataset, tmp_path, caplog):
    from ssd300.data.loaders import build_train_loader

    dataset, truncated = _dataset_with_awkward_files(synthetic_dataset, tmp_path)
    gif_id, tiff_id = dataset.index.image_id(0), dataset.index.image_id(1)
    for epoch in range(3):
        default = build_train_loader(dataset, 4, num_workers=0, seed=0)
        dali = _loader(dataset)
        default.set_epoch(epoch)
        dali.set_epoch(epoch)
        default_batches, dali_batches = list(default), list(dali)
        assert len(dali_batches) == len(default_batches) == 2
        for ours, theirs in zip(dali_batches, default_batches):
            assert ours.image_ids.tolist() == theirs.image_ids.tolist()
            assert ours.skipped == theirs.skipped
            assert ours.images.shape == (4, 3, 300, 300)
        used = sum((b.image_ids.tolist() for b in dali_batches), [])
        skipped = sum((b.skipped for b in dali_batches), [])
        assert gif_id in used and tiff_id in used
        assert skipped and all(truncated in reason and "truncated" in reason for reason in skipped)
    assert "Traceback" not in caplog.text


def test_truncated_jpeg_in_strict_mode_fails_as_the_pytorch_loader_does(synthetic_dataset, tmp_path):
    from ssd300.data.loaders import build_train_loader
    from ssd300.errors import UserInputError

    dataset, truncated = _dataset_with_awkward_files(synthetic_dataset, tmp_path, strict=True)
    messages = []
    for loader in (build_train_loader(dataset, 4, num_workers=0, seed=0), _loader(dataset)):
        with pytest.raises(UserInputError) as caught:
            list(loader)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert truncated in messages[1] and "\n" not in messages[1]


def test_a_file_dalis_decoder_rejects_is_one_line_naming_the_files(synthetic_dataset, tmp_path, monkeypatch):
    """Should DALI's decoder still fail on a file (here: the GIF forced through it), the error is one
    line naming the batch's files, not DALI's traceback."""
    import ssd300.data.dali as dali_module
    from ssd300.errors import UserInputError

    dataset, _ = _dataset_with_awkward_files(synthetic_dataset, tmp_path)
    monkeypatch.setattr(dali_module, "_dali_decodes", lambda image, data: True)
    with pytest.raises(UserInputError) as caught:
        list(_loader(dataset))
    message = str(caught.value)
    assert "DALI could not decode one of" in message and ".gif" in message and "\n" not in message


@pytest.mark.parametrize("fmt, mode", [(f, m) for f, modes in
                                       {"JPEG": ("L", "RGB"), "PNG": ("L", "RGB"), "BMP": ("RGB",),
                                        "WEBP": ("RGB",)}.items() for m in modes])
def test_files_left_to_dalis_decoder_decode_as_pillow_does(fmt, mode):
    import io

    import nvidia.dali as dali
    from nvidia.dali import fn, types

    from ssd300.data.dali import _DALI_MODES, _dali_decodes

    assert mode in _DALI_MODES[fmt]
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        assert _dali_decodes(image, data)
        expected = np.asarray(image.convert("RGB"))
    pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    with pipe:
        files = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True, dtype=types.UINT8)
        pipe.set_outputs(fn.decoders.image(files, device="cpu", output_type=types.RGB))
    pipe.build()
    np.testing.assert_array_equal(np.array(pipe.run()[0][0]), expected)


def test_16_bit_rgb_png_and_trailing_bytes_go_to_pillow():
    """Pillow opens a 16-bit RGB PNG as mode "RGB" too: the IHDR bit depth sends it to Pillow. A
    JPEG with bytes after its end marker (a phone's appended data) goes to Pillow as well."""
    import io
    import struct
    import zlib

    from ssd300.data.dali import _dali_decodes

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + np.full((4, 3), 40000, ">u2").tobytes() for _ in range(3))
    png16 = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 16, 2, 0, 0, 0))
             + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with Image.open(io.BytesIO(png16)) as image:
        assert image.mode == "RGB" and not _dali_decodes(image, png16)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    with Image.open(io.BytesIO(jpeg)) as image:
        assert _dali_decodes(image, jpeg) and not _dali_decodes(image, jpeg + b"MotionPhoto")
