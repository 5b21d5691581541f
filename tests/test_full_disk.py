"""A full disk (ENOSPC, EDQUOT, EIO) under any writer of any command: one line naming the file,
exit 2, nothing partial at the final path, no temp file left, the previous file still whole.

The disk errors are injected (:class:`FullDisk` makes the writes to matching files fail, after a
number of bytes, as a disk that fills up does), so the tests run anywhere; a real full tmpfs
behaves the same (checked by hand: see the module's commit). Every file we write gets the
permissions the umask gives, checkpoints and figures included.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TWO_CLASSES
from PIL import Image

from ssd300.checkpoint import save_checkpoint
from ssd300.cli import main
from ssd300.errors import UserInputError
from ssd300.files import DiskError, atomic_path, atomic_write, find_disk_error, write_json
from ssd300.logging_utils import RunLogger
from ssd300.run_folder import LOCK_NAME, RunFolder

DISK_ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EIO]


class _FailingFile:
    """A file object whose writes fail once ``disk.after`` bytes went in (what fits is written)."""

    def __init__(self, handle: Any, disk: "FullDisk", path: str) -> None:
        self._handle, self._disk, self._path, self._written = handle, disk, path, 0

    def write(self, data: Any) -> int:
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        room = self._disk.after - self._written
        if size > room:
            if room > 0:
                self._handle.write(data[:room])
                self._written += room
            self._disk.refused.append(self._path)
            raise OSError(self._disk.errno, os.strerror(self._disk.errno))
        self._written += size
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> "_FailingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.close()


class FullDisk:
    """Make every write to a file whose path matches ``pattern`` (fnmatch on the full path, temp
    files included) fail with ``errno`` after ``after`` bytes: files opened by name (``open``),
    by descriptor (``os.fdopen``: :func:`ssd300.files.atomic_write`) and raw ``os.write``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pattern: str, after: int = 0,
                 error: int = errno.ENOSPC) -> None:
        self.pattern, self.after, self.errno = pattern, after, error
        self.refused: list[str] = []
        real_open, real_fdopen, real_write = builtins.open, os.fdopen, os.write
        written: dict[int, int] = {}

        def fd_path(fd: int) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and self.matches(os.fspath(file)):
                return _FailingFile(handle, self, os.fspath(file))
            return handle

        def fake_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            path = fd_path(fd)
            return _FailingFile(handle, self, path) if self.matches(path) else handle

        def fake_write(fd: int, data: Any) -> int:
            path = fd_path(fd)
            if not self.matches(path):
                return real_write(fd, data)
            room = self.after - written.get(fd, 0)
            if room <= 0:
                self.refused.append(path)
                raise OSError(self.errno, os.strerror(self.errno))
            count = real_write(fd, memoryview(data)[:room])
            written[fd] = written.get(fd, 0) + count
            return count

        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc/self/fd to tell which file a descriptor writes")
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "fdopen", fake_fdopen)
        monkeypatch.setattr(os, "write", fake_write)

    def matches(self, path: str) -> bool:
        return bool(path) and fnmatch.fnmatch(path, self.pattern)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


# ----------------------------------------------------------------------------- the writers


@pytest.mark.parametrize("error", DISK_ERRNOS)
@pytest.mark.parametrize("after", [0, 10])
def test_atomic_write_keeps_the_previous_file_and_names_the_target(monkeypatch, tmp_path, error, after):
    target = tmp_path / "out.json"
    target.write_text("previous\n")
    FullDisk(monkeypatch, str(tmp_path / ".out.json.*"), after=after, error=error)
    with pytest.raises(DiskError) as caught:
        write_json(target, {"rows": list(range(100))})
    assert str(caught.value) == (f"{target}: could not be written ({os.strerror(error)}); "
                                 "nothing was left at that path")
    assert caught.value.path == target and caught.value.error.errno == error
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_leaves_no_temp(monkeypatch, tmp_path, step):
    target = tmp_path / "figure.png"

    def refuse(*args: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, step, refuse)
    with pytest.raises(DiskError, match="figure.png: could not be written .Input/output error."):
        with atomic_write(target) as handle:
            handle.write(b"png")
    with pytest.raises(DiskError, match="figure.png: could not be written"):
        with atomic_path(target) as scratch:
            scratch.write_bytes(b"png")
    assert list(tmp_path.iterdir()) == []


