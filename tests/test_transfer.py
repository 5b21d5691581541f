"""Transfer learning to other classes (ssd300.transfer, TrainConfig.init_from / freeze_backbone_epochs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssd300.checkpoint import model_checkpoint
from ssd300.errors import UserInputError
from ssd300.labels import LabelMap
from ssd300.train_config import TrainConfig, resolve_resume
from ssd300.transfer import class_mapping, init_from_checkpoint

SOURCE = LabelMap.from_categories([(1, "Person"), (2, "car"), (3, "dog")])
TARGET = LabelMap.from_categories([(7, "cat"), (9, "person"), (11, "DOG")])


@pytest.fixture()
def source(make_tiny_model):
    model = make_tiny_model(SOURCE.num_classes, seed=1)
    return model, model_checkpoint(model, SOURCE)


def test_matching_names_case_insensitive_background_always(source):
    assert class_mapping(SOURCE, TARGET) == {0: 0, 2: 1, 3: 3}


def test_mapped_classifier_rows_equal_the_source_rows_for_every_anchor(source, make_tiny_model):
    src_model, checkpoint = source
    target = make_tiny_model(TARGET.num_classes, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    summary = init_from_checkpoint(target, checkpoint, TARGET, source="src.pt")
    assert summary.mapped == (("person", "Person"), ("DOG", "dog")) and summary.new == ("cat",)
    assert summary.kept == sum(1 for k in fresh if not k.startswith("conf."))
    src_state, state = src_model.state_dict(), target.state_dict()
    for head, nd in enumerate(target.boxes_per_location):
        for kind in ("weight", "bias"):
            key = f"conf.{head}.{kind}"
            for t, s in ((0, 0), (2, 1), (3, 3)):
                assert torch.equal(state[key][t * nd:(t + 1) * nd], src_state[key][s * nd:(s + 1) * nd]), (key, t)
            # the new class keeps the model's own (reference) initialisation
            assert torch.equal(state[key][nd:2 * nd], fresh[key][nd:2 * nd])
        assert torch.equal(state[f"loc.{head}.weight"], src_state[f"loc.{head}.weight"])
    for key in src_state:
        if not key.startswith("conf."):
            assert torch.equal(state[key], src_state[key]), key
    # The consequence that matters: the mapped classes' logits are the source's, at every one of the 8732 boxes.
    images = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        src_locs, src_logits = src_model.eval()(images)
        locs, logits = target.eval()(images)
    torch.testing.assert_close(locs, src_locs)
    for t, s in ((0, 0), (2, 1), (3, 3)):
        torch.testing.assert_close(logits[:, t], src_logits[:, s])
    assert "1 new (cat)" in summary.describe("src.pt") and "person <- Person" in summary.describe("src.pt")


def test_another_backbone_is_refused_in_one_line(source):
    from ssd300.model import SSD300

    with pytest.raises(UserInputError, match=r"src.pt: its backbone is resnet18 but the model's is resnet34"):
        init_from_checkpoint(SSD300("resnet34", num_classes=4), source[1], TARGET, source="src.pt")


def test_init_from_contradicts_checkpoint_and_resume_drops_it(tiny_checkpoint, tmp_path):
    with pytest.raises(UserInputError, match="init_from contradicts checkpoint") as err:
        TrainConfig(init_from=tiny_checkpoint, checkpoint=tiny_checkpoint)
    assert err.value.fields == ("init_from", "checkpoint")
    with pytest.raises(UserInputError, match="freeze_backbone_epochs must be >= 0"):
        TrainConfig(freeze_backbone_epochs=-1)
    with pytest.raises(UserInputError, match="backbone_weights must be one of imagenet, none"):
        TrainConfig(backbone_weights="coco")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(tiny_checkpoint.read_bytes())
    resumed = resolve_resume(TrainConfig(init_from=tiny_checkpoint, save=run, resume=True))
    assert resumed.init_from is None and resumed.checkpoint is not None  # the run's own checkpoint


def test_frozen_trunk_has_no_gradients_and_keeps_batchnorm_in_eval(make_tiny_model):
    model = make_tiny_model(3)
    trunk = model.feature_extractor
    trunk.freeze(True)
    model.train()
    assert all(not p.requires_grad for p in trunk.parameters())
    assert all(not m.training for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.additional_blocks[0][1].training  # the rest trains
    trunk.freeze(False)
    model.train()
    assert all(p.requires_grad for p in trunk.parameters())
    assert all(m.training for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _settings(tmp_path: Path) -> dict:
    return dict(backbone="resnet18", backbone_weights="none", batch_size=2, evaluation=(), seed=0, num_workers=0,
                device="cpu", amp=False, progress=False, iou_crop=False, warmup=0, multistep=())


@pytest.mark.slow  # two tiny training runs
def test_init_from_run_freezes_the_trunk_and_resumes_exactly(synthetic_dataset, make_tiny_checkpoint,
                                                              tmp_path):
    data = synthetic_dataset(4, 1, seed=3, num_classes=3, max_objects=1, min_width=100, max_width=120,
                                     min_height=100, max_height=120)
    init = make_tiny_checkpoint(tmp_path / "init.pt", LabelMap.from_categories([(1, "Disc"), (2, "star")]))
    source = torch.load(init, weights_only=True)["model"]
    from ssd300.training import train

    config = TrainConfig(data=data, epochs=2, init_from=init, freeze_backbone_epochs=1, save=tmp_path / "a",
                         **_settings(tmp_path))
    straight = train(config)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    messages = [r.get("message", "") for r in log]
    assert any("1 classes mapped (disc <- Disc); 2 new (rectangle, triangle)" in m for m in messages), messages
    epoch0 = torch.load(tmp_path / "a" / "epoch_0.pt", weights_only=True)["model"]
    trunk = [k for k in source if k.startswith("feature_extractor.")]
    assert all(torch.equal(epoch0[k], source[k]) for k in trunk)  # frozen: weights and BN statistics
    assert not torch.equal(epoch0["loc.0.weight"], source["loc.0.weight"])
    final = torch.load(straight.checkpoint, weights_only=True)["model"]
    assert not all(torch.equal(final[k], source[k]) for k in trunk)  # epoch 1 trains it
    # The same run stopped after epoch 0 and resumed: identical weights (init_from applies to the start only).
    train(config.replace(epochs=1, save=tmp_path / "b"))
    resumed = train(config.replace(save=tmp_path / "b", resume=True))
    again = torch.load(resumed.checkpoint, weights_only=True)["model"]
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_transfer.py"
    spec = importlib.util.spec_from_file_location("bench_transfer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keep_categories_keeps_only_images_of_the_named_classes(synthetic_dataset, tmp_path):
    data = synthetic_dataset(12, 1, seed=5, num_classes=5, max_objects=2)
    out, kept = _bench().keep_categories(data / "annotations" / "instances_train.json", ("disc", "cross", "ring"),
                                         tmp_path / "b.json")
    subset = json.loads(out.read_text())
    assert [c["name"] for c in subset["categories"]] == ["disc", "cross", "ring"]
    assert 0 < kept == len(subset["images"]) < 12
    assert {a["category_id"] for a in subset["annotations"]} <= {1, 2, 3}
    ids = {im["id"] for im in subset["images"]}
    assert all(a["image_id"] in ids for a in subset["annotations"])


@pytest.mark.slow  # pretraining + two fine-tuning runs of a ResNet-18 SSD300 on a few synthetic images
def test_mapped_fine_tune_starts_with_a_lower_loss_than_scratch(tmp_path):
    figures = _bench().run_transfer(tmp_path, train=16, val=4, pretrain_epochs=2, epochs=1, batch_size=4, seed=0,
                                    evaluate=False)
    scratch, mapped = figures["scratch"]["first_epoch_loss"], figures["from A"]["first_epoch_loss"]
    # Same images, order and seed; the mean over the epoch's iterations, with a wide margin (measured ~0.65x).
    assert mapped < 0.85 * scratch, (mapped, scratch)


def test_cli_flags_for_transfer_and_their_messages(tiny_checkpoint, capsys):
    from ssd300.cli import main
    from ssd300.commands.train import add_arguments, config_from_args

    assert main(["train", "--init-from", str(tiny_checkpoint), "--checkpoint", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssd300 train: error: --init-from contradicts --checkpoint") and "\n" not in err
    assert main(["train", "--freeze-backbone", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "ssd300 train: error: --freeze-backbone must be >= 0, got -1"
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--init-from", str(tiny_checkpoint), "--freeze-backbone", "2",
                                                 "--backbone-weights", "imagenet"]))
    assert (config.init_from, config.freeze_backbone_epochs, config.backbone_weights) == (tiny_checkpoint, 2,
                                                                                          "imagenet")
