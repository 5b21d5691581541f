"""Checkpoints: round trip, reference compatibility, refusal of pickled code, atomic writes, mismatches."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from ssd300 import checkpoint as ckpt
from ssd300.checkpoint import (
    ModelSpec,
    infer_architecture,
    load_checkpoint,
    load_model,
    load_model_weights,
    resolve_model_spec,
    model_checkpoint,
    save_checkpoint,
)
from ssd300.errors import UserInputError
from ssd300.labels import LabelMap
from ssd300.model import SSD300


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    m = make_tiny_model(4)
    # make BN buffers non-default so that a lost buffer would show
    for module in m.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.num_batches_tracked.fill_(7)
    return m


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return LabelMap.from_categories([(3, "cat"), (7, "dog"), (11, "fox")])


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- round trip ------------------------------------------------------------------------------


def test_round_trip(model: SSD300, label_map: LabelMap, tmp_path: Path) -> None:
    path = tmp_path / "run" / "epoch_3.pt"  # the folder is created
    save_checkpoint(path, model_checkpoint(model, label_map, epoch=3, iteration=120, args={"lr": 0.1}))
    assert _files(path.parent) == ["epoch_3.pt"]  # no temp file left behind

    loaded, loaded_labels, stored = load_model(path)
    _assert_same_weights(loaded, model)
    assert loaded_labels == label_map
    assert not loaded.training
    assert (loaded.backbone_name, loaded.num_classes) == ("resnet18", 4)
    assert stored["epoch"] == 3 and stored["iteration"] == 120 and stored["args"] == {"lr": 0.1}
    assert stored["label_map"] == {0: "background", 1: "cat", 2: "dog", 3: "fox"}
    assert stored["category_ids"] == {0: 0, 1: 3, 2: 7, 3: 11}
    assert (stored["backbone"], stored["num_classes"]) == ("resnet18", 4)

    fresh = SSD300("resnet18", num_classes=4)
    assert load_model_weights(fresh, path)["epoch"] == 3
    _assert_same_weights(fresh, model)


def test_model_checkpoint_unwraps_and_checks_label_map(model: SSD300, label_map: LabelMap) -> None:
    wrapper = nn.Module()
    wrapper.module = model  # what DataParallel/DDP look like
    built = model_checkpoint(wrapper, label_map)
    assert all(not k.startswith("module.") for k in built["model"])
    with pytest.raises(ValueError, match="label map has 3 classes but the model has 4"):
        model_checkpoint(model, LabelMap.generic(3))


def test_reference_style_checkpoint_loads_strict(tmp_path: Path, make_tiny_model) -> None:
    reference_model = make_tiny_model(81, seed=1)
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[43, 54], gamma=0.1)
    for p in reference_model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    coco = LabelMap.coco2017()
    reference = {
        "model": {f"module.{k}": v for k, v in reference_model.state_dict().items()},
        "epoch": 5,
        "iteration": 4000,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "label_map": dict(enumerate(coco.names)),  # the reference's {label: name}
    }
    assert isinstance(reference["scheduler"]["milestones"], collections.Counter)
    path = tmp_path / "reference.pt"
    torch.save(reference, path)  # plain torch.save, as the reference does

    loaded, labels, stored = load_model(path, map_location=torch.device("cpu"))
    _assert_same_weights(loaded, reference_model)
    assert (loaded.backbone_name, loaded.num_classes) == ("resnet18", 81)
    assert labels == coco  # COCO names -> COCO category ids
    assert stored["scheduler"]["milestones"] == collections.Counter({43: 1, 54: 1})
    first_conv = reference_model.feature_extractor.feature_extractor[0]
    assert stored["optimizer"]["state"][0]["momentum_buffer"].shape == first_conv.weight.shape


def test_bare_state_dict_loads(model: SSD300, tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    loaded, labels, _ = load_model(path)
    _assert_same_weights(loaded, model)
    assert labels == LabelMap.generic(4)


@pytest.mark.parametrize(
    "name,blocks",
    [("resnet18", 2), ("resnet34", 6), ("resnet50", 6), ("resnet101", 23), ("resnet152", 36)],
)
def test_infer_architecture(name: str, blocks: int) -> None:
    with torch.device("meta"):
        state = SSD300(name, num_classes=9).state_dict()
    assert infer_architecture(state) == (name, 9)
    assert infer_architecture({f"module.{k}": v for k, v in state.items()}) == (name, 9)
    layer3 = {k.split(".")[3] for k in state if k.startswith("feature_extractor.feature_extractor.6.")}
    assert len(layer3) == blocks


def test_infer_architecture_rejects_other_state_dicts() -> None:
    with pytest.raises(UserInputError, match="not an SSD300 state dict"):
        infer_architecture({"conv1.weight": torch.zeros(1)}, source="x.pt")


# --- untrusted and broken files --------------------------------------------------------------


class _WritesMarker:
    """Unpickling this would create a file: the signature of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_not_executed(model: SSD300, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"model": model.state_dict(), "epoch": _WritesMarker(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(UserInputError, match=f"checkpoint {path}: refused: .*could run code") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserInputError, match=f"checkpoint not found: {missing}"):
        load_model(missing)

    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(UserInputError, match=f"checkpoint {text}: not a PyTorch file"):
        load_checkpoint(text)

    good = tmp_path / "good.pt"
    torch.save({"model": {"loc.0.weight": torch.zeros(4, 4)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserInputError, match=f"checkpoint {truncated}: not a PyTorch file, or truncated"):
        load_checkpoint(truncated)

    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(UserInputError, match=f"checkpoint {empty}: not a PyTorch file"):
        load_checkpoint(empty)


def test_files_without_model_weights(tmp_path: Path) -> None:
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(UserInputError, match=f"checkpoint {a_list}: expected a dict, found list"):
        load_checkpoint(a_list)

    no_weights = tmp_path / "no_weights.pt"
    torch.save({"epoch": 3, "label_map": {0: "background"}}, no_weights)
    with pytest.raises(UserInputError, match=f"checkpoint {no_weights}: no model weights"):
        load_checkpoint(no_weights)

    classifier = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7), "fc.bias": torch.zeros(2)}, classifier)
    with pytest.raises(UserInputError, match=f"checkpoint {classifier}: not an SSD300 state dict"):
        load_model(classifier)


