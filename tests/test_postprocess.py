"""PostProcessor against a plain per-image, per-class loop (the oracle), SPEC §5."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from ssd300.box_coder import BoxCoder
from ssd300.default_boxes import default_boxes_300
from ssd300.postprocess import Detections, PostProcessor, _candidate_probabilities, postprocess_flat

from matching import SCORE_ATOL, assert_same_detections

A = 8732


def oracle(locs, logits, threshold=0.05, iou=0.45, topk=200, max_out=200):
    """Reference style: per image, per class > 0: threshold, top-k, torchvision NMS; then top max_out;
    boxes clipped to the image."""
    coder = BoxCoder(default_boxes_300())
    results = []
    for i in range(locs.shape[0]):
        boxes = coder.decode(locs[i : i + 1])[0]
        scores = torch.softmax(logits[i], dim=0)
        out_boxes, out_scores, out_labels = [], [], []
        for cls in range(1, scores.shape[0]):
            mask = scores[cls] > threshold
            cand_boxes, cand_scores = boxes[mask], scores[cls][mask]
            order = cand_scores.sort(descending=True, stable=True).indices[:topk]
            kept = torchvision.ops.nms(cand_boxes[order], cand_scores[order], iou)
            out_boxes.append(cand_boxes[order][kept])
            out_scores.append(cand_scores[order][kept])
            out_labels.append(torch.full((len(kept),), cls, dtype=torch.long))
        b, s, l = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
        best = s.sort(descending=True, stable=True).indices[:max_out]
        results.append((b[best].clamp(0, 1), s[best], l[best]))
    return results


def assert_same(got: list[Detections], want, threshold: float = 0.05) -> None:
    assert len(got) == len(want)
    for i, (det, expected) in enumerate(zip(got, want)):
        assert_same_detections((det.boxes, det.scores, det.labels), expected, cuts=(threshold,), where=f"image {i}")


def untrained(seed: int, n: int = 2, classes: int = 81):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, A, generator=g), torch.randn(n, classes, A, generator=g)


def confident(seed: int, n: int = 3, classes: int = 11):
    """Background wins almost everywhere; clusters of overlapping anchors are confident."""
    g = torch.Generator().manual_seed(seed)
    dboxes = default_boxes_300()
    locs = torch.randn(n, 4, A, generator=g) * 0.3
    logits = torch.randn(n, classes, A, generator=g)
    logits[:, 0] += 8
    for i in range(n):
        for _ in range(4):
            xy = torch.rand(2, generator=g) * 0.6
            box = torch.cat((xy, xy + 0.1 + torch.rand(2, generator=g) * 0.3))[None]
            near = torchvision.ops.box_iou(box, dboxes.ltrb)[0].topk(80).indices
            cls = int(torch.randint(1, classes, (1,), generator=g))
            logits[i, cls, near] = 10 + torch.randn(80, generator=g)
    logits[n - 1, 1:] -= 30  # last image: nothing above the threshold
    return locs, logits


@pytest.mark.parametrize("nms", ["per_group", "matrix"])
@pytest.mark.parametrize("make, seed", [(untrained, 0), (confident, 1), (confident, 2)])
def test_equals_oracle(make, seed: int, nms: str) -> None:
    locs, logits = make(seed)
    got = PostProcessor(default_boxes_300(), nms=nms)(locs, logits)
    assert_same(got, oracle(locs, logits))
    if make is untrained:
        assert all(len(d) == 200 for d in got)  # capped by max_detections
    for det in got:
        assert det.labels.dtype == torch.long and det.boxes_pixels is None
        assert (det.labels > 0).all()
        assert torch.all(det.scores[:-1] >= det.scores[1:])  # best first


def test_configurable_thresholds_equal_oracle() -> None:
    locs, logits = untrained(3, n=2, classes=21)
    settings = dict(score_threshold=0.08, iou_threshold=0.3, topk_per_class=50, max_detections=70)
    got = PostProcessor(default_boxes_300(), **settings)(locs, logits)
    want = oracle(locs, logits, threshold=0.08, iou=0.3, topk=50, max_out=70)
    assert_same(got, want)
    assert [len(d) for d in got] == [70, 70]


def test_ties_broken_like_the_oracle() -> None:
    # Equal logits across classes and anchors: every score ties; order must still match.
    locs, logits = untrained(4, n=2, classes=6)
    logits = logits.round()  # many exactly equal scores
    for settings in (dict(), dict(topk_per_class=7, max_detections=13)):
        got = PostProcessor(default_boxes_300(), **settings)(locs, logits)
        mapped = {"topk_per_class": "topk", "max_detections": "max_out"}
        assert_same(got, oracle(locs, logits, **{mapped[k]: v for k, v in settings.items()}))


@pytest.mark.parametrize("make", [untrained, confident])
def test_candidate_probabilities_are_the_softmax_over_the_threshold(make) -> None:
    # Every probability over the threshold and only those (up to rounding at the threshold), with
    # softmax values, although boxes where no class can pass are never softmaxed.
    _, logits = make(10)
    flat, scores = _candidate_probabilities(logits, 0.05)
    order = torch.argsort(flat)
    flat, scores = flat[order], scores[order]
    want = torch.softmax(logits, dim=1)
    want[:, 0] = 0  # background is never a candidate
    want = want.view(-1)
    sure = torch.nonzero(want > 0.05 + SCORE_ATOL).squeeze(1)
    maybe = torch.nonzero(want > 0.05 - SCORE_ATOL).squeeze(1)
    assert torch.isin(sure, flat).all() and torch.isin(flat, maybe).all()
    torch.testing.assert_close(scores, want[flat], rtol=0, atol=SCORE_ATOL)
    assert (scores > 0.05).all()


def test_candidate_skipping_keeps_every_box_that_can_pass() -> None:
    # One default box whose foreground score is just above the threshold among thousands that
    # cannot pass: the skip test must keep it.
    logits = torch.full((1, 3, A), -20.0)
    logits[0, 0] = 10.0
    logit = 10.0 + math.log(0.0501 / (1 - 0.0501))
    logits[0, 2, 1234] = logit
    flat, scores = _candidate_probabilities(logits, 0.05)
    assert flat.tolist() == [2 * A + 1234]
    torch.testing.assert_close(scores, torch.tensor([0.0501]), rtol=0, atol=1e-6)


def test_zero_threshold_equals_oracle() -> None:
    # Threshold 0: no default box can be skipped before the softmax.
    locs, logits = untrained(8, n=1, classes=4)
    settings = dict(score_threshold=0.0, topk_per_class=20, max_detections=30)
    got = PostProcessor(default_boxes_300(), **settings)(locs, logits)
    assert_same(got, oracle(locs, logits, threshold=0.0, topk=20, max_out=30))


def test_same_detections_at_any_thread_count() -> None:
    locs, logits = untrained(9, n=3, classes=21)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = PostProcessor(default_boxes_300())(locs, logits)
        torch.set_num_threads(2)
        two = PostProcessor(default_boxes_300())(locs, logits)
    finally:
        torch.set_num_threads(threads)
    assert_same(one, [(d.boxes, d.scores, d.labels) for d in two])


def test_pixels_and_flat_api() -> None:
    locs, logits = confident(5)
    sizes = torch.tensor([[640, 480], [300, 300], [1000, 20]])
    post = PostProcessor(default_boxes_300())
    got = post(locs, logits, image_sizes=sizes)
    assert len(got[2]) == 0 and got[2].boxes.shape == (0, 4) and got[2].boxes_pixels.shape == (0, 4)
    for det, (w, h) in zip(got, sizes.tolist()):
        torch.testing.assert_close(det.boxes_pixels, det.boxes * torch.tensor([w, h, w, h]))
    dboxes = default_boxes_300()
    boxes, scores, labels, image_index = postprocess_flat(locs, logits, dboxes.xywh)
    assert torch.equal(image_index, torch.repeat_interleave(torch.tensor([len(d) for d in got])))
    assert torch.equal(boxes, torch.cat([d.boxes for d in got]))
    assert torch.equal(scores, torch.cat([d.scores for d in got]))
    assert torch.equal(labels, torch.cat([d.labels for d in got]))


def test_offsets_strategy_close_to_exact() -> None:
    # torchvision's batched_nms shifts boxes per group: same result here (few groups, small offsets).
    locs, logits = confident(6)
    exact = PostProcessor(default_boxes_300())(locs, logits)
    shifted = PostProcessor(default_boxes_300(), nms="offsets")(locs, logits)
    assert_same(shifted, [(d.boxes, d.scores, d.labels) for d in exact])


def test_bad_shapes_raise() -> None:
    post = PostProcessor(default_boxes_300())
    with pytest.raises(ValueError, match="expected locs"):
        post(torch.zeros(1, 4, A), torch.zeros(2, 81, A))
    with pytest.raises(ValueError, match="image_sizes"):
        post(torch.zeros(1, 4, A), torch.zeros(1, 81, A), image_sizes=torch.tensor([640, 480]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    locs, logits = confident(7)
    cpu = PostProcessor(default_boxes_300())(locs, logits)
    gpu = PostProcessor(default_boxes_300())(locs.cuda(), logits.cuda())
    assert_same([Detections(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu()) for d in gpu],
                [(d.boxes, d.scores, d.labels) for d in cpu])


def test_boxes_are_clipped_to_the_image() -> None:
    # Large offsets push many decoded boxes past the image edges; detections stay inside [0, 1].
    locs, logits = confident(11)
    locs = locs * 10
    sizes = torch.tensor([[512, 384]] * locs.shape[0])
    raw = BoxCoder(default_boxes_300()).decode(locs)
    assert (raw < 0).any() and (raw > 1).any()
    got = PostProcessor(default_boxes_300())(locs, logits, image_sizes=sizes)
    boxes = torch.cat([d.boxes for d in got])
    pixels = torch.cat([d.boxes_pixels for d in got])
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes == 0).any() and (boxes == 1).any()
    assert (pixels[:, 0::2] <= 512).all() and (pixels[:, 1::2] <= 384).all() and (pixels >= 0).all()


def test_config_is_validated_once_naming_the_field_and_the_cli_its_flag() -> None:
    from ssd300.commands.options import cli_message
    from ssd300.errors import UserInputError
    from ssd300.postprocess import COCO_EVAL, PostprocessConfig

    assert PostprocessConfig() == PostprocessConfig(0.05, 0.45, 200, 200)
    assert COCO_EVAL.iou_threshold == 0.5 and COCO_EVAL.replace(score_threshold=None) == COCO_EVAL
    for bad in [dict(score_threshold=1.5), dict(iou_threshold=0.0), dict(topk_per_class=0), dict(max_detections=2.5),
                dict(score_threshold=float("nan"))]:
        (field,) = bad
        flag = "--" + field.replace("_", "-")
        with pytest.raises(UserInputError, match=f"^{field} must be") as error:
            PostprocessConfig(**bad)
        assert error.value.fields == (field,) and "--" not in str(error.value)
        assert cli_message(error.value).startswith(f"{flag} must be")
        with pytest.raises(UserInputError, match=f"^{field} must be"):
            PostProcessor(default_boxes_300(), **bad)
    import numpy as np

    plain = PostprocessConfig(score_threshold=np.float32(0.25), max_detections=np.int64(9))
    assert type(plain.score_threshold) is float and type(plain.max_detections) is int
    assert PostProcessor(default_boxes_300(), COCO_EVAL, max_detections=7).config == PostprocessConfig(
        iou_threshold=0.5, max_detections=7)
