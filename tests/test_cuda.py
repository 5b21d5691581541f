"""The CUDA paths, checked against the CPU (run on a GPU machine: ``pytest -m cuda`` or
``bash tools/gpu_check.sh``; every test here is skipped, with the reason, without CUDA).

What each test guards: fp16 autocast + GradScaler training steps agree with fp32 (loss, every
gradient, the update); the scaler skips a step whose gradients overflow and recovers; the dense
GPU matching of ``BoxCoder`` equals the CPU's candidate-window matching; ``PostProcessor`` on
CUDA equals the CPU for every NMS strategy; DALI's GPU pipeline (nvJPEG decode, GPU image stages)
yields the same targets as its CPU pipeline for a seed; a checkpoint written by a GPU run resumes
on a machine without CUDA; the Detector and the exporters work from a CUDA model; training runs
under ``torchrun`` and NCCL carries DDP's gradients and our collectives.

Comparisons of fp32 CUDA against the CPU turn TF32 off (cuDNN allows it by default), so the
differences left are float32 rounding; fp16 comparisons use relative norms suited to fp16.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssd300.box_coder import BoxCoder
from ssd300.data.loaders import Batch
from ssd300.default_boxes import default_boxes_300
from ssd300.runtime import Runtime
from ssd300.trainer import Trainer
from ssd300.labels import LabelMap
from ssd300.model import SSD300
from ssd300.postprocess import PostProcessor

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (on a GPU machine: bash tools/gpu_check.sh)"),
]

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full float32 for the duration of a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------- training helpers


def synthetic_batch(batch_size: int, seed: int = 0, max_boxes: int = 3) -> Batch:
    """uint8 noise images with 1..max_boxes random boxes each (labels 1..4)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, 300, 300), dtype=torch.uint8, generator=g)
    xy = torch.rand(batch_size, max_boxes, 2, generator=g) * 0.6
    wh = 0.1 + torch.rand(batch_size, max_boxes, 2, generator=g) * 0.3
    boxes = torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=2)
    counts = torch.randint(1, max_boxes + 1, (batch_size,), generator=g)
    padding = torch.arange(max_boxes)[None, :] >= counts[:, None]
    boxes[padding] = 0
    labels = torch.randint(1, 5, (batch_size, max_boxes), generator=g).masked_fill(padding, 0)
    return Batch(images=images, boxes=boxes, labels=labels, num_boxes=counts,
                 image_ids=torch.arange(batch_size), image_sizes=torch.full((batch_size, 2), 300),
                 is_padding=torch.zeros(batch_size, dtype=torch.bool))


def make_trainer(device: torch.device, amp: bool, backbone: str = "resnet50", lr: float = 1e-3) -> Trainer:
    """A Trainer as ``ssd300 train`` builds it (channels-last on CUDA), weights from seed 0."""
    torch.manual_seed(0)
    model = SSD300(backbone, num_classes=5).to(device)
    runtime = Runtime.resolve(device, amp, channels_last=device.type == "cuda")
    if runtime.channels_last(training=True):
        model = model.to(memory_format=torch.channels_last)
    return Trainer.build(model, runtime=runtime, label_map=LabelMap.generic(5), learning_rate=lr, multistep=[])


# The two places that know where a Trainer keeps its precision settings.
def grad_scaler(trainer: Trainer) -> torch.amp.GradScaler | None:
    return trainer.scaler


def set_grad_scaler(trainer: Trainer, scaler: torch.amp.GradScaler) -> None:
    trainer.scaler = scaler


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def amp_step(trainer: Trainer, batch: Batch) -> float:
    """One AMP step that the scaler did not skip (the first scale, 2**16, may overflow fp16)."""
    for _ in range(8):
        scale = grad_scaler(trainer).get_scale()
        loss, _ = trainer.train_step(batch)
        if grad_scaler(trainer).get_scale() >= scale:  # lowered only when the step was skipped
            return loss
    raise AssertionError("GradScaler skipped 8 steps in a row")


# ----------------------------------------------------------------------------- training