def test_torch_save_full_disk_is_a_disk_error_not_a_runtime_error(monkeypatch, tmp_path):
    # torch's C++ zip writer turns the OSError of the write into "RuntimeError: unexpected pos";
    # atomic_write remembers the OSError.
    path = tmp_path / "epoch_1.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 1})
    FullDisk(monkeypatch, "*/.epoch_1.pt.*", after=2000)
    with pytest.raises(DiskError, match="epoch_1.pt: could not be written .No space left on device."):
        save_checkpoint(path, {"model": {"w": torch.ones(100_000)}, "epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_1.pt"]


def test_wrapped_disk_errors_are_found_through_cause_and_context():
    disk = OSError(errno.EDQUOT, "Disk quota exceeded")

    class ExporterError(Exception):
        pass

    try:
        try:
            raise disk
        except OSError:
            raise RuntimeError("serialisation failed")  # noqa: B904 - the context is what is tested
    except RuntimeError as inner:
        wrapped = ExporterError("export failed")
        wrapped.__cause__ = inner
    assert find_disk_error(wrapped) is disk
    assert find_disk_error(ExporterError("no disk involved")) is None
    assert find_disk_error(OSError(errno.ENOENT, "missing")) is None


def test_an_exporter_wrapping_the_disk_error_in_its_own_type_is_one_line(tmp_path):
    target = tmp_path / "model.onnx"

    class OnnxExporterError(RuntimeError):
        pass

    with pytest.raises(DiskError, match="model.onnx: could not be written .No space left on device."):
        with atomic_path(target):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                raise OnnxExporterError("failed to save the model") from exc
    assert list(tmp_path.iterdir()) == []


def test_other_errors_propagate_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_write(tmp_path / "x.json", "w"):
            raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == []


def test_publish_keeps_the_previous_last_checkpoint_when_the_rename_fails(monkeypatch, tmp_path):
    folder = RunFolder(tmp_path)
    save_checkpoint(tmp_path / "epoch_0.pt", {"epoch": 1})
    folder.publish(tmp_path / "epoch_0.pt", "last.pt")
    save_checkpoint(tmp_path / "epoch_1.pt", {"epoch": 2})
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "last.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DiskError, match="last.pt: could not be written"):
        folder.publish(tmp_path / "epoch_1.pt", "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt", "epoch_1.pt", "last.pt"]


def test_a_failed_log_append_warns_once_keeps_whole_lines_and_the_run_goes_on(monkeypatch, tmp_path):
    path = tmp_path / "log.jsonl"
    stream = io.StringIO()
    logger = RunLogger(jsonl_path=path, stream=stream, progress=False)
    logger.record("train", iteration=0, loss=1.0)
    first = path.read_text()
    FullDisk(monkeypatch, str(path), after=len('{"kind": "train", "time"'))  # half a line fits
    for step in range(1, 4):
        logger.record("train", iteration=step, loss=1.0)
    logger.close()
    monkeypatch.undo()
    assert path.read_text() == first  # the half line was cut back off
    assert [json.loads(line)["iteration"] for line in first.splitlines()] == [0]
    assert [r["iteration"] for r in logger.history] == [0, 1, 2, 3]  # metrics.json still gets them
    warnings = [line for line in stream.getvalue().splitlines() if "could not be written" in line]
    assert warnings == [f"warning: {path}: could not be written (No space left on device); "
                        "the run goes on, its records are no longer appended to this file"]


def test_a_drawn_image_on_a_full_disk(monkeypatch, tmp_path):
    from ssd300.visualize import save_image

    target = tmp_path / "drawn.jpg"
    FullDisk(monkeypatch, str(tmp_path / ".drawn.jpg.*"), after=100)
    with pytest.raises(DiskError, match="drawn.jpg: could not be written"):
        save_image(torch.full((3, 64, 64), 128, dtype=torch.uint8), target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(UserInputError, match=r"drawn.xyz: unknown image format '.xyz'"):
        save_image(torch.zeros((3, 8, 8), dtype=torch.uint8), tmp_path / "drawn.xyz")


def test_int8_scratch_files_on_a_full_disk_name_the_output_and_the_folder(tmp_path):
    from ssd300.quantize import _scratch_space

    out, scratch = tmp_path / "model.int8.onnx", tmp_path / "tmp" / "ssd300-int8-x"
    with pytest.raises(DiskError) as caught:
        with _scratch_space(scratch, out):
            raise RuntimeError("quantize_static failed") from OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value).startswith(f"{out}: could not be written: the temporary folder {scratch.parent} "
                                        "refused the intermediate files (No space left on device)")
    with pytest.raises(DiskError, match="^" + str(out)):  # the final write's own error stays as it is
        with _scratch_space(scratch, out), atomic_path(out):
            raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def data_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(num_train=2, num_val=2, seed=0, **TWO_CLASSES)


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint, tmp_path_factory) -> Path:
    from ssd300.labels import LabelMap

    label_map = LabelMap.from_categories([(1, "disc"), (2, "rectangle")])
    return make_tiny_checkpoint(tmp_path_factory.mktemp("full-disk") / "ssd.pt", label_map)


