"""Each optional dependency missing -> one line naming the extra that installs it.

A module is made missing by a ``None`` entry in ``sys.modules`` (``import`` then raises
ImportError), so these run whether or not the extras are installed here.
"""

from __future__ import annotations

import io
import sys
import types

import pytest

from ssd300.cli import main
from ssd300.commands.options import cli_message
from ssd300.errors import UserInputError
from ssd300.model import SSD300
from ssd300.optional import EXTRA_OF, available, require


def _missing(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def model(make_tiny_model) -> SSD300:
    return make_tiny_model(3)


@pytest.mark.parametrize("module", sorted(EXTRA_OF))
def test_require_names_the_module_and_the_extra(monkeypatch, module):
    _missing(monkeypatch, module)
    assert not available(module)
    with pytest.raises(UserInputError) as info:
        require(module, "some feature")
    assert str(info.value) == f"{module} is not installed (some feature): pip install 'ssd300[{EXTRA_OF[module]}]'"


def test_require_returns_the_module():
    assert require("json", "x") is sys.modules["json"]


def test_onnxruntime_backend_without_onnxruntime(monkeypatch, model):
    from ssd300.inference import Detector

    _missing(monkeypatch, "onnxruntime")
    with pytest.raises(UserInputError, match=r"^onnxruntime is not installed \(backend onnxruntime\): "
                                             r"pip install 'ssd300\[onnx\]'$") as error:
        Detector(model, device="cpu", backend="onnxruntime")
    from ssd300.commands.options import cli_message

    assert cli_message(error.value).startswith("onnxruntime is not installed (--backend onnxruntime)")


def test_onnxruntime_backend_with_onnxruntime_but_without_onnx(monkeypatch, model):
    # onnxruntime alone used to end in a raw ImportError from the in-memory ONNX export
    from ssd300.inference import Detector

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    _missing(monkeypatch, "onnx")
    with pytest.raises(UserInputError, match=r"^onnx is not installed \(.*\): pip install 'ssd300\[onnx\]'$"):
        Detector(model, device="cpu", backend="onnxruntime")


def test_onnx_export_without_onnx_fails_before_writing(monkeypatch, model, tmp_path):
    from ssd300.export import build_export_module, export_onnx

    _missing(monkeypatch, "onnx")
    out = tmp_path / "sub" / "model.onnx"
    with pytest.raises(UserInputError, match=r"^onnx is not installed \(ONNX export\)"):
        export_onnx(build_export_module(model, raw=True), out, raw=True, exporter="legacy")
    assert not out.parent.exists()


def test_export_command_without_onnx_is_one_line(monkeypatch, capsys, tmp_path):
    _missing(monkeypatch, "onnx")
    assert main(["export", "--checkpoint", str(tmp_path / "any.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "onnx is not installed (--format onnx): pip install 'ssd300[onnx]'" in err


def test_export_check_is_skipped_without_onnxruntime(monkeypatch, capsys, model, tmp_path):
    from ssd300.commands.export import check_export
    from ssd300.export import build_export_module

    _missing(monkeypatch, "onnxruntime")
    worst, same = check_export(build_export_module(model, raw=True), tmp_path / "never_read.onnx", "onnx")
    assert worst != worst and same  # NaN: nothing compared
    assert "onnxruntime is not installed; skipping the check (pip install 'ssd300[onnx]')" in capsys.readouterr().out


def test_dynamo_exporter_is_not_chosen_without_onnxscript(monkeypatch):
    from ssd300.export import _dynamo_available

    _missing(monkeypatch, "onnxscript")
    assert not _dynamo_available()


def test_dali_missing(monkeypatch):
    from ssd300.data import dali

    _missing(monkeypatch, "nvidia.dali")
    assert not dali.dali_available()
    with pytest.raises(UserInputError, match=r"^dali needs NVIDIA DALI: pip install 'ssd300\[dali\]'") as caught:
        dali._require_dali()
    assert cli_message(caught.value).startswith("--dali needs NVIDIA DALI: ")


def test_faster_coco_eval_missing(monkeypatch):
    from ssd300.coco_eval import resolve_eval_backend

    _missing(monkeypatch, "faster_coco_eval")
    assert resolve_eval_backend("auto") == "pycocotools"
    with pytest.raises(UserInputError, match=r"^eval_backend faster-coco-eval: not installed "
                                             r"\(pip install 'ssd300\[eval\]'\)$") as caught:
        resolve_eval_backend("faster-coco-eval")
    assert cli_message(caught.value) == "--eval-backend faster-coco-eval: not installed (pip install 'ssd300[eval]')"


def test_tensorboard_missing_is_one_line_and_ignored(monkeypatch, tmp_path):
    from ssd300.logging_utils import RunLogger

    _missing(monkeypatch, "torch.utils.tensorboard")
    stream = io.StringIO()
    RunLogger(tensorboard_dir=tmp_path / "tb", progress=False, stream=stream)
    assert stream.getvalue() == ("tensorboard is not installed (pip install 'ssd300[tensorboard]'); "
                                 "no TensorBoard log\n")
    assert not (tmp_path / "tb").exists()