def test_batch_to_cuda_normalises_like_the_cpu():
    batch = synthetic_batch(4).pin_memory()
    on_gpu = batch.to(GPU, non_blocking=True, channels_last=True)
    on_cpu = batch.to(CPU)
    assert on_gpu.images.is_cuda and on_gpu.images.dtype == torch.float32
    assert on_gpu.images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, rtol=1e-6, atol=1e-6)
    assert torch.equal(on_gpu.boxes.cpu(), on_cpu.boxes) and torch.equal(on_gpu.labels.cpu(), on_cpu.labels)


def test_amp_training_steps_match_fp32(no_tf32):
    """Two steps of ResNet-50 SSD300 in fp16 autocast + GradScaler vs fp32, same weights and data:
    the loss, every parameter's gradient (unscaled) and the weights after the update agree to
    fp16 accuracy."""
    fp32, amp = make_trainer(GPU, amp=False), make_trainer(GPU, amp=True)
    assert grad_scaler(amp) is not None and grad_scaler(fp32) is None
    for step in range(2):
        batch = synthetic_batch(8, seed=step)
        loss_fp32, _ = fp32.train_step(batch)
        loss_amp = amp_step(amp, batch)
        assert abs(loss_amp - loss_fp32) <= 1e-2 * abs(loss_fp32), (step, loss_amp, loss_fp32)
        want, got = gradients(fp32), gradients(amp)  # GradScaler.step unscaled them in place
        assert want.keys() == got.keys() and len(want) > 100
        total = relative_error(torch.cat([g.flatten() for g in got.values()]),
                               torch.cat([w.flatten() for w in want.values()]))
        assert total < 2e-2, (step, total)
        norm = max(float(w.norm()) for w in want.values())
        for name, w in want.items():
            if float(w.norm()) > 1e-3 * norm:  # layers whose gradient is not negligible
                assert relative_error(got[name], w) < 0.1, (step, name)
    weights_fp32, weights_amp = parameters(fp32), parameters(amp)
    for name, w in weights_fp32.items():
        assert relative_error(weights_amp[name], w) < 1e-3, name


def test_grad_scaler_skips_a_step_whose_gradients_overflow():
    trainer = make_trainer(GPU, amp=True, backbone="resnet18")
    # A scale this large overflows every fp16 activation gradient while the loss stays finite.
    set_grad_scaler(trainer, torch.amp.GradScaler("cuda", init_scale=2.0**100))
    before = parameters(trainer)
    batch = synthetic_batch(4)
    loss, _ = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_scaler(trainer).get_scale() == 2.0**99  # backed off by 0.5
    assert all(torch.equal(p, before[n]) for n, p in parameters(trainer).items()), "a skipped step changed weights"
    assert not trainer.optimizer.state, "a skipped step created momentum"
    for _ in range(100):  # the scaler halves the scale until the gradients fit, then steps
        trainer.train_step(batch)
        if trainer.optimizer.state:
            break
    assert trainer.optimizer.state and grad_scaler(trainer).get_scale() < 2.0**99
    assert any(not torch.equal(p, before[n]) for n, p in parameters(trainer).items())


# ----------------------------------------------------------------------------- matching


