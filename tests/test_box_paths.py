"""Every path from a model to boxes gives the same detections, clipped to the image: the Detector
API, ``ssd300 detect``'s JSON files, evaluation's COCO results, torch.hub's ``decode_results`` and
the exported ONNX / TorchScript detectors (issue 8: one clipping rule, one post-processing config)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd300.cli import main as cli_main
from ssd300.coco_eval import detections_to_rows, rows_to_results
from ssd300.data.transforms import EvalTransform
from ssd300.default_boxes import default_boxes_300
from ssd300.export import export_model
from ssd300.inference import Detector
from ssd300.labels import LabelMap
from ssd300.postprocess import PostprocessConfig, PostProcessor

from matching import assert_same_detections

REPO = str(Path(__file__).resolve().parents[1])
LABEL_MAP = LabelMap.from_categories([(3, "cat"), (8, "dog"), (11, "bird")])
# Not the defaults, so a path that ignored the config would show.
CONFIG = PostprocessConfig(score_threshold=0.3, iou_threshold=0.5, topk_per_class=40, max_detections=30)
SIZES = ((512, 384), (240, 360))  # (width, height)
# Paths differ in how the network runs (BatchNorm folded, channels-last, onnxruntime) and in the
# rounding of the JSON files; boxes in pixels.
SCORE_ATOL, BOX_ATOL = 2e-4, 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_model, make_tiny_checkpoint):
    model = make_tiny_model(4, conf_scale=0.3).eval()  # spread scores, no saturated ties
    with torch.no_grad():
        for loc in model.loc:
            loc.weight.mul_(3.0)  # large offsets: many boxes cross the image border before clipping
    folder = tmp_path_factory.mktemp("paths")
    checkpoint = folder / "ssd.pt"
    make_tiny_checkpoint(checkpoint, LABEL_MAP, model=model, epoch=1)
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(SIZES):
        small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        path = folder / f"image{i}.png"
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path)
        paths.append(path)
    batch = EvalTransform().batch([Image.open(p) for p in paths])
    with torch.no_grad():
        locs, logits = model(batch)
    return model, checkpoint, paths, batch, locs, logits, folder


def _pixels(normalized: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    return torch.as_tensor(normalized, dtype=torch.float64).reshape(-1, 4) * torch.tensor([width, height] * 2)


def _paths(setup) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per path, per image: (ltrb pixel boxes, scores, labels)."""
    model, checkpoint, paths, batch, locs, logits, folder = setup
    out: dict[str, list] = {}

    detector = Detector.from_checkpoint(checkpoint, device="cpu", postprocess=CONFIG)
    out["Detector"] = [(r.boxes, r.scores, r.labels) for r in detector([str(p) for p in paths])]

    rc = cli_main(["detect", *map(str, paths), "--checkpoint", str(checkpoint), "--out", str(folder / "detect"),
                   "--no-images", "--score-threshold", str(CONFIG.score_threshold),
                   "--iou-threshold", str(CONFIG.iou_threshold), "--topk-per-class", str(CONFIG.topk_per_class),
                   "--max-detections", str(CONFIG.max_detections)])
    assert rc == 0
    records = [json.loads((folder / "detect" / "detections" / f"{p.stem}.json").read_text()) for p in paths]
    labels_of = {cid: label for label, cid in enumerate(LABEL_MAP.category_ids)}
    out["detect"] = [(torch.tensor([d["box"] for d in r["detections"]]).reshape(-1, 4),
                      torch.tensor([d["score"] for d in r["detections"]]),
                      torch.tensor([labels_of[d["category_id"]] for d in r["detections"]], dtype=torch.long))
                     for r in records]

    # Evaluation: PostProcessor -> result rows -> COCO results json entries (xywh pixels).
    detections = PostProcessor(default_boxes_300(), CONFIG)(locs, logits)
    rows = detections_to_rows([d.boxes for d in detections], [d.scores for d in detections],
                              [d.labels for d in detections], [1, 2], torch.tensor(SIZES), LABEL_MAP.category_ids)
    results = rows_to_results(rows)
    out["evaluate"] = []
    for image_id in (1, 2):
        mine = [r for r in results if r["image_id"] == image_id]
        xywh = torch.tensor([r["bbox"] for r in mine], dtype=torch.float64).reshape(-1, 4)
        out["evaluate"].append((torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1),
                                torch.tensor([r["score"] for r in mine]),
                                torch.tensor([labels_of[r["category_id"]] for r in mine], dtype=torch.long)))

    utils = torch.hub.load(REPO, "nvidia_ssd_processing_utils", source="local", trust_repo=True)
    decoded = utils.decode_results((locs, logits), criteria=CONFIG.iou_threshold, max_output=CONFIG.max_detections)
    out["hub"] = [(_pixels(b, size), torch.from_numpy(s), torch.from_numpy(c))
                  for (b, c, s), size in zip(decoded, SIZES)]
    exported = {}
    ts_path = export_model(model, LABEL_MAP, folder / "ssd.pt", "torchscript", config=CONFIG)
    with torch.no_grad():
        exported["torchscript"] = list(torch.jit.load(str(ts_path))(batch))
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx_path = export_model(model, LABEL_MAP, folder / "ssd.onnx", "onnx", exporter="legacy", config=CONFIG)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    exported["onnx"] = [torch.from_numpy(a) for a in session.run(None, {"images": batch.numpy()})]
    for name, (boxes, scores, labels, counts) in exported.items():
        out[name] = [(_pixels(boxes[i, :k], SIZES[i]), scores[i, :k], labels[i, :k])
                     for i, k in enumerate(counts.tolist())]
    return out


