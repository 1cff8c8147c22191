"""ONNX export (predict.py --export) and prediction from the export on onnxruntime: the same
submission as the checkpoint, ensembles averaged inside the graph, any batch size, the report and
the leak guard as for a checkpoint, and bad exports refused in one line. The PyTorch reference
runs in fp32, the path the export is made on."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLE_TEST, SAMPLE_TRAIN

import dataset
import export
import model
import onnx_model
import parallel
import predict
import train
from cli import UserError, run_cli

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    """Two small models of different architectures trained on the bundled sample."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed, arch in ((0, "basic"), (1, "strong")):
        out = parallel.member_dir(root, seed)
        flags = ["--train", SAMPLE_TRAIN, "--arch", arch, "--epochs", "2", "--max-rows", "1500"]
        flags += ["--seed", str(seed), "--no-plots", "--quiet", "--device", "cpu"]
        train.main([*flags, "--model-dir", str(out), "--out-dir", str(out)])
        paths.append(str(out / "best.pt"))
    return paths


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory) -> dict[str, str]:
    """The first model alone and both models as one ensemble, exported."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {"one": str(folder / "one.onnx"), "both": str(folder / "both.onnx")}
    predict.main(["--checkpoint", checkpoints[0], "--export", paths["one"]])
    predict.main(["--checkpoint", *checkpoints, "--export", paths["both"]])
    return paths


def predicted(folder, checkpoints: list[str], *flags: str) -> list[list[str]]:
    """The submission rows of predict.py on the sample's test CSV, in fp32."""
    output = folder / "sub.csv"
    args = ["--checkpoint", *checkpoints, "--input", SAMPLE_TEST, "--output", str(output)]
    predict.main([*args, "--no-report", "--precision", "fp32", "--device", "cpu", *flags])
    with open(output, newline="") as f:
        return list(csv.reader(f))


def probabilities(rows: list[list[str]]) -> np.ndarray:
    return np.array([[float(p) for p in row[2:]] for row in rows[1:]])


@pytest.mark.parametrize("which", ["one", "both"])
def test_the_export_writes_the_same_submission_as_its_checkpoints(
    tmp_path, checkpoints, exported, which
):
    members = checkpoints[:1] if which == "one" else checkpoints
    assert predicted(tmp_path / "onnx", [exported[which]]) == predicted(tmp_path / "pt", members)


def test_an_exported_ensemble_averages_its_members_inside_the_graph(
    tmp_path, checkpoints, exported
):
    onnx_probs = probabilities(predicted(tmp_path / "o", [exported["both"]], "--probabilities"))
    pt_probs = probabilities(predicted(tmp_path / "p", checkpoints, "--probabilities"))
    np.testing.assert_allclose(onnx_probs, pt_probs, atol=export.TOLERANCE)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_the_export_takes_any_batch_size(tmp_path, exported, batch_size):
    whole = probabilities(predicted(tmp_path / "a", [exported["one"]], "--probabilities"))
    flags = ("--probabilities", "--batch-size", str(batch_size))
    np.testing.assert_allclose(
        probabilities(predicted(tmp_path / "b", [exported["one"]], *flags)), whole, atol=1e-6
    )


def test_test_time_augmentation_works_on_the_export(tmp_path, checkpoints, exported):
    onnx_probs = probabilities(
        predicted(tmp_path / "o", [exported["one"]], "--probabilities", "--tta")
    )
    pt_probs = probabilities(predicted(tmp_path / "p", checkpoints[:1], "--probabilities", "--tta"))
    np.testing.assert_allclose(onnx_probs, pt_probs, atol=export.TOLERANCE)


def test_the_metadata_names_the_classes_and_the_models(exported, checkpoints):
    meta = {p.key: p.value for p in onnx.load(exported["both"]).metadata_props}
    assert json.loads(meta["class_names"]) == list(dataset.DIGIT_CLASSES)
    stories = json.loads(meta["models"])
    assert [s["arch"] for s in stories] == ["basic", "strong"]
    assert stories[0]["temperature"] == model.load_checkpoint(checkpoints[0])["temperature"]


def test_the_report_of_an_export_tells_the_same_story(tmp_path, exported):
    predict.main(
        [
            "--checkpoint",
            exported["one"],
            "--input",
            SAMPLE_TEST,
            "--output",
            str(tmp_path / "s.csv"),
            "--report-dir",
            str(tmp_path / "report"),
        ]
    )
    page = (tmp_path / "report" / "report.html").read_text()
    assert "basic, " in page and "<h2>Calibration</h2>" in page
    assert (tmp_path / "report" / "training_curves_1.png").is_file()