def ground_truth_batch(seed: int, degenerate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32 images, 0..20 boxes each (garbage in the padding), borders, duplicates; ``degenerate``
    adds a zero-width box, which sends the CPU down its dense path too."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 21, (32,), generator=g)
    counts[:2] = torch.tensor([0, 20])
    boxes = torch.rand(32, 20, 4, generator=g)  # padding rows stay garbage on purpose
    for i, count in enumerate(counts.tolist()):
        xy = torch.rand(count, 2, generator=g) * 0.85
        wh = 0.02 + torch.rand(count, 2, generator=g) * (1 - xy) * 0.9
        boxes[i, :count] = torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=1)
    boxes[1, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    boxes[1, 1] = boxes[1, 2]  # identical boxes, different labels
    boxes[1, 3] = default_boxes_300().ltrb[100].clamp(0, 1)  # exactly a default box
    if degenerate:
        boxes[2, 0] = torch.tensor([0.3, 0.3, 0.3, 0.5])
        counts[2] = max(int(counts[2]), 1)
    labels = torch.randint(1, 81, (32, 20), generator=g)
    return boxes, labels, counts


@pytest.mark.parametrize("seed, degenerate", [(0, False), (1, False), (2, True)])
def test_box_coder_on_cuda_equals_cpu(seed, degenerate):
    """CUDA matches densely (one (N, M, 8732) IoU), the CPU by candidate windows: same result."""
    boxes, labels, counts = ground_truth_batch(seed, degenerate)
    cpu_coder, gpu_coder = BoxCoder(default_boxes_300()), BoxCoder(default_boxes_300().to(GPU))
    want_targets, want_labels = cpu_coder.encode(boxes, labels, counts)
    got_targets, got_labels = gpu_coder.encode(boxes.to(GPU), labels.to(GPU), counts.to(GPU))
    assert got_labels.is_cuda and got_targets.shape == want_targets.shape
    assert torch.equal(got_labels.cpu(), want_labels)  # same positives, same ground truth each
    assert int((want_labels > 0).sum()) > 500
    torch.testing.assert_close(got_targets.cpu(), want_targets, rtol=1e-5, atol=1e-5)
    want_boxes, _ = cpu_coder.match(boxes, labels, counts)
    got_boxes, _ = gpu_coder.match(boxes.to(GPU), labels.to(GPU), counts.to(GPU))
    torch.testing.assert_close(got_boxes.cpu(), want_boxes, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- post-processing


def separable_outputs(num_images: int = 4, num_classes: int = 7, seed: int = 0):
    """Raw outputs whose every decision is far from a threshold, so CUDA and CPU rounding agree.

    Background wins everywhere (foreground probabilities < 0.007) except at the 30 default boxes
    nearest each planted object, which decode to the object's box (+- 0.002) with confident,
    distinct scores. Per image: two far-apart objects of class 1 (both kept), two of class 2
    overlapping at IoU ~0.7 (the weaker suppressed), one of class 3..5; the last image is empty.
    So the CPU result is 4 detections per image, which the test checks first.
    """
    g = torch.Generator().manual_seed(seed)
    dboxes = default_boxes_300()
    a = dboxes.num_boxes
    locs = torch.randn(num_images, 4, a, generator=g) * 0.3
    logits = torch.rand(num_images, num_classes, a, generator=g) * 2 - 1
    logits[:, 0] += 7.0  # p(foreground) <= exp(1 - 6) everywhere
    c = [0.15, 0.5, 0.5, 0.85]
    objects = [([0.1, 0.1, 0.4, 0.45], 1), ([0.6, 0.55, 0.9, 0.9], 1), (c, 2),
               ([c[0] + 0.0618, c[1], c[2] + 0.0618, c[3]], 2), ([0.55, 0.1, 0.85, 0.35], 3)]
    for i in range(num_images - 1):
        used = torch.zeros(a, dtype=torch.bool)
        shift = torch.rand(2, generator=g) * 0.08
        for j, (box, cls) in enumerate(objects):
            box = torch.tensor(box) + shift.repeat(2)
            cls = cls + (i % 3 if cls == 3 else 0)
            iou = _box_iou(box[None], dboxes.ltrb)[0].masked_fill(used, -1)
            near = iou.topk(30).indices
            used[near] = True
            truth = box + torch.randn(30, 4, generator=g) * 0.002
            xywh = torch.cat(((truth[:, :2] + truth[:, 2:]) / 2, truth[:, 2:] - truth[:, :2]), dim=1)
            d = dboxes.xywh[near]
            locs[i, :2, near] = ((xywh[:, :2] - d[:, :2]) / (0.1 * d[:, 2:])).T
            locs[i, 2:, near] = ((xywh[:, 2:] / d[:, 2:]).log() / 0.2).T
            # Object j's scores: a band of its own (earlier objects score higher), 0.02 apart in logit.
            logits[i, :, near] = -1.0
            logits[i, 0, near] = 7.0
            logits[i, cls, near] = 9.0 + 0.6 * (len(objects) - j) + 0.02 * torch.randperm(30, generator=g)
    return locs, logits


def _box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    import torchvision

    return torchvision.ops.box_iou(boxes, others)


def assert_far_from_decisions(locs, logits, score_threshold: float = 0.05, iou_threshold: float = 0.45) -> None:
    """The fixture's premise, checked on the CPU: no candidate score within 1e-3 of the score
    threshold or within 1e-5 of another, no IoU of two same-class candidates within 1e-3 of the
    NMS threshold."""
    dboxes = default_boxes_300()
    boxes = BoxCoder(dboxes).decode(locs)
    scores = torch.softmax(logits.double(), dim=1).float()
    for i in range(logits.shape[0]):
        fg = scores[i, 1:]
        assert float((fg - score_threshold).abs().min()) > 1e-3
        for cls in range(1, logits.shape[1]):
            keep = scores[i, cls] > score_threshold
            s = scores[i, cls][keep].sort().values
            if s.numel() > 1:
                assert float((s[1:] - s[:-1]).min()) > 1e-5
                iou = _box_iou(boxes[i][keep], boxes[i][keep])
                off_diagonal = ~torch.eye(iou.shape[0], dtype=torch.bool)
                assert float((iou[off_diagonal] - iou_threshold).abs().min()) > 1e-3


@pytest.mark.parametrize("nms", ["auto", "matrix", "per_group", "offsets"])
def test_postprocessor_on_cuda_equals_cpu(nms):
    locs, logits = separable_outputs()
    assert_far_from_decisions(locs, logits)  # PostProcessor's defaults: score 0.05, NMS IoU 0.45 (SPEC §5)
    cpu = PostProcessor(default_boxes_300(), nms="per_group")
    want = cpu(locs, logits)
    assert [len(d) for d in want] == [4, 4, 4, 0]
    sizes = torch.tensor([[640, 480]] * locs.shape[0])
    got = PostProcessor(default_boxes_300(), nms=nms)(locs.to(GPU), logits.to(GPU), sizes.to(GPU))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.boxes.is_cuda and g.boxes_pixels is not None
        assert torch.equal(g.labels.cpu(), w.labels), i
        torch.testing.assert_close(g.scores.cpu(), w.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.boxes.cpu(), w.boxes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.boxes_pixels.cpu(), w.boxes * torch.tensor([640, 480, 640, 480]),
                                   rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- DALI


def test_dali_gpu_pipeline_targets_equal_cpu_pipeline(tmp_path):
    """Same seed: the GPU pipeline (nvJPEG, GPU resize/colour) draws the same crops, flips and
    colour parameters as the CPU pipeline (they are CPU operators in both), so boxes, labels and
    encoded targets are equal; the pixels differ only by decoder/resampler rounding."""
    from ssd300.data.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not importable here (pip install 'ssd300[dali]')")
    from ssd300.data.coco import CocoDetection
    from ssd300.data.dali import build_dali_train_loader
    from ssd300.data.synth import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "synth", num_train=16, num_val=1, seed=3)
    dataset = CocoDetection.from_root(root, "train")
    loaders = {device_id: build_dali_train_loader(dataset, 4, num_threads=1, seed=7, device_id=device_id)
               for device_id in (None, 0)}
    coder_cpu, coder_gpu = BoxCoder(default_boxes_300()), BoxCoder(default_boxes_300().to(GPU))
    compared = 0
    for epoch in range(2):
        for loader in loaders.values():
            loader.set_epoch(epoch)
        # Each epoch read to its end on both pipelines (DALI resets a pipeline at the epoch's end).
        cpu_batches, gpu_batches = list(loaders[None]), list(loaders[0])
        assert len(cpu_batches) == len(gpu_batches) == 4
        for cpu_batch, gpu_batch in zip(cpu_batches, gpu_batches):
            assert gpu_batch.images.is_cuda and gpu_batch.images.dtype == torch.uint8
            assert gpu_batch.images.shape == cpu_batch.images.shape == (4, 3, 300, 300)
            assert torch.equal(gpu_batch.image_ids, cpu_batch.image_ids)
            assert torch.equal(gpu_batch.num_boxes, cpu_batch.num_boxes)
            assert torch.equal(gpu_batch.labels, cpu_batch.labels)
            torch.testing.assert_close(gpu_batch.boxes, cpu_batch.boxes, rtol=0, atol=1e-6)
            want_targets, want_labels = coder_cpu.encode(cpu_batch.boxes, cpu_batch.labels, cpu_batch.num_boxes)
            moved = gpu_batch.to(GPU)
            got_targets, got_labels = coder_gpu.encode(moved.boxes, moved.labels, moved.num_boxes)
            assert torch.equal(got_labels.cpu(), want_labels)
            torch.testing.assert_close(got_targets.cpu(), want_targets, rtol=1e-5, atol=1e-4)
            difference = (gpu_batch.images.cpu().float() - cpu_batch.images.float()).abs()
            assert float(difference.mean()) < 4.0, "GPU and CPU pixels differ beyond decoder rounding"
            compared += 1
    assert compared == 8


# ----------------------------------------------------------------------------- checkpoints


_RESUME_ON_CPU = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from test_cuda import make_trainer, synthetic_batch
    from ssd300.checkpoint import load_checkpoint, load_model_weights

    assert not torch.cuda.is_available()
    checkpoint = load_checkpoint(sys.argv[1], map_location="cpu")
    trainer = make_trainer(torch.device("cpu"), amp=False, backbone="resnet18")
    load_model_weights(trainer.model, checkpoint)
    assert trainer.load_training_state(checkpoint)
    model = trainer.model.eval()
    with torch.no_grad():
        locs, logits = model(torch.load(sys.argv[2])["images"])
    torch.save({"locs": locs, "logits": logits}, sys.argv[2] + ".cpu")
    trainer.model.train()
    loss, _ = trainer.train_step(synthetic_batch(2, seed=5))
    print(json.dumps({"iteration": trainer.position.iteration, "loss": loss,
                      "momentum_on_cpu": all(not s["momentum_buffer"].is_cuda
                                             for s in trainer.optimizer.state.values())}))
""")


def test_checkpoint_saved_on_gpu_resumes_on_a_machine_without_cuda(tmp_path, no_tf32):
    trainer = make_trainer(GPU, amp=True, backbone="resnet18")
    amp_step(trainer, synthetic_batch(4))
    path = trainer.save(tmp_path / "gpu.pt")
    images = torch.randn(2, 3, 300, 300)
    torch.save({"images": images}, tmp_path / "input.pt")
    model = trainer.model.eval()
    with torch.no_grad():
        want_locs, want_logits = model(images.to(GPU).contiguous(memory_format=torch.channels_last))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", _RESUME_ON_CPU, str(path), str(tmp_path / "input.pt"),
                           str(REPO / "tests")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["iteration"] == trainer.position.iteration + 1 and report["momentum_on_cpu"]
    assert torch.isfinite(torch.tensor(report["loss"]))
    got = torch.load(str(tmp_path / "input.pt") + ".cpu")
    assert relative_error(got["locs"], want_locs) < 1e-4
    assert relative_error(got["logits"], want_logits) < 1e-4


# ----------------------------------------------------------------------------- Detector and export


def _images(count: int = 6):
    g = torch.Generator().manual_seed(1)
    # Smooth random images (noise upsampled): the network sees structure, not pixel noise.
    small = torch.randint(0, 256, (count, 3, 15, 20), dtype=torch.uint8, generator=g).float()
    big = torch.nn.functional.interpolate(small, size=(480, 640), mode="bilinear", align_corners=False)
    return [image.round().to(torch.uint8) for image in big]


def _matched_fraction(got, want, top: int = 20) -> float:
    """Share of ``want``'s best detections that ``got`` has too (same label, IoU > 0.9)."""
    found = total = 0
    for g, w in zip(got, want):
        for box, label in zip(w.boxes[:top], w.labels[:top]):
            total += 1
            same = g.labels == label
            if same.any() and float(_box_iou(box[None], g.boxes[same]).max()) > 0.9:
                found += 1
    return found / max(total, 1)


def test_detector_on_cuda_agrees_with_the_cpu(no_tf32):
    from ssd300.inference import Detector

    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=5)
    images = _images()
    cpu = Detector(model, device="cpu")
    gpu = Detector(model, device="cuda")
    gpu_amp = Detector(model, device="cuda", amp=True)
    assert gpu_amp.channels_last and next(gpu_amp.model.parameters()).is_cuda
    batch = torch.stack([cpu.transform(image) for image in images])
    want = cpu.predict_tensor(batch)
    for detector, tolerance in ((gpu, 1e-4), (gpu_amp, 3e-2)):
        got = detector.predict_tensor(batch)
        assert got[0].dtype == torch.float32
        assert relative_error(got[0], want[0]) < tolerance and relative_error(got[1], want[1]) < tolerance
    want_detections, got_detections = cpu(images), gpu(images)
    assert all(len(d) > 0 for d in want_detections)
    for det in got_detections:
        assert not det.boxes.is_cuda and det.image_size == (640, 480)
        assert float(det.boxes.min()) >= 0 and float(det.boxes[:, 2].max()) <= 640
    assert _matched_fraction(got_detections, want_detections) >= 0.9
    assert _matched_fraction(gpu_amp(images), want_detections) >= 0.5  # fp16 reorders near-equal scores


def test_export_from_a_cuda_model(tmp_path, no_tf32):
    """Exporting a model that lives on the GPU works; the TorchScript file runs on CUDA and
    agrees with the eager detector on the CPU."""
    from ssd300.export import build_export_module, export_model

    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=5).eval()
    eager = build_export_module(copy.deepcopy(model))
    images = torch.stack([torch.nn.functional.interpolate(i[None].float() / 255, size=(300, 300))[0]
                          for i in _images(4)])
    with torch.no_grad():
        want = eager(images)
    path = export_model(model.to(GPU), LabelMap.generic(5), tmp_path / "ssd300.pt", "torchscript")
    scripted = torch.jit.load(str(path), map_location="cuda")
    with torch.no_grad():
        boxes, scores, labels, counts = scripted(images.to(GPU))
    assert boxes.is_cuda and boxes.shape == want[0].shape and counts.shape == (4,)
    assert int(want[3].min()) > 0
    for i in range(4):
        n, m = int(counts[i]), int(want[3][i])
        assert abs(n - m) <= max(2, m // 20)
        top = min(20, n, m)
        assert torch.equal(labels[i, :top].cpu(), want[2][i, :top]) or \
            float((scores[i, :top].cpu() - want[1][i, :top]).abs().max()) < 1e-4
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):
        import onnxruntime

        onnx_path = export_model(SSD300("resnet18", num_classes=5).to(GPU), LabelMap.generic(5),
                                 tmp_path / "raw.onnx", "onnx", raw=True, exporter="legacy")
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        locs, _ = session.run(None, {"images": images.numpy()})
        assert locs.shape == (4, 4, 8732)


