"""Run folders (``--save``): one run per folder, the lock, stale temp files, last/best/keep-last,
``--resume``, the evaluation schedule (final epoch always), SIGTERM during an evaluation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd300.data.synth import generate_synthetic_dataset
from ssd300.errors import UserInputError
from ssd300.cli import main
from ssd300.run_folder import BEST, INTERRUPTED, LAST, LOCK_NAME, RunFolder
from ssd300.trainer import TrainingInterrupted
from ssd300.training import DEFAULT_EVALUATION, TrainConfig, run


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the folder's policies (no training) ---------------------------------------------------------


def test_fresh_run_refuses_a_folder_holding_another_run_unless_overwrite(tmp_path):
    _write(tmp_path / "epoch_0.pt")
    _write(tmp_path / "log.jsonl", "{}\n")
    mine = _write(tmp_path / "notes.txt")  # not a run file: never touched
    refused = r"^save .* holds another run \(checkpoints epoch_0.pt; other files log.jsonl\).* overwrite"
    with pytest.raises(UserInputError, match=refused) as info:
        RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)
    assert "--" not in str(info.value) and info.value.fields == ("save", "resume", "overwrite")
    assert (tmp_path / "epoch_0.pt").exists() and not (tmp_path / LOCK_NAME).exists()

    folder = RunFolder(tmp_path)
    notes = folder.prepare(resuming_from=None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "notes.txt"] and mine.read_text() == "x"
    assert any("removed the previous run's 2 files" in n for n in notes)
    folder.release_lock()


def test_resume_continues_its_own_folder_only(tmp_path):
    own = _write(tmp_path / "run" / "epoch_0.pt")
    other = _write(tmp_path / "elsewhere" / "epoch_3.pt")
    folder = RunFolder(tmp_path / "run")
    assert folder.prepare(resuming_from=own, overwrite=False) == []
    folder.release_lock()
    with pytest.raises(UserInputError, match="holds another run"):
        RunFolder(tmp_path / "run").prepare(resuming_from=other, overwrite=False)
    with pytest.raises(UserInputError, match="would delete the run being resumed"):
        RunFolder(tmp_path / "run").prepare(resuming_from=own, overwrite=True)


def test_lock_keeps_a_live_run_out_and_takes_over_a_dead_ones(tmp_path):
    first = RunFolder(tmp_path)
    first.prepare(resuming_from=None, overwrite=False)
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(UserInputError, match=rf"another run is using this folder \(pid {os.getpid()} on "):
        RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)
    first.release_lock()
    assert not (tmp_path / LOCK_NAME).exists()

    dead = _dead_pid()
    _write(tmp_path / LOCK_NAME, json.dumps({"pid": dead, "host": socket.gethostname()}))
    second = RunFolder(tmp_path)
    notes = second.prepare(resuming_from=None, overwrite=False)
    assert notes == [f"took over the lock of a run that is no longer running (pid {dead})"]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release_lock()

    # another host's lock is never taken: its pid means nothing here
    _write(tmp_path / LOCK_NAME, json.dumps({"pid": dead, "host": "some-other-host"}))
    with pytest.raises(UserInputError, match="some-other-host"):
        RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)


def test_leftovers_of_a_failed_start_are_not_a_run_and_are_replaced(tmp_path):
    """A start that failed before its first checkpoint left a log (and a summary without
    evaluations): a fresh run takes the folder, replacing them; the user's files stay."""
    _write(tmp_path / "log.jsonl", json.dumps({"kind": "warning", "message": "x"}) + "\n")
    _write(tmp_path / "metrics.json", json.dumps({"mode": "benchmark-training", "evaluations": []}))
    mine = _write(tmp_path / "notes.txt")
    folder = RunFolder(tmp_path)
    assert not folder.found().is_run
    notes = folder.prepare(resuming_from=None, overwrite=False)
    assert notes == [f"{tmp_path} held no checkpoint and no evaluation, only what a start that failed left "
                     "(log.jsonl, metrics.json): removed, starting afresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "notes.txt"] and mine.read_text() == "x"
    folder.release_lock()

    # a resumed run saving here (its checkpoint elsewhere) replaces them too
    _write(tmp_path / "log.jsonl", "")
    elsewhere = _write(tmp_path.parent / f"{tmp_path.name}_ckpt" / "epoch_0.pt")
    folder = RunFolder(tmp_path)
    assert folder.prepare(resuming_from=elsewhere, overwrite=False)[0].startswith(f"{tmp_path} held no checkpoint")
    assert not (tmp_path / "log.jsonl").exists()
    folder.release_lock()


@pytest.mark.parametrize("files,found", [
    ({"results.json": "[]"}, "evaluations results.json"),
    ({"evaluation_epoch_3.png": "png", "log.jsonl": "{}\n"}, "evaluations evaluation_epoch_3.png; other files "
                                                               "log.jsonl"),
    ({"log.jsonl": '{"kind": "train"}\n{"kind": "eval", "epoch": 0}\n'}, "evaluations log.jsonl"),
    ({"metrics.json": json.dumps({"evaluations": [{"epoch": 0}]})}, "evaluations metrics.json"),
    ({"metrics.json": "{trunc"}, "evaluations metrics.json"),  # unreadable: never deleted on a guess
    ({"last.pt": "x", "interrupted.pt": "x", "epoch_0.pt": "x", "epoch_1.pt": "x", "curves.png": "x"},
     "checkpoints epoch_0.pt, epoch_1.pt, last.pt and 1 more; other files curves.png"),
])
def test_a_folder_with_a_checkpoint_or_an_evaluation_is_a_run_and_the_refusal_says_what_was_found(
        tmp_path, files, found):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(UserInputError) as info:
        RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)
    assert str(info.value) == (f"save {tmp_path} holds another run ({found}): continue it with resume, pick a new "
                               "folder, or pass overwrite to replace it")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # nothing touched