def test_every_path_gives_the_same_boxes_inside_the_image(setup):
    model, checkpoint, paths, batch, locs, logits, folder = setup
    # The model's raw boxes do cross the borders, so clipping is tested, not assumed.
    from ssd300.box_coder import decode_boxes

    dboxes = default_boxes_300()
    raw = decode_boxes(locs, dboxes.xywh, dboxes.scale_xy, dboxes.scale_wh)
    assert (raw < 0).any() and (raw > 1).any()

    results = _paths(setup)
    reference = results.pop("Detector")
    # decode_results keeps the reference's signature (criteria, max_output; other settings the
    # defaults): it must agree with the library's post-processing at those settings.
    hub = PostProcessor(default_boxes_300(), iou_threshold=CONFIG.iou_threshold,
                        max_detections=CONFIG.max_detections)(locs, logits, torch.tensor(SIZES))
    hub_got = results.pop("hub")
    for i, det in enumerate(hub):
        assert_same_detections(hub_got[i], (det.boxes_pixels, det.scores, det.labels), cuts=(0.05,),
                               score_atol=SCORE_ATOL, box_atol=BOX_ATOL, where=f"hub, image {i}")
        limit = torch.tensor([*SIZES[i], *SIZES[i]], dtype=torch.float64)
        assert ((hub_got[i][0] >= 0) & (hub_got[i][0] <= limit + 1e-6)).all()
    touching = 0
    for i, (width, height) in enumerate(SIZES):
        boxes, scores, labels = reference[i]
        assert 5 <= len(scores) <= CONFIG.max_detections
        limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
        assert ((boxes >= 0) & (boxes <= limit)).all()
        touching += int(((boxes == 0) | (boxes == limit)).any(dim=1).sum())
        for name, per_image in results.items():
            got = per_image[i]
            inside = (got[0] >= -1e-6) & (got[0] <= limit.double() + 1e-6)
            assert inside.all(), f"{name}: boxes outside the {width}x{height} image"
            assert_same_detections(got, (boxes, scores, labels), cuts=(CONFIG.score_threshold,),
                                   score_atol=SCORE_ATOL, box_atol=BOX_ATOL, where=f"{name}, image {i}")
    assert touching > 0  # some detections were clipped to the border