def _train(data_dir: Path, save: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(data_dir), "--backbone", "resnet18", "--bs", "2", "--num-workers", "0",
            "--no-amp", "--device", "cpu", "--no-progress", "--seed", "0", "--save", str(save), *flags]


@pytest.mark.slow  # two short trainings
def test_train_full_disk_at_a_checkpoint_keeps_the_previous_one_and_releases_the_lock(
        monkeypatch, capsys, data_dir, tmp_path):
    run = tmp_path / "run"
    FullDisk(monkeypatch, str(run / ".epoch_1.pt.*"), after=4096)
    err = _one_line_error(capsys, _train(data_dir, run, "--epochs", "2"))
    assert err == (f"ssd300 train: error: {run / 'epoch_1.pt'}: could not be written (No space left on device); "
                   "nothing was left at that path")
    monkeypatch.undo()
    assert not (run / "epoch_1.pt").exists() and _leftovers(run) == []
    assert not (run / LOCK_NAME).exists()
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 1  # epoch 0 done: the previous checkpoint, whole
    # ... and the run continues from it once there is room.
    assert main(_train(data_dir, run, "--epochs", "2", "--resume")) == 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow  # one short training per file
@pytest.mark.parametrize("name", ["metrics.json", "results.json", "curves.png", "evaluation_epoch_0.png"])
def test_train_full_disk_at_a_run_file(monkeypatch, capsys, data_dir, tmp_path, name):
    run = tmp_path / "run"
    FullDisk(monkeypatch, str(run / f".{name}.*"), after=64)
    err = _one_line_error(capsys, _train(data_dir, run, "--epochs", "1", "--evaluation", "0"))
    assert err == (f"ssd300 train: error: {run / name}: could not be written (No space left on device); "
                   "nothing was left at that path")
    assert not (run / name).exists() and _leftovers(run) == [] and not (run / LOCK_NAME).exists()


@pytest.mark.slow  # a short training
def test_train_goes_on_when_log_jsonl_cannot_be_appended(monkeypatch, capsys, data_dir, tmp_path):
    run = tmp_path / "run"
    FullDisk(monkeypatch, str(run / "log.jsonl"), after=0, error=errno.EDQUOT)
    assert main(_train(data_dir, run, "--epochs", "1", "--evaluation", "0")) == 0
    err = capsys.readouterr().err
    assert err.count(f"{run / 'log.jsonl'}: could not be written (Disk quota exceeded)") == 1
    assert "Traceback" not in err
    assert (run / "log.jsonl").read_text() == ""
    assert json.loads((run / "metrics.json").read_text())["evaluations"]  # still recorded


def test_evaluate_results_on_a_full_disk(monkeypatch, capsys, data_dir, checkpoint, tmp_path):
    results = tmp_path / "out" / "results.json"
    FullDisk(monkeypatch, str(results.parent / ".results.json.*"), after=10)
    err = _one_line_error(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir),
                                   "--device", "cpu", "--results", str(results)])
    assert err == f"ssd300 evaluate: error: {results}: could not be written (No space left on device); " \
                  "nothing was left at that path"
    assert list(results.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["images.json", "annotated/a.jpg", "detections/a.json"])