@pytest.mark.parametrize("content", [b"", b"   \n", b"garbage \x00\xff", b'{"pid": 12', b"[1, 2]", b'{"pid": "x"}',
                                     b"{}"])
def test_an_unreadable_lock_is_stale_and_taken_over_with_a_note(tmp_path, content):
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(content)
    old = lock.stat().st_mtime - 60  # written long ago: not a live run's lock being written now
    os.utime(lock, (old, old))
    folder = RunFolder(tmp_path)
    notes = folder.prepare(resuming_from=None, overwrite=False)
    assert len(notes) == 1 and notes[0].startswith("took over an unreadable lock file (")
    assert notes[0].endswith("), left by a crash or not ours")
    assert ("(empty)" in notes[0]) == (not content.strip())
    assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    folder.release_lock()
    assert not lock.exists()


def test_a_live_runs_lock_is_never_taken_even_while_it_is_being_written(tmp_path):
    """A lock that does not parse yet but is younger than LOCK_WRITE_GRACE may be a live run's,
    created and not yet written: read again, it names a live process, and the run is refused."""
    import threading

    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")  # as O_EXCL leaves it, an instant before the owner writes

    def owner_writes() -> None:
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    writer = threading.Timer(0.2, owner_writes)
    writer.start()
    try:
        with pytest.raises(UserInputError, match=rf"another run is using this folder \(pid {os.getpid()} on "):
            RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)
    finally:
        writer.join()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # another live process of this host, its lock old: still refused
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        os.utime(lock, (0, 0))
        with pytest.raises(UserInputError, match=rf"another run is using this folder \(pid {live.pid} on "):
            RunFolder(tmp_path).prepare(resuming_from=None, overwrite=False)
    finally:
        live.kill()
        live.wait()
    assert json.loads(lock.read_text())["pid"] == live.pid  # untouched


def test_stale_checkpoint_temp_files_are_removed_and_never_loaded(tmp_path):
    ours = [_write(tmp_path / name) for name in (".epoch_3.pt.k2j4x_9a.tmp", ".last.pt.abc123.tmp",
                                                 ".interrupted.pt.q1w2e3r4.tmp")]
    others = [_write(tmp_path / name) for name in (".my_notes.tmp", "epoch_3.pt.tmp", ".epoch_x.pt.abc.tmp")]
    folder = RunFolder(tmp_path)
    assert folder.newest_checkpoint() is None  # a temp file is never a checkpoint
    with pytest.raises(UserInputError, match="^resume: no checkpoint in"):
        run(TrainConfig(data=tmp_path, save=tmp_path, resume=True, backbone="resnet18"))
    notes = folder.prepare(resuming_from=None, overwrite=False)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert any("removed 3 unfinished checkpoint temp file(s)" in n for n in notes)
    folder.release_lock()


