"""Triton model repository (``ssd300 export --triton``): config.pbtxt parsed strictly into Triton's own
``ModelConfig`` message and checked against onnxruntime's view of the copied model.onnx; the copy
runs a batch of 3 (dynamic batch); the labels file; the refuse/overwrite policy; the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_LABEL_MAP
from google.protobuf import text_format

from ssd300.cli import main
from ssd300.errors import UserInputError
from ssd300.export import export_model
from ssd300.triton import write_triton_repository



def _load_model_config_pb2():
    """Triton's ModelConfig message, loaded from tritonclient's file alone: importing the
    ``tritonclient.grpc`` package also registers its service protos (``inference.ServerLiveRequest``...),
    which clash in protobuf's default pool with MLServer's own copy when both load in one process
    (the serving tests import MLServer)."""
    import importlib.util

    pytest.importorskip("tritonclient", reason="tritonclient[grpc] (the test extra) holds Triton's ModelConfig")
    package = importlib.util.find_spec("tritonclient")
    assert package is not None and package.submodule_search_locations
    path = Path(next(iter(package.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip("tritonclient[grpc] (the test extra) holds Triton's ModelConfig")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _load_model_config_pb2()

# onnxruntime's type strings -> Triton's data type names, written out here (the oracle).
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32",
                 "tensor(float16)": "TYPE_FP16", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_tiny_model) -> dict[str, Path]:
    """The tiny model exported twice: the full detector (default exporter) and raw outputs (legacy)."""
    folder = tmp_path_factory.mktemp("export")
    model = make_tiny_model(TINY_LABEL_MAP.num_classes, conf_scale=0.3).eval()
    return {
        "full": export_model(model, TINY_LABEL_MAP, folder / "full.onnx", "onnx", max_detections=50),
        "raw": export_model(model, TINY_LABEL_MAP, folder / "raw.onnx", "onnx", raw=True, exporter="legacy"),
    }


def parse_config(path: Path):
    """Strict: text_format.Parse rejects any field or enum value ModelConfig does not define."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _per_image_dims(tensor) -> list[int]:
    """dims as the model sees them per image: a reshape (Triton's [1] -> []) wins."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def _ort_dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape[1:]]  # symbolic dims are strings/None in onnxruntime


@pytest.mark.parametrize("kind", ["full", "raw"])
def test_config_matches_the_copied_model_and_runs_a_batch_of_3(exported, kind, tmp_path):
    written = write_triton_repository(exported[kind], tmp_path / "model_repository", "detector", max_batch_size=8,
                                      queue_delay_us=250, instance_count=2, instance_kind="cpu")
    folder = tmp_path / "model_repository" / "detector"
    assert written.folder == folder
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (folder / "1" / "model.onnx").read_bytes() == exported[kind].read_bytes()

    config = parse_config(folder / "config.pbtxt")
    assert config.name == "detector" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for tensor, node in zip(declared, actual):
            assert model_config_pb2.DataType.Name(tensor.data_type) == ORT_TO_TRITON[node.type], node.name
            assert isinstance(node.shape[0], str) or node.shape[0] is None, f"{node.name}: batch dim not dynamic"
            assert _per_image_dims(tensor) == _ort_dims(node.shape), node.name
            assert len(tensor.dims) >= 1  # Triton refuses an empty dims list
    expected_names = (["images"], ["boxes", "scores", "labels", "num_detections"]) if kind == "full" else (
        ["images"], ["locs", "logits"])
    assert ([t.name for t in config.input], [t.name for t in config.output]) == expected_names

    # The labels file belongs to the output holding classes; its line i is contiguous label i.
    labelled = [t.name for t in config.output if t.label_filename]
    assert labelled == (["labels"] if kind == "full" else ["logits"])
    assert (folder / "labels.txt").read_text().splitlines() == list(TINY_LABEL_MAP.names)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert json.loads(parameters["class_names"]) == list(TINY_LABEL_MAP.names)
    assert json.loads(parameters["category_ids"]) == list(TINY_LABEL_MAP.category_ids)

    # What Triton would send for a batch of three requests: the per-image dims with N = 3 in front.
    images = np.random.default_rng(0).standard_normal((3, 3, 300, 300)).astype(np.float32)
    outputs = session.run(None, {"images": images})
    for tensor, value in zip(config.output, outputs):
        assert list(value.shape) == [3, *_per_image_dims(tensor)], tensor.name
    if kind == "full":
        boxes, scores, labels, counts = outputs
        assert labels.dtype == np.int64 and counts.shape == (3,)
        assert (counts <= 50).all() and (counts > 0).any()
        assert labels.max() < len(TINY_LABEL_MAP.names)


def test_no_triton_batching_keeps_the_batch_dimension(exported, tmp_path):
    write_triton_repository(exported["full"], tmp_path, "plain", max_batch_size=0)
    config = parse_config(tmp_path / "plain" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[-1, 3, 300, 300]]
    assert [list(t.dims) for t in config.output] == [[-1, 50, 4], [-1, 50], [-1, 50], [-1]]


def test_a_fixed_batch_dimension_cannot_be_batched_by_triton(exported, tmp_path):
    proto = onnx.load(str(exported["raw"]))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a file exported with a fixed batch
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    with pytest.raises(UserInputError, match="images.*fixed first dimension"):
        write_triton_repository(fixed, tmp_path / "repo", max_batch_size=4)
    assert not (tmp_path / "repo" / "ssd300").exists()
    write_triton_repository(fixed, tmp_path / "repo", max_batch_size=0)  # without Triton's batching: fine
    assert list(parse_config(tmp_path / "repo" / "ssd300" / "config.pbtxt").input[0].dims) == [1, 3, 300, 300]


def test_existing_model_folder_is_refused_without_overwrite(exported, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other_model" / "1").mkdir(parents=True)  # a repository holds other models: they stay
    write_triton_repository(exported["raw"], repo, "ssd", max_batch_size=4)
    with pytest.raises(UserInputError, match="exists; overwrite"):
        write_triton_repository(exported["full"], repo, "ssd", max_batch_size=4)
    assert [t.name for t in parse_config(repo / "ssd" / "config.pbtxt").output] == ["locs", "logits"]
    write_triton_repository(exported["full"], repo, "ssd", max_batch_size=4, overwrite=True)
    assert [t.name for t in parse_config(repo / "ssd" / "config.pbtxt").output][0] == "boxes"
    assert sorted(p.name for p in repo.iterdir()) == ["other_model", "ssd"]  # no scratch folder left
    with pytest.raises(UserInputError, match="model_name"):
        write_triton_repository(exported["full"], repo, "bad/name")


def test_export_command_writes_the_repository(make_tiny_checkpoint, tmp_path, capsys):
    checkpoint = make_tiny_checkpoint(tmp_path / "ssd.pt")
    repo = tmp_path / "model_repository"
    command = ["export", "--checkpoint", str(checkpoint), "--triton", str(repo), "--triton-model-name", "ssd300_tiny",
               "--max-batch-size", "16", "--exporter", "legacy", "--opset", "17", "--no-check"]
    assert main(command) == 0
    config = parse_config(repo / "ssd300_tiny" / "config.pbtxt")
    assert config.max_batch_size == 16 and config.name == "ssd300_tiny"
    session = ort.InferenceSession(str(repo / "ssd300_tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [t.name for t in config.output] == [o.name for o in session.get_outputs()]
    assert list(tmp_path.iterdir()) != [] and not list(tmp_path.glob("*.onnx"))  # no --out: only in the repository
    capsys.readouterr()
    assert main(command) == 2  # the model folder exists now
    assert "--overwrite" in capsys.readouterr().err
    pt2 = str(tmp_path / "m.pt2")
    assert main(["export", "--checkpoint", str(checkpoint), "--triton", str(repo), "--out", pt2]) == 2
    assert "--triton serves ONNX" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_model_and_leaves_no_scratch(exported, tmp_path, monkeypatch):
    import errno
    import shutil

    repo = tmp_path / "repo"
    write_triton_repository(exported["raw"], repo, "ssd", max_batch_size=4)
    before = (repo / "ssd" / "config.pbtxt").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(UserInputError, match=r"ssd: could not be written \(No space left on device\)"):
        write_triton_repository(exported["full"], repo, "ssd", max_batch_size=4, overwrite=True)
    assert (repo / "ssd" / "config.pbtxt").read_text() == before
    assert [p.name for p in repo.iterdir()] == ["ssd"]