def test_detect_on_a_full_disk(monkeypatch, capsys, checkpoint, tmp_path, name):
    image = tmp_path / "a.jpg"
    Image.new("RGB", (96, 64), (90, 20, 200)).save(image)
    out = tmp_path / "out"
    target = out / name
    FullDisk(monkeypatch, str(target.parent / f".{target.name}.*"), after=50)
    err = _one_line_error(capsys, ["detect", "--checkpoint", str(checkpoint), str(image), "--out", str(out),
                                   "--device", "cpu"])
    assert err == f"ssd300 detect: error: {target}: could not be written (No space left on device); " \
                  "nothing was left at that path"
    assert not target.exists() and _leftovers(out) == []


@pytest.mark.parametrize("fmt,suffix", [
    ("torchscript", "pt"),
    pytest.param("pt2", "pt2", marks=pytest.mark.slow),  # torch.export traces for a while
    ("onnx", "onnx"),
])
def test_export_on_a_full_disk_is_one_line_and_leaves_the_previous_file(monkeypatch, capsys, checkpoint,
                                                                         tmp_path, fmt, suffix):
    # Before: a truncated file at --out (ONNX), or exit 134 from torch's C++ writer (TorchScript, pt2).
    pytest.importorskip("onnx") if fmt == "onnx" else None
    out = tmp_path / f"model.{suffix}"
    out.write_bytes(b"the previous export")
    FullDisk(monkeypatch, str(tmp_path / f".model.{suffix}.*"), after=100_000)
    err = _one_line_error(capsys, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt,
                                   "--exporter", "legacy", "--no-check"] if fmt == "onnx" else
                          ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt,
                           "--no-check"])
    assert err == f"ssd300 export: error: {out}: could not be written (No space left on device); " \
                  "nothing was left at that path"
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model.{suffix}"]


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_writer_gives_the_umask_permissions(tmp_path, umask):
    from matplotlib.figure import Figure

    from ssd300.plots import _save
    from ssd300.visualize import save_image

    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "epoch_0.pt", {"epoch": 1})
        RunFolder(tmp_path).publish(tmp_path / "epoch_0.pt", "last.pt")
        write_json(tmp_path / "metrics.json", {"AP": 0.5})
        _save(Figure(figsize=(1, 1)), tmp_path / "curves.png")
        save_image(torch.zeros((3, 8, 8), dtype=torch.uint8), tmp_path / "drawn.jpg")
        with atomic_path(tmp_path / "model.onnx") as scratch:
            scratch.write_bytes(b"onnx")
        logger = RunLogger(jsonl_path=tmp_path / "log.jsonl", stream=io.StringIO(), progress=False)
        logger.record("train", iteration=0)
        logger.close()
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["epoch_0.pt", "last.pt", "metrics.json", "curves.png", "drawn.jpg",
                                   "model.onnx", "log.jsonl"], 0o666 & ~umask)


@pytest.mark.slow  # a short training
def test_a_training_run_folder_follows_the_umask(data_dir, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main(_train(data_dir, tmp_path / "run", "--epochs", "1", "--evaluation", "0")) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert {"epoch_0.pt", "last.pt", "best.pt", "log.jsonl", "metrics.json", "results.json", "curves.png",
            "evaluation_epoch_0.png"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes


def test_a_disk_error_no_writer_named_is_still_one_line(monkeypatch, capsys):
    import ssd300.commands.synth as synth

    def run(args: Any) -> int:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/000007.jpg")
        except OSError as exc:
            raise ValueError("encoder error -2 when writing image file") from exc

    monkeypatch.setattr(synth, "run", run)
    err = _one_line_error(capsys, ["synth", "--out", "/data/out"])
    assert err == "ssd300 synth: error: /data/out/000007.jpg: could not be written (No space left on device)"


@pytest.mark.parametrize("name", ["train/000002.jpg", "annotations/instances_train.json"])
def test_synth_on_a_full_disk(monkeypatch, capsys, tmp_path, name):
    out = tmp_path / "synth"
    target = out / name
    FullDisk(monkeypatch, str(target.parent / f".{target.name}.*"), after=100)
    err = _one_line_error(capsys, ["synth", "--out", str(out), "--train", "3", "--val", "1"])
    assert err == f"ssd300 synth: error: {target}: could not be written (No space left on device); " \
                  "nothing was left at that path"
    assert not target.exists() and _leftovers(out) == []
    assert not (out / "annotations" / "instances_train.json").exists()  # the split is not complete
