"""SSD300 model and ResNet trunk: shapes, reference key names, strides, init, layout, precision."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torchvision import models

from ssd300.backbone import BACKBONE_CHANNELS, ResNetTrunk
from ssd300.errors import UserInputError
from ssd300.model import SSD300, fuse_for_inference

NUM_DEFAULTS = (4, 6, 6, 6, 4, 4)  # SPEC §1
MAP_SIZES = (38, 19, 10, 5, 3, 1)
MID_CHANNELS = (256, 256, 128, 128, 128)
TORCHVISION = {
    "resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
    "resnet101": models.resnet101, "resnet152": models.resnet152,
}


@pytest.fixture(scope="module")
def small_model(make_tiny_model) -> SSD300:
    model = make_tiny_model(3).eval()
    _randomise_batchnorm(model)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # One image keeps the suite fast on 2 shared cores; layout and numerics do not depend on N.
    return torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(small_model: SSD300, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(head inputs, locs, logits) of one fp32 forward of the small model."""
    features, (locs, logits) = _forward_with_head_inputs(small_model, images)
    return features, locs, logits


def _randomise_batchnorm(model: nn.Module) -> None:
    # Fresh BN layers are identities in eval mode; random statistics make equivalence tests bite.
    gen = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def _forward_with_head_inputs(model: SSD300, x: torch.Tensor):
    captured: list[torch.Tensor] = []
    hooks = [head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0])) for head in model.loc]
    try:
        with torch.no_grad():
            outputs = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, outputs