def test_publish_links_last_and_keep_last_spares_last_best_interrupted(tmp_path):
    folder = RunFolder(tmp_path)
    for epoch in range(4):
        _write(tmp_path / f"epoch_{epoch}.pt", f"state {epoch}")
    _write(tmp_path / "interrupted.pt", "stopped")
    folder.publish(tmp_path / "epoch_1.pt", "best.pt")
    folder.publish(tmp_path / "epoch_3.pt", "last.pt")
    assert folder.newest_checkpoint() == tmp_path / "last.pt"
    removed = folder.prune_epochs(2)
    assert [p.name for p in removed] == ["epoch_0.pt", "epoch_1.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_2.pt", "epoch_3.pt", "interrupted.pt",
                                                          "last.pt"]
    assert (tmp_path / "best.pt").read_text() == "state 1" and (tmp_path / "last.pt").read_text() == "state 3"
    assert folder.prune_epochs(0) == []


def test_final_epoch_is_always_evaluated_and_eval_every():
    assert TrainConfig(epochs=65).evaluation_epochs == DEFAULT_EVALUATION  # the reference recipe, unchanged
    assert TrainConfig(epochs=10).evaluation_epochs == (9,)  # no reference epoch < 10: the final one
    assert TrainConfig(epochs=10, eval_every=4).evaluation_epochs == (3, 7, 9)
    assert TrainConfig(epochs=30, evaluation=(0, 21)).evaluation_epochs == (0, 21, 29)
    assert TrainConfig(epochs=10, evaluation=()).evaluation_epochs == ()  # explicitly none
    assert TrainConfig(epochs=10, evaluation=(), eval_every=5).evaluation_epochs == (4, 9)
    assert TrainConfig(epochs=10).needs_val_data and not TrainConfig(epochs=10, evaluation=()).needs_val_data


# -- training runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=4, num_val=1, seed=0,
                                      num_classes=2, min_objects=1, max_objects=1, min_size=0.4, max_size=0.7,
                                      min_width=240, max_width=300, min_height=200, max_height=260)


