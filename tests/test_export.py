"""ONNX export: metadata, dynamic batch, parity with PyTorch, loud failures (needs the 'export' extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import copy_run, train_tiny_run

from cnnlab import Classifier, create_model, list_models, load_dataset
from cnnlab import export as export_mod
from cnnlab.cli import main
from cnnlab.export import check_parity
from cnnlab.infer import load_trained, to_input
from cnnlab.preprocess import Preprocess

onnx = pytest.importorskip("onnx", reason="the 'export' extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data root): this module's copy of the session's tiny run (export writes into it)."""
    copy = copy_run(tiny_run, tmp_path_factory.mktemp("export") / "run")
    return copy.path, copy.data


def test_cli_export_metadata_dynamic_batch_and_same_predictions(run, capsys):
    run_dir, data = run
    assert main(["export", str(run_dir), "--format", "onnx", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    path = run_dir / "model.onnx"  # the default place
    assert f"wrote {path}" in out and "max abs diff" in out

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    trained = load_trained(run_dir)
    assert json.loads(props["classes"]) == trained.classes == [str(i) for i in range(10)]
    assert json.loads(props["input_size"]) == [1, 28, 28]
    assert json.loads(props["data_shape"]) == [1, 28, 28]
    assert Preprocess.from_json(json.loads(props["preprocess"])) == trained.preprocess
    assert props["preprocessing"] == "grayscale, resize to 28x28 (bilinear), invert if the border is light, uint8 /255"
    assert props["model"] == "lenet5" and props["step"] == "4" and props["cnnlab_version"]
    (inp,) = model.graph.input
    assert inp.name == "image"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]

    # The file alone, preprocessed as its metadata says, predicts what the Python API predicts, at any batch size.
    images = load_dataset("mnist", "test", data_dir=data).images
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = Classifier(model_dir=run_dir).predict_proba(images)
    for n in (1, 5, 32):
        x = to_input(images[:n], tuple(json.loads(props["input_size"]))).numpy()
        (logits,) = session.run(None, {"image": x})
        probs = torch.softmax(torch.from_numpy(logits), 1)
        assert probs.shape == (n, 10)
        assert torch.allclose(probs, want[:n], atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_parity(name):
    model = create_model(name).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, *model.meta.input_size, generator=g)
    data = export_mod._to_onnx_bytes(model, x[:2], 18)
    with torch.no_grad():
        assert check_parity(data, [(x, model(x)), (x[:1], model(x[:1]))]) < 1e-4


@pytest.mark.robust
def test_parity_break_fails_loudly_and_writes_nothing(run, monkeypatch, capsys, tmp_path):
    run_dir, data = run
    real = export_mod._to_onnx_bytes

    def export_a_different_model(model, example, opset):  # a broken exporter: the graph's weights are off
        wrong = create_model("lenet5").eval()
        wrong.load_state_dict(model.state_dict())
        with torch.no_grad():
            wrong.head[-1].bias.add_(0.01)
        return real(wrong, example, opset)

    monkeypatch.setattr(export_mod, "_to_onnx_bytes", export_a_different_model)
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ONNX parity check failed: max abs difference of logits 0.01")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.robust
def test_missing_onnx_packages_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    assert main(["export", str(run[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cnnlab: error: ONNX export needs onnxruntime: pip install 'cnnlab[export]'"


@pytest.mark.robust
@pytest.mark.parametrize("case", ["no-run", "bad-out-dir"])
def test_bad_arguments_are_one_line(run, case, tmp_path, capsys):
    if case == "no-run":
        args = ["export", str(tmp_path / "nope")]
        expect = "no such run directory"
    else:
        args = ["export", str(run[0]), "--out", str(tmp_path / "missing" / "m.onnx"), "--data-dir", str(run[1])]
        expect = "output folder does not exist"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error:") and expect in err and len(err.strip().splitlines()) == 1


def test_sample_images_fall_back_to_smooth_images_without_data(run, tmp_path, data_env):
    trained = load_trained(run[0])
    u8 = export_mod.sample_images(trained, 4, data_dir=str(tmp_path / "empty"))
    assert u8.dtype == torch.uint8 and u8.shape == (4, 1, 28, 28)
    # smooth, not noise: neighbouring pixels are close on average
    assert np.abs(np.diff(u8.numpy().astype(int), axis=-1)).mean() < 20
    real = export_mod.sample_images(trained, 4, data_dir=str(run[1]))
    assert torch.equal(real, load_dataset("mnist", "test", data_dir=run[1]).images[:4])


def _opset(path: Path) -> int:
    return next(i.version for i in onnx.load(str(path)).opset_import if i.domain in ("", "ai.onnx"))


@pytest.mark.robust
@pytest.mark.parametrize("opset", [9, 13, 99])
def test_opset_out_of_range_is_one_line_before_any_export(run, opset, monkeypatch, tmp_path, capsys):
    def no_export(*args):
        raise AssertionError("the range is checked before anything is exported")

    monkeypatch.setattr(export_mod, "_to_onnx_bytes", no_export)
    out = tmp_path / "m.onnx"
    assert main(["export", str(run[0]), "--opset", str(opset), "--out", str(out), "--data-dir", str(run[1])]) == 2
    err = capsys.readouterr().err
    assert err == (f"cnnlab: error: --opset {opset} is not supported: torch's ONNX exporter produces opsets "
                   f"{export_mod.MIN_OPSET} to {export_mod.MAX_OPSET} (18, the default, and above work for every "
                   "model)\n")
    assert not out.exists()


def test_help_names_the_supported_opsets(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert f"{export_mod.MIN_OPSET} to {export_mod.MAX_OPSET}" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data root): a tiny lenet5 run that evaluates with flip-translate test-time augmentation."""
    root = tmp_path_factory.mktemp("tta-run")
    return train_tiny_run(root, extra=["--tta=flip-translate"]), root / "data"


@pytest.mark.robust
def test_opset_the_graph_cannot_be_converted_to_is_one_line(tta_run, tmp_path, capsys):
    # The exporter builds opset 18; its converter has no way down for the TTA's replicate padding (Pad), and
    # used to log a traceback, keep opset 18 and let the export "succeed".
    run_dir, data = tta_run
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--opset", "17", "--out", str(out), "--data-dir", str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("cnnlab: error: cannot export lenet5 with test-time augmentation "
                                   "'flip-translate' at ONNX opset 17: the exporter builds opset 18 and could not "
                                   "convert this graph to 17 (")
    assert "Use --opset 18 to 25" in captured.err and len(captured.err.splitlines()) == 1  # no traceback
    assert not out.exists() and "wrote" not in captured.out
    # The single-view lenet5 converts down, and the file says the opset asked for.
    assert main(["export", str(run_dir), "--opset", "15", "--no-tta", "--out", str(out), "--data-dir", str(data)]) == 0
    assert capsys.readouterr().err == "" and _opset(out) == 15


def _onnx_probs(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, str]]:
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    x = to_input(images, tuple(json.loads(props["input_size"]))).numpy()
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    return torch.softmax(torch.from_numpy(logits), 1), props


def test_graph_applies_the_runs_tta_as_predict_does_and_no_tta_is_the_single_view(tta_run, tmp_path, capsys):
    run_dir, data = tta_run
    images = load_dataset("mnist", "test", data_dir=data).images[:24]
    trained = load_trained(run_dir)
    assert trained.tta == "flip-translate"

    with_tta, plain = tmp_path / "tta.onnx", tmp_path / "plain.onnx"
    assert main(["export", str(run_dir), "--out", str(with_tta), "--data-dir", str(data)]) == 0
    probs, props = _onnx_probs(with_tta, images)
    want = trained.predict_proba(images)  # what `cnnlab predict` computes: the mean of six views' logits
    torch.testing.assert_close(probs, want, atol=1e-4, rtol=0)
    assert props["tta"] == props["graph_tta"] == "flip-translate"
    assert "with test-time augmentation flip-translate" in capsys.readouterr().out

    assert main(["export", str(run_dir), "--no-tta", "--out", str(plain), "--data-dir", str(data)]) == 0
    single, props = _onnx_probs(plain, images)
    with torch.no_grad():
        forward = torch.softmax(trained.model(to_input(images, (1, 28, 28))), 1)
    torch.testing.assert_close(single, forward, atol=1e-4, rtol=0)
    assert props["tta"] == "flip-translate" and props["graph_tta"] == "none"
    assert "single view" in capsys.readouterr().out
    assert (single - probs).abs().max() > 1e-3  # the two graphs differ: the comparisons above tell them apart


@pytest.mark.robust
@pytest.mark.parametrize("no_tta", [False, True])
def test_parity_is_checked_against_predict_with_or_without_tta(tta_run, no_tta, monkeypatch, tmp_path, capsys):
    # A graph that computes the other of the two (single view for a TTA export, TTA for a --no-tta one) must fail.
    run_dir, data = tta_run
    real = export_mod._to_onnx_bytes

    def the_other_graph(model, example, opset):
        other = export_mod.TtaModel(model, "flip-translate").eval() if no_tta else model.model
        return real(other, example, opset)

    monkeypatch.setattr(export_mod, "_to_onnx_bytes", the_other_graph)
    out = tmp_path / "m.onnx"
    args = ["export", str(run_dir), "--out", str(out), "--data-dir", str(data), *(["--no-tta"] if no_tta else [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ONNX parity check failed") and len(err.splitlines()) == 1
    assert not out.exists()