# ----------------------------------------------------------------------------- torchrun / NCCL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NCCL_DDP = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from test_cuda import make_trainer, synthetic_batch
    from ssd300.distributed import all_gather_objects, all_reduce_sum, broadcast_object

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    trainer = make_trainer(torch.device("cuda", 0), amp=True, backbone="resnet18")
    trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model, device_ids=[0])
    losses = [trainer.train_step(synthetic_batch(4, seed=i))[0] for i in range(3)]
    print(json.dumps({"backend": dist.get_backend(), "losses": losses,
                      "sum": all_reduce_sum(2.5, torch.device("cuda", 0)),
                      "gathered": all_gather_objects({"rank": dist.get_rank()}),
                      "broadcast": broadcast_object("from rank 0")}))
    dist.destroy_process_group()
""")


def _torchrun(args: list[str], env: dict[str, str]) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_torchrun_training_and_nccl(tmp_path):
    """``torchrun --nproc_per_node=1 ssd300 train`` on CUDA end to end; then NCCL itself: with one
    process our launcher needs no process group, so a DDP training run over an explicit NCCL
    group (and our collectives over it) covers what several GPUs would use."""
    from ssd300.data.synth import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_train=16, num_val=2, seed=1, num_classes=2)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
    save = tmp_path / "run"
    _torchrun(["-m", "ssd300", "train", "--data", str(data), "--backbone", "resnet18", "--epochs", "1",
               "--bs", "8", "--seed", "0", "--num-workers", "2", "--device", "cuda", "--evaluation",
               "--no-progress", "--save", str(save), "--json-summary", str(save / "summary.json")], env)
    summary = json.loads((save / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["world_size"] == 1
    assert summary["iterations"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert (save / "epoch_0.pt").is_file()

    script = tmp_path / "nccl_ddp.py"
    script.write_text(_NCCL_DDP)
    report = json.loads(_torchrun([str(script), str(REPO / "tests")], env).strip().splitlines()[-1])
    assert report["backend"] == "nccl"
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    assert report["sum"] == 2.5 and report["gathered"] == [{"rank": 0}] and report["broadcast"] == "from rank 0"
