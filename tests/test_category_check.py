"""A checkpoint whose categories differ from the dataset's (ids or names) is refused in one line
naming both files and the first difference: by ``evaluate`` (it used to evaluate silently to AP 0
when the ids overlapped) and where training resumes or fine-tunes from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssd300.cli import main
from ssd300.data.synth import category_list, generate_synthetic_dataset
from ssd300.model import SSD300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=2, num_val=2, seed=0,
                                      num_classes=2, max_objects=2, min_width=240, max_width=260,
                                      min_height=200, max_height=220)


def _checkpoint(folder: Path, name: str, categories: list[tuple[int, str]]) -> Path:
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=len(categories) + 1)
    path = folder / name
    torch.save({"model": model.state_dict(),
                "label_map": {0: "background", **{i + 1: n for i, (_, n) in enumerate(categories)}},
                "category_ids": {0: 0, **{i + 1: c for i, (c, _) in enumerate(categories)}}}, path)
    return path


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _synth_categories() -> list[tuple[int, str]]:
    return [(c["id"], c["name"]) for c in category_list(2)]


def test_evaluate_refuses_same_ids_with_other_names(tmp_path, capsys, data_dir):
    (first_id, first_name), (second_id, second_name) = _synth_categories()
    ckpt = _checkpoint(tmp_path, "renamed.pt", [(first_id, first_name), (second_id, "zebra")])
    err = _one_line_error(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data_dir),
                                   "--num-workers", "0", "--device", "cpu"])
    val_json = data_dir / "annotations" / "instances_val.json"
    assert f"checkpoint {ckpt} and annotation file {val_json} have different categories" in err
    assert f"category id {second_id} is 'zebra' in the checkpoint but '{second_name}' in the dataset" in err


def test_evaluate_refuses_other_ids(tmp_path, capsys, data_dir):
    (first_id, first_name), (second_id, second_name) = _synth_categories()
    ckpt = _checkpoint(tmp_path, "other_ids.pt", [(first_id + 10, first_name), (second_id + 10, second_name)])
    err = _one_line_error(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data_dir),
                                   "--num-workers", "0", "--device", "cpu"])
    assert str(ckpt) in err and "instances_val.json" in err
    assert f"category id {first_id} ('{first_name}') of the dataset is not in the checkpoint" in err


def test_evaluate_accepts_a_dataset_with_a_subset_of_the_checkpoints_categories(tmp_path, data_dir):
    from ssd300 import TrainConfig, evaluate

    categories = [*_synth_categories(), (77, "kite")]  # the model knows one class more than the data has
    ckpt = _checkpoint(tmp_path, "superset.pt", categories)
    metrics = evaluate(TrainConfig(mode="evaluation", checkpoint=ckpt, data=data_dir, num_workers=0,
                                   device="cpu", eval_batch_size=2, progress=False))
    assert metrics is not None and metrics.num_images == 2


def test_fine_tuning_from_a_checkpoint_with_other_names_is_refused(tmp_path, capsys, data_dir):
    (first_id, _), (second_id, second_name) = _synth_categories()
    ckpt = _checkpoint(tmp_path, "renamed.pt", [(first_id, "apple"), (second_id, second_name)])
    err = _one_line_error(capsys, ["train", "--checkpoint", str(ckpt), "--data", str(data_dir), "--epochs", "1",
                                   "--bs", "2", "--num-workers", "0", "--device", "cpu", "--evaluation"])
    train_json = data_dir / "annotations" / "instances_train.json"
    assert f"checkpoint {ckpt} and annotation file {train_json} have different categories" in err
    assert f"category id {first_id} is 'apple' in the checkpoint" in err