# --- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONE_CHANNELS))
def test_channel_table_per_backbone(name: str) -> None:
    with torch.device("meta"):
        model = SSD300(name, num_classes=5)
    channels = BACKBONE_CHANNELS[name]
    assert model.feature_extractor.out_channels == channels[0]
    last_conv = [m for m in model.feature_extractor.feature_extractor[6][-1].modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.out_channels == channels[0]
    for i, block in enumerate(model.additional_blocks):
        assert (block[0].in_channels, block[0].out_channels) == (channels[i], MID_CHANNELS[i])
        assert (block[3].in_channels, block[3].out_channels) == (MID_CHANNELS[i], channels[i + 1])
    for i, (loc, conf) in enumerate(zip(model.loc, model.conf)):
        assert loc.in_channels == conf.in_channels == channels[i]
        assert (loc.out_channels, conf.out_channels) == (NUM_DEFAULTS[i] * 4, NUM_DEFAULTS[i] * 5)
    assert (model.backbone_name, model.num_classes) == (name, 5)


def test_resnet50_feature_maps_and_outputs() -> None:
    torch.manual_seed(0)
    model = SSD300().eval()
    features, (locs, logits) = _forward_with_head_inputs(model, torch.randn(1, 3, 300, 300))
    maps = [tuple(f.shape[1:]) for f in features]
    assert maps == [(1024, 38, 38), (512, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]
    assert locs.shape == (1, 4, 8732) and logits.shape == (1, 81, 8732)


def test_resnet18_outputs_match_spec_sizes(reference) -> None:
    features, locs, logits = reference
    maps = [tuple(f.shape[1:]) for f in features]
    assert maps == [(c, s, s) for c, s in zip(BACKBONE_CHANNELS["resnet18"], MAP_SIZES)]
    assert locs.shape == (1, 4, 8732) and logits.shape == (1, 3, 8732)
    assert locs.dtype == logits.dtype == torch.float32
    assert sum(nd * s * s for nd, s in zip(NUM_DEFAULTS, MAP_SIZES)) == 8732


def _expected_keys(name: str, num_classes: int) -> list[str]:
    """The reference's state-dict names (SPEC §1), built from torchvision's ResNet keys."""
    child_index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
    keys = []
    for key in TORCHVISION[name](weights=None).state_dict():
        child, rest = key.split(".", 1)
        if child in child_index:
            keys.append(f"feature_extractor.feature_extractor.{child_index[child]}.{rest}")
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i in range(5):
        for j in (0, 3):
            keys.append(f"additional_blocks.{i}.{j}.weight")
            keys.extend(f"additional_blocks.{i}.{j + 1}.{p}" for p in bn)
    for head in ("loc", "conf"):
        keys.extend(f"{head}.{i}.{p}" for i in range(6) for p in ("weight", "bias"))
    return keys


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_keys_are_the_references(name: str) -> None:
    with torch.device("meta"):
        model = SSD300(name, num_classes=81)
    keys = list(model.state_dict())
    assert keys == _expected_keys(name, 81)
    assert keys[0] == "feature_extractor.feature_extractor.0.weight"
    assert keys[-1] == "conf.5.bias"
    assert sum(k.startswith("additional_blocks.") for k in keys) == 5 * 12
    assert sum(k.startswith(("loc.", "conf.")) for k in keys) == 24
    if name == "resnet50":
        assert len(keys) == 342
        assert "feature_extractor.feature_extractor.6.5.conv3.weight" in keys
        assert not any(k.startswith("feature_extractor.feature_extractor.7") for k in keys)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_conv4_first_block_has_stride_one(name: str) -> None:
    with torch.device("meta"):
        trunk = ResNetTrunk(name)
    layer2, layer3 = trunk.feature_extractor[5], trunk.feature_extractor[6]
    block = layer3[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
    assert block.downsample[0].stride == (1, 1)
    # layer2 keeps torchvision's stride 2 (the trunk's total stride is 8, not 4)
    assert layer2[0].downsample[0].stride == (2, 2)
    assert len(trunk.feature_extractor) == 7


def test_xavier_uniform_init_for_new_weights_only(make_tiny_model) -> None:
    model = make_tiny_model(3)
    for part in (model.additional_blocks, model.loc, model.conf):
        for module in part.modules():
            if isinstance(module, nn.Conv2d):
                w = module.weight
                fan_in = w.shape[1] * w.shape[2] * w.shape[3]
                fan_out = w.shape[0] * w.shape[2] * w.shape[3]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                assert w.abs().max() <= bound + 1e-7
                assert w.abs().max() > 0.95 * bound  # torch's default bound 1/sqrt(fan_in) is far smaller
                assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
                if module.bias is not None:  # PyTorch's default bias init is untouched
                    default = 1 / math.sqrt(fan_in)
                    assert 0 < module.bias.abs().max() <= default
            if isinstance(module, nn.BatchNorm2d):
                assert torch.equal(module.weight, torch.ones_like(module.weight))
    # the trunk keeps torchvision's init: kaiming normal (fan_out) for conv1
    w = model.feature_extractor.feature_extractor[0].weight
    assert abs(w.std().item() - math.sqrt(2 / (64 * 49))) < 0.02


def test_invalid_arguments_are_user_errors() -> None:
    with pytest.raises(UserInputError, match="unknown backbone 'resnet42'"):
        SSD300("resnet42")
    with pytest.raises(UserInputError, match="num_classes"):
        SSD300("resnet18", num_classes=1)
    with pytest.raises(UserInputError, match="num_classes"):
        SSD300("resnet18", num_classes=2.5)  # type: ignore[arg-type]


# --- layout and numerics ---------------------------------------------------------------------


def test_coordinate_major_layout_matches_head_outputs(small_model: SSD300, reference) -> None:
    features, locs, logits = reference
    with torch.no_grad():
        offset = 0
        for k, feature in enumerate(features):
            nd, size = NUM_DEFAULTS[k], MAP_SIZES[k]
            loc_out = small_model.loc[k](feature)  # (N, nd*4, H, W)
            conf_out = small_model.conf[k](feature)  # (N, nd*C, H, W)
            # Plain loop oracle: box index anchor*H*W + row*W + col, channel = coord*nd + anchor.
            for n in range(locs.shape[0]):
                for anchor in range(nd):
                    for row in {0, size // 2, size - 1}:
                        for col in {0, size - 1}:
                            box = offset + anchor * size * size + row * size + col
                            for coord in range(4):
                                assert locs[n, coord, box] == loc_out[n, coord * nd + anchor, row, col]
                            for cls in range(3):
                                assert logits[n, cls, box] == conf_out[n, cls * nd + anchor, row, col]
            # and the whole map, slice by slice
            for anchor in range(nd):
                block = slice(offset + anchor * size * size, offset + (anchor + 1) * size * size)
                for coord in range(4):
                    assert torch.equal(locs[:, coord, block], loc_out[:, coord * nd + anchor].flatten(1))
            offset += nd * size * size
        assert offset == 8732


def test_bf16_autocast_on_cpu_is_finite_and_close(small_model: SSD300, images: torch.Tensor, reference) -> None:
    _, ref_locs, ref_logits = reference
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            locs, logits = small_model(images)
    assert locs.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    for out, ref in ((locs, ref_locs), (logits, ref_logits)):
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_channels_last_equals_contiguous(small_model: SSD300, images: torch.Tensor, reference) -> None:
    ref = reference[1:]
    with torch.no_grad():
        model_cl = small_model.to(memory_format=torch.channels_last)
        try:
            out = model_cl(images.contiguous(memory_format=torch.channels_last))
        finally:
            small_model.to(memory_format=torch.contiguous_format)
    for o, r in zip(out, ref):
        assert o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_train_mode_backward_reaches_every_parameter(images: torch.Tensor, make_tiny_model) -> None:
    model = make_tiny_model(3).train()
    locs, logits = model(images.expand(2, -1, -1, -1))  # BN on the 1x1 map needs N > 1 in training
    (locs.square().mean() + logits.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- BatchNorm folding -----------------------------------------------------------------------


def test_fused_model_is_equivalent_and_has_no_batchnorm(small_model: SSD300, images: torch.Tensor, reference) -> None:
    fused = fuse_for_inference(small_model)
    assert not fused.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in small_model.modules())  # original untouched
    ref = reference[1:]
    with torch.no_grad():
        out = fused(images)
        out_cl = fused.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    for o, o_cl, r in zip(out, out_cl, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(o_cl, r, rtol=1e-4, atol=2e-4)
    assert small_model.fuse().num_classes == 3


# --- export friendliness ---------------------------------------------------------------------


def test_torchscript_script_and_trace(small_model: SSD300, images: torch.Tensor, reference) -> None:
    ref = reference[1:]
    with torch.no_grad():
        scripted = torch.jit.script(small_model)
        torch.testing.assert_close(scripted(images), ref)
        # traced on another input: nothing data-dependent was baked in
        traced = torch.jit.trace(small_model, torch.zeros_like(images), check_trace=False)
        torch.testing.assert_close(traced(images), ref)


def test_onnx_export_runs_in_onnxruntime(small_model: SSD300, images: torch.Tensor, reference, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = os.fspath(tmp_path / "ssd.onnx")
    x = images
    torch.onnx.export(small_model, (x,), path, input_names=["images"], output_names=["locs", "logits"],
                      dynamo=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    locs, logits = session.run(None, {"images": x.numpy()})
    _, ref_locs, ref_logits = reference
    torch.testing.assert_close(torch.from_numpy(locs), ref_locs, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits, rtol=1e-3, atol=1e-3)


# --- trunk weights from a local torchvision file ---------------------------------------------


def _torchvision_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TORCHVISION[name](weights=None).state_dict()


def test_backbone_weights_load_from_torchvision_file(tmp_path) -> None:
    state = _torchvision_state("resnet18", seed=5)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = SSD300("resnet18", num_classes=3, backbone_path=path)
    trunk = model.feature_extractor.feature_extractor
    assert torch.equal(trunk[0].weight, state["conv1.weight"])
    assert torch.equal(trunk[6][1].bn2.running_var, state["layer3.1.bn2.running_var"])
    assert torch.equal(trunk[5][0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    # wrapped, DataParallel-prefixed, and without fc: the same weights
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    trunk2 = ResNetTrunk("resnet18", tmp_path / "wrapped.pth")
    for (k, a), b in zip(trunk2.state_dict().items(), trunk.state_dict().values()):
        assert torch.equal(a, b), k


def test_backbone_weights_wrong_files(tmp_path) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(UserInputError, match=f"backbone weights not found: {missing}"):
        ResNetTrunk("resnet18", missing)

    not_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(UserInputError, match=f"{not_dict}: not a state dict"):
        ResNetTrunk("resnet18", not_dict)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a torch file")
    with pytest.raises(UserInputError, match=f"{garbage}: not a PyTorch file"):
        ResNetTrunk("resnet18", garbage)

    r34 = tmp_path / "resnet34.pth"
    torch.save(_torchvision_state("resnet34", 0), r34)
    with pytest.raises(UserInputError, match=f"{r34}: does not match torchvision's resnet18: .*unexpected keys"):
        ResNetTrunk("resnet18", r34)
    with pytest.raises(UserInputError, match=f"{r34}: does not match torchvision's resnet50: .*missing keys"):
        ResNetTrunk("resnet50", r34)

    reshaped = _torchvision_state("resnet18", 0)
    reshaped["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(reshaped, bad_shape)
    with pytest.raises(UserInputError,
                       match=r"conv1.weight has shape \(64, 1, 7, 7\), resnet18 expects \(64, 3, 7, 7\)"):
        ResNetTrunk("resnet18", bad_shape)


def test_head_boxes_per_cell_follow_the_default_box_geometry(monkeypatch):
    # One owner: a geometry with other aspect ratios changes the heads, no second table to update.
    import dataclasses

    import ssd300.model as model_module
    from ssd300.default_boxes import DefaultBoxesConfig

    @dataclasses.dataclass(frozen=True)
    class Squarer(DefaultBoxesConfig):
        aspect_ratios: tuple[tuple[int, ...], ...] = ((), (2,), (2,), (2,), (), ())

    assert SSD300("resnet18", num_classes=3).boxes_per_location == DefaultBoxesConfig().boxes_per_location
    monkeypatch.setattr(model_module, "DefaultBoxesConfig", Squarer)
    model = SSD300("resnet18", num_classes=3)
    assert [head.out_channels for head in model.loc] == [4 * n for n in (2, 4, 4, 4, 2, 2)]
    assert [head.out_channels for head in model.conf] == [3 * n for n in (2, 4, 4, 4, 2, 2)]
