"""A resumed run keeps its history (metrics.json and curves.png cover the whole run; an evaluation
a signal interrupted is redone on resume) and one numbering (0-based epochs and iterations) holds
for the curves' axes, the skip summary and the log.jsonl records."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import ONE_LARGE_OBJECT, TINY_LABEL_MAP

from ssd300 import training
from ssd300.errors import UserInputError
from ssd300.logging_utils import RunLogger
from ssd300.plots import plot_curves
from ssd300.runtime import Runtime
from ssd300.trainer import Trainer, TrainingInterrupted, TrainPosition, history_list, history_tensor, stored_history
from ssd300.training import TrainConfig, run


@pytest.fixture(scope="module")
def data_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(num_train=4, num_val=1, seed=0, **ONE_LARGE_OBJECT)  # 2 steps an epoch


def _config(data_dir: Path, **overrides) -> TrainConfig:
    base = dict(data=data_dir, backbone="resnet18", epochs=1, batch_size=2, eval_batch_size=2, seed=0,
                num_workers=0, amp=False, warmup=2, learning_rate=0.05, log_interval=1, progress=False,
                device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def curves_data(monkeypatch) -> list[tuple[list, list]]:
    """What training passes to plot_curves, call by call (the data, not the pixels)."""
    calls: list[tuple[list, list]] = []
    real = training.plot_curves

    def capture(loss_history, evaluations, path):
        calls.append((list(loss_history), [dict(e) for e in evaluations]))
        return real(loss_history, evaluations, path)

    monkeypatch.setattr(training, "plot_curves", capture)
    return calls


# -- a resumed run's curves and metrics.json cover the whole run ---------------------------------


@pytest.mark.slow  # training runs
def test_resume_keeps_the_loss_and_evaluation_history(data_dir, tmp_path, curves_data):
    out = tmp_path / "run"
    run(_config(data_dir, save=out, epochs=1))  # epoch 0 (2 steps), evaluated
    resumed = run(_config(data_dir, save=out, resume=True, seed=None, epochs=2))  # epoch 1, evaluated

    losses, evaluations = curves_data[-1]
    assert [i for i, _ in losses] == [0, 1, 2, 3]  # every step of the run, 0-based
    assert [e["epoch"] for e in evaluations] == [0, 1]
    assert [e["epoch"] for e in resumed.evaluations] == [0, 1]
    assert [i for i, _ in resumed.loss_history] == [0, 1, 2, 3]
    summary = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["evaluations"]] == [0, 1] and summary["iterations"] == 4
    assert summary["final_loss"] == pytest.approx(losses[-1][1])
    # the first part's figures, as that part wrote them
    first = _load(out / "last.pt")["evaluations"][0]
    assert first["AP"] == pytest.approx(summary["evaluations"][0]["AP"]) and first["per_class"]

    # one numbering in log.jsonl: steps 0..3, an evaluation names the last step before it
    assert [r["iteration"] for r in _records(out, "train")] == [0, 1, 2, 3]
    assert [(r["epoch"], r["iteration"]) for r in _records(out, "eval")] == [(0, 1), (1, 3)]


# -- an evaluation a signal interrupted is redone on resume -------------------------------------


@pytest.mark.slow  # training runs
def test_an_evaluation_interrupted_by_sigterm_is_redone_on_resume(data_dir, tmp_path, monkeypatch, curves_data):
    from ssd300 import evaluation

    real = evaluation.evaluate_model

    def evaluate_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as if it arrived while the evaluation starts
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(evaluation, "evaluate_model", evaluate_after_a_signal)
    with pytest.raises(TrainingInterrupted, match="during the evaluation after epoch 0"):
        run(_config(data_dir, save=out, epochs=1))  # the final epoch's evaluation is interrupted
    assert "metrics" not in _load(out / "epoch_0.pt") and not _records(out, "eval")
    monkeypatch.setattr(evaluation, "evaluate_model", real)

    resumed = run(_config(data_dir, save=out, resume=True, seed=None, epochs=1))
    assert [e["epoch"] for e in resumed.evaluations] == [0]
    assert [(r["epoch"], r["iteration"]) for r in _records(out, "eval")] == [(0, 1)]
    epoch_0 = _load(out / "epoch_0.pt")
    assert epoch_0["metrics"]["epoch"] == 0 and epoch_0["metrics"]["AP"] == pytest.approx(resumed.evaluations[0]["AP"])
    assert _load(out / "best.pt")["best"]["epoch"] == 0 and (out / "evaluation_epoch_0.png").is_file()
    assert epoch_0["epoch"] == 1 and epoch_0["iteration"] == 2  # the training state itself did not move
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["evaluations"]] == [0]
    losses, evaluations = curves_data[-1]
    assert [i for i, _ in losses] == [0, 1] and [e["epoch"] for e in evaluations] == [0]

    with pytest.raises(UserInputError, match="already completed 1 epochs"):  # done now: not evaluated again
        run(_config(data_dir, save=out, resume=True, seed=None, epochs=1))


# -- the history in the checkpoint ---------------------------------------------------------------


def _trainer(make_tiny_model, logger: RunLogger | None = None) -> Trainer:
    return Trainer.build(make_tiny_model(TINY_LABEL_MAP.num_classes), runtime=Runtime.resolve("cpu", amp=False),
                         label_map=TINY_LABEL_MAP, learning_rate=0.01, logger=logger)


def test_the_loss_history_travels_in_the_checkpoint(make_tiny_model, tmp_path):
    trainer = _trainer(make_tiny_model)
    trainer.loss_history = [(0, 2.5), (1, 2.25), (2, 2.125)]
    trainer.position = TrainPosition(epoch=1, batch_in_epoch=1, iteration=3)
    path = trainer.save(tmp_path / "state.pt")
    stored = _load(path)  # weights_only: the history is a plain tensor
    assert stored["loss_history"].dtype == torch.float64 and stored["loss_history"].shape == (3, 2)

    resumed = _trainer(make_tiny_model)
    assert resumed.load_training_state(stored)
    assert resumed.loss_history == [(0, 2.5), (1, 2.25), (2, 2.125)]
    stored["iteration"] = 2  # a history longer than the position (never written so): cut at the position
    resumed.load_training_state(stored)
    assert resumed.loss_history == [(0, 2.5), (1, 2.25)]
    for malformed in (None, "x", torch.zeros(3), torch.zeros(2, 3)):  # an older or hostile checkpoint
        assert history_list(malformed) == []
    assert history_list(history_tensor([])) == [] and history_tensor([]).shape == (0, 2)


def test_stored_history_keeps_well_formed_evaluations_before_the_checkpoints_position():
    evaluations = [{"epoch": 0, "AP": 0.1}, {"epoch": 1, "AP": 0.2}, {"epoch": 2, "AP": 0.3}, "junk", {"AP": 1.0}]
    best = {"epoch": 1, "AP": 0.2, "AP50": 0.4}
    assert stored_history({"epoch": 2, "evaluations": evaluations, "best": best}) == (best, evaluations[:2])
    assert stored_history({"epoch": 2}) == (None, [])  # a checkpoint from before the history was kept
    assert stored_history({"epoch": 2, "evaluations": "x", "best": {"epoch": "1"}}) == (None, [])


# -- one numbering: curves, skip summary, records -------------------------------------------------


def test_curves_axes_are_numbered_from_0(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures: list = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    evaluations = [{"epoch": 0, "AP": 0.1, "AP50": 0.2}, {"epoch": 3, "AP": 0.3, "AP50": 0.5}]
    plot_curves([(0, 2.0), (1, 1.5), (2, 1.0)], evaluations, tmp_path / "curves.png")
    (fig,) = figures
    ax_loss, ax_map = fig.axes
    assert list(ax_loss.lines[0].get_xdata()) == [0, 1, 2]
    assert [list(line.get_xdata()) for line in ax_map.lines] == [[0, 3], [0, 3]]  # AP50, AP: the records' epochs
    assert [list(line.get_ydata()) for line in ax_map.lines] == [[0.2, 0.5], [0.1, 0.3]]


class _Batch(list):
    """Two images and the reasons of the skipped ones."""

    def __init__(self, skipped: list[str]) -> None:
        super().__init__([0, 1])
        self.skipped = skipped


class _Loader:
    """Two batches, one image of the first skipped (unreadable)."""

    def __init__(self) -> None:
        self.batches = [_Batch(["a.jpg: cannot identify image file"]), _Batch([])]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_skip_summary_loss_history_and_step_records_number_from_0(make_tiny_model, tmp_path, monkeypatch):
    console = io.StringIO()
    logger = RunLogger(jsonl_path=tmp_path / "log.jsonl", log_interval=1, progress=False, stream=console)
    trainer = _trainer(make_tiny_model, logger)

    def step(batch, stop=None):  # the numbering, not the arithmetic
        trainer.position.iteration += 1
        trainer.position.batch_in_epoch += 1
        return 1.0 / trainer.position.iteration, False

    monkeypatch.setattr(trainer, "train_step", step)
    trainer.train_epoch(_Loader(), total_epochs=2)  # epoch 0: iterations 0 and 1
    logger.close()
    lines = console.getvalue().splitlines()
    assert "epoch 0: 1 images skipped, e.g. a.jpg: cannot identify image file" in lines
    assert any(line.startswith("epoch 0 iter 2/2 (iteration 1) ") for line in lines)
    assert trainer.loss_history == [(0, 1.0), (1, 0.5)]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["iteration"]) for r in records] == [(0, 0), (0, 1)]