def _config(data_dir: Path, **overrides) -> TrainConfig:
    base = dict(data=data_dir, backbone="resnet18", epochs=3, batch_size=2, eval_batch_size=2, seed=0,
                num_workers=0, amp=False, warmup=2, learning_rate=0.05, log_interval=1, progress=False,
                device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # training runs
def test_run_writes_last_best_keeps_last_refuses_a_second_run_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run(_config(data_dir, save=out, eval_every=2, keep_last=1))
    assert [e["epoch"] for e in result.evaluations] == [1, 2]  # every 2nd epoch and the final one
    names = sorted(p.name for p in out.iterdir())
    per_evaluation = [f"{kind}_epoch_{e}.{ext}" for e in (1, 2) for kind, ext in
                      (("confusion", "png"), ("evaluation", "png"), ("report", "html"), ("thresholds", "png"))]
    assert names == sorted(["best.pt", "curves.png", "epoch_2.pt", *per_evaluation, "last.pt", "log.jsonl",
                            "metrics.json", "report.html", "results.json"])  # lock released

    last, final = _load(out / "last.pt"), _load(out / "epoch_2.pt")
    assert last["epoch"] == final["epoch"] == 3 and last["iteration"] == 6
    best_ap = max(e["AP"] for e in result.evaluations)
    best_epoch = next(e["epoch"] for e in result.evaluations if e["AP"] == best_ap)
    best = _load(out / "best.pt")
    assert best["metrics"]["epoch"] == best_epoch and best["metrics"]["AP"] == pytest.approx(best_ap)
    assert best["best"] == {"epoch": best_epoch, "AP": pytest.approx(best_ap), "AP50": pytest.approx(
        next(e["AP50"] for e in result.evaluations if e["epoch"] == best_epoch))}
    assert final["metrics"]["epoch"] == 2

    with pytest.raises(UserInputError, match="holds another run"):
        run(_config(data_dir, save=out))  # a fresh run: refused, nothing touched
    assert sorted(p.name for p in out.iterdir()) == names

    log_before = (out / "log.jsonl").read_text()
    resumed = run(_config(data_dir, save=out, resume=True, seed=None, epochs=4, eval_every=2, keep_last=1))
    assert [e["epoch"] for e in resumed.evaluations] == [1, 2, 3]  # the whole run's (test_resume_history.py)
    log_after = (out / "log.jsonl").read_text()
    assert log_after.startswith(log_before) and len(log_after) > len(log_before)  # appended
    assert json.loads(log_after.splitlines()[-1])["epoch"] == 3
    assert _load(out / "last.pt")["epoch"] == 4 and sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_3.pt"]

    with pytest.raises(UserInputError, match="already completed 4 epochs"):
        run(_config(data_dir, save=out, resume=True, seed=None, epochs=4))

    fresh = run(_config(data_dir, save=out, overwrite=True, epochs=1, evaluation=()))
    assert fresh.evaluations == [] and sorted(p.name for p in out.iterdir()) == [
        "curves.png", "epoch_0.pt", "last.pt", "log.jsonl", "metrics.json"]


@pytest.mark.slow  # a training run
def test_sigterm_during_evaluation_stops_it_and_keeps_the_epoch_checkpoint(data_dir, tmp_path, monkeypatch):
    from ssd300 import evaluation

    real = evaluation.evaluate_model

    def evaluate_after_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as if it arrived while the evaluation starts
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_model", evaluate_after_a_signal)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="during the evaluation after epoch 0") as stopped:
        run(_config(data_dir, save=out, epochs=2, evaluation=(0,)))
    assert stopped.value.exit_code == 143
    assert str(stopped.value).endswith("(to continue: resume)") and stopped.value.fields == ("resume",)
    assert _load(out / "epoch_0.pt")["epoch"] == 1 and _load(out / "last.pt")["epoch"] == 1
    assert not (out / "results.json").exists()  # the evaluation did not run to its end
    assert not (out / LOCK_NAME).exists()


# -- checkpoints: written and published only by the run folder ----------------------------------


def test_run_folder_writes_epoch_and_interrupted_checkpoints_and_links_last_and_best(tmp_path):
    folder = RunFolder(tmp_path)
    first = folder.save_epoch(0, {"epoch": 1, "w": torch.ones(2)}, best=True)
    second = folder.save_epoch(1, {"epoch": 2, "w": torch.zeros(2)}, best=False)
    assert (first.name, second.name) == ("epoch_0.pt", "epoch_1.pt")
    assert os.path.samefile(folder.checkpoint(LAST), second) and os.path.samefile(folder.checkpoint(BEST), first)
    stopped = folder.save_interrupted({"epoch": 2, "iteration": 5})
    assert stopped == tmp_path / INTERRUPTED and os.path.samefile(folder.checkpoint(LAST), stopped)
    assert _load(folder.checkpoint(LAST))["iteration"] == 5 and _load(folder.checkpoint(BEST))["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0.pt", "epoch_1.pt", "interrupted.pt",
                                                          "last.pt"]  # no temp file left


def test_publish_copies_atomically_where_hard_links_fail(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    source = folder.save_epoch(3, {"epoch": 4}, best=False)

    def no_links(*args, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    folder.publish(source, BEST)
    assert not os.path.samefile(folder.checkpoint(BEST), source) and _load(folder.checkpoint(BEST))["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_3.pt", "last.pt"]


def test_run_folder_names_every_file_of_the_run(tmp_path):
    folder = RunFolder(tmp_path)
    assert (folder.log_file.name, folder.results_file.name, folder.metrics_file.name, folder.curves_file.name,
            folder.evaluation_plot(7).name) == ("log.jsonl", "results.json", "metrics.json", "curves.png",
                                                "evaluation_epoch_7.png")


def test_a_folder_holding_another_run_names_the_field_in_the_library_and_the_flag_in_the_cli(data_dir, tmp_path,
                                                                                           capsys):
    _write(tmp_path / "epoch_0.pt")
    with pytest.raises(UserInputError) as info:
        run(_config(data_dir, save=tmp_path))
    assert str(info.value).startswith(f"save {tmp_path} holds another run") and "--" not in str(info.value)
    assert main(["train", "--data", str(data_dir), "--save", str(tmp_path), "--backbone", "resnet18",
                 "--evaluation", "--epochs", "1", "--bs", "2", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--save {tmp_path} holds another run" in err and "continue it with --resume" in err
    assert "pass --overwrite to replace it" in err