# --- mismatches ------------------------------------------------------------------------------


def test_requested_architecture_must_match(model: SSD300, label_map: LabelMap, tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_checkpoint(model, label_map))
    with pytest.raises(UserInputError, match=f"checkpoint {path}: has 4 classes .* but 81 were requested"):
        load_model(path, num_classes=81)
    with pytest.raises(UserInputError, match=f"checkpoint {path}: backbone is resnet18 but resnet50 was requested"):
        load_model(path, backbone="resnet50")
    with pytest.raises(UserInputError, match="unknown backbone"):
        load_model(path, backbone="vgg16")
    assert load_model(path, backbone="resnet18", num_classes=4)[0].num_classes == 4

    with torch.device("meta"):
        other_classes = SSD300("resnet18", num_classes=81)
        other_backbone = SSD300("resnet34", num_classes=4)
    with pytest.raises(UserInputError, match="has 4 classes .* but 81 were requested"):
        load_model_weights(other_classes, path)
    with pytest.raises(UserInputError, match="backbone is resnet18 but resnet34 was requested"):
        load_model_weights(other_backbone, torch.load(path, weights_only=True))


def test_weights_that_contradict_their_metadata(model: SSD300, label_map: LabelMap, tmp_path: Path) -> None:
    stored = model_checkpoint(model, label_map)
    stored["num_classes"] = 5  # the conf heads say 4
    stored["label_map"] = {i: f"c{i}" for i in range(5)}
    stored["category_ids"] = {i: i for i in range(5)}
    path = tmp_path / "inconsistent.pt"
    save_checkpoint(path, stored)
    # one rule: the weights decide the architecture; stored entries that contradict them are refused
    with pytest.raises(UserInputError,
                       match=r"inconsistent.pt: its 'num_classes' entry \(5\) contradicts its weights \(4\)"):
        load_model(path)
    stored["num_classes"], stored["backbone"] = 4, "resnet50"
    save_checkpoint(path, stored)
    with pytest.raises(UserInputError,
                       match=r"its 'backbone' entry \('resnet50'\) contradicts its weights \('resnet18'\)"):
        load_model(path)


def test_resolve_model_spec_one_rule_for_checkpoint_dataset_and_flags(model: SSD300, label_map: LabelMap) -> None:
    data = LabelMap.generic(label_map.num_classes)
    # no checkpoint: the explicit backbone (default resnet50) and the dataset's label map
    assert resolve_model_spec(None, data_label_map=data) == ModelSpec("resnet50", data)
    assert resolve_model_spec(None, data_label_map=data, backbone="resnet18").backbone == "resnet18"
    # a checkpoint: its weights decide; its label map names the classes
    stored = model_checkpoint(model, label_map)
    assert resolve_model_spec(stored) == ModelSpec("resnet18", label_map)
    with pytest.raises(UserInputError, match="backbone is resnet18 but resnet34 was requested"):
        resolve_model_spec(stored, backbone="resnet34")
    # a bare state dict (no label map) takes the dataset's, which must have as many classes
    bare = {"model": model.state_dict()}
    assert resolve_model_spec(bare, data_label_map=data).label_map == data
    with pytest.raises(UserInputError, match="has 4 classes .* but the dataset has 5"):
        resolve_model_spec(bare, data_label_map=LabelMap.generic(label_map.num_classes + 1))
    with pytest.raises(UserInputError, match="checkpoint and the dataset have different categories: category id 1"):
        resolve_model_spec(stored, data_label_map=LabelMap.generic(3))


def test_missing_and_unexpected_keys_are_reported(model: SSD300, tmp_path: Path) -> None:
    state = dict(model.state_dict())
    del state["loc.3.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pt"
    torch.save({"model": state}, path)
    with pytest.raises(UserInputError,
                       match=r"1 missing keys \(e.g. loc.3.bias\); 1 unexpected keys \(e.g. extra.weight\)"):
        load_model(path)


# --- atomic save -----------------------------------------------------------------------------


def test_crash_mid_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"loc.0.weight": torch.ones(2)}, "epoch": 1})
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reached the disk before the failure
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"loc.0.weight": torch.zeros(2)}, "epoch": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert _files(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    for epoch in (1, 2):
        save_checkpoint(path, {"model": {"loc.0.weight": torch.full((2,), float(epoch))}, "epoch": epoch})
    stored = load_checkpoint(path)
    assert stored["epoch"] == 2 and torch.equal(stored["model"]["loc.0.weight"], torch.full((2,), 2.0))
    assert _files(tmp_path) == ["last.pt"]
    assert os.stat(path).st_size > 0