def test_the_leak_guard_works_from_the_export(exported, checkpoints):
    images = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    onnx_models = onnx_model.OnnxEnsemble(exported["both"])
    pt_models = predict.Ensemble(checkpoints, torch.device("cpu"), predict.EXPORT_PRECISION)
    assert onnx_models.seen_in_training(images) == pt_models.seen_in_training(images)
    assert onnx_models.seen_in_training(images)["seen"] == 300


def test_an_export_that_does_not_match_pytorch_is_not_written(
    tmp_path, checkpoints, monkeypatch, capsys
):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    target = tmp_path / "bad.onnx"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main, ["--checkpoint", checkpoints[0], "--export", str(target)])
    assert exit_info.value.code == 2
    assert "differ from PyTorch's" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _foreign_onnx(path) -> None:
    """A valid ONNX model that is not an export of this project (no metadata)."""
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    opset = [onnx.helper.make_opsetid("", 17)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opset, ir_version=8), path)


PREDICT = ["--input", SAMPLE_TEST, "--checkpoint"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--checkpoint", "{pt}", "--export", "{folder}/m.txt"], "name a .onnx file"),
        (["--checkpoint", "{onnx}", "--export", "{folder}/m.onnx"], "give .pt checkpoints"),
        (["--checkpoint", "{pt}", "--export", "{folder}/m.onnx", "--tta"], "give --tta when"),
        ([*PREDICT, "{onnx}", "{pt}"], "an ONNX export stands alone"),
        ([*PREDICT, "{folder}/foreign.onnx"], "not an ONNX export of this project"),
        ([*PREDICT, "{folder}/corrupt.onnx"], "corrupt.onnx: not a loadable ONNX model"),
        ([*PREDICT, "{folder}/damaged.onnx"], "damaged.onnx: damaged export metadata"),
    ],
)
def test_bad_exports_get_one_line_and_exit_2(
    tmp_path, checkpoints, exported, capsys, flags, expected
):
    _foreign_onnx(tmp_path / "foreign.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 40)
    damaged = onnx.load(exported["one"])
    onnx.helper.set_model_props(damaged, {"format": onnx_model.FORMAT, "models": '[{"arch": 1}]'})
    onnx.save(damaged, tmp_path / "damaged.onnx")
    args = [f.format(folder=tmp_path, pt=checkpoints[0], onnx=exported["one"]) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main, [*args, "--output", str(tmp_path / "s.csv")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and expected in line
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "m.onnx").exists()


def _edited(source: str, edit: str):
    """The export at `source` with its inputs or outputs changed as `edit` says."""
    m = onnx.load(source)
    graph = m.graph
    if edit == "renamed input":
        old = graph.input[0].name
        graph.input[0].name = "images"
        for node in graph.node:
            node.input[:] = ["images" if name == old else name for name in node.input]
    elif edit == "fixed batch of 1":
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    elif edit == "extra input":
        graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    elif edit == "extra output":
        inner = graph.node[0].output[0]
        graph.output.append(onnx.helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
    return m


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("renamed input", "the graph takes images tensor(float)"),
        ("fixed batch of 1", "the graph takes pixels tensor(float) [1, 28, 28]"),
        ("extra input", "the graph takes pixels tensor(float)"),
        ("extra output", "the graph gives probabilities tensor(float)"),
    ],
)
def test_an_export_whose_inputs_or_outputs_do_not_fit_is_refused_at_load(
    tmp_path, exported, edit, expected
):
    onnx.save(_edited(exported["one"], edit), tmp_path / "edited.onnx")
    with pytest.raises(UserError) as err:
        onnx_model.OnnxEnsemble(str(tmp_path / "edited.onnx"))
    assert expected in str(err.value)


def test_class_names_given_as_one_string_are_refused(tmp_path, exported):
    m = onnx.load(exported["one"])
    onnx.helper.set_model_props(
        m, {**{p.key: p.value for p in m.metadata_props}, "class_names": '"0123456789"'}
    )
    onnx.save(m, tmp_path / "names.onnx")
    with pytest.raises(UserError, match="damaged export metadata: class_names is not a list"):
        onnx_model.OnnxEnsemble(str(tmp_path / "names.onnx"))
