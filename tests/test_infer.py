"""The inference layer: layering of the imports, the preprocessing record, one evaluation path, eval mode."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import itertools
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

import cnnlab
from cnnlab import checkpoint as ck
from cnnlab.analysis import analyze
from cnnlab.cli import main
from cnnlab.errors import CheckpointError, ModelError
from cnnlab.infer import (
    WindowMaxPool2d,
    apply_cpu_rewrites,
    eval_mode,
    load_trained,
    predict_logits,
    to_input,
    use_window_max_pool,
)
from cnnlab.models import create_model
from cnnlab.preprocess import Preprocess, for_training
from cnnlab.train import Classifier

SRC = Path(cnnlab.__file__).parent
QUIET = ["--no-progress", "--no-report", "--log_every=2", "--threads=1"]


# --------------------------------------------------------------------------- layering


def _resolve(text: str, package: list[str]) -> set[str]:
    """Absolute names of the modules (and imported names) of source ``text`` living in ``package``."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from .. import train` names a module
    return found


def _imported_modules(path: Path) -> set[str]:
    return _resolve(path.read_text(encoding="utf-8"), ["cnnlab", *path.parent.relative_to(SRC).parts])


INFERENCE_FILES = ["export.py", "infer.py", "checkpoint.py", "io.py", "preprocess.py", "modes.py", "bench.py",
                   *(f"serve/{p.name}" for p in sorted((SRC / "serve").glob("*.py"))),
                   *(f"analysis/{p.name}" for p in sorted((SRC / "analysis").glob("*.py")))]


@pytest.mark.parametrize("name", INFERENCE_FILES)
def test_inference_side_imports_nothing_from_train(name):
    train = sorted(m for m in _imported_modules(SRC / name) if m == "cnnlab.train" or m.startswith("cnnlab.train."))
    assert not train, f"{name} imports {train}"


def test_import_scanner_resolves_relative_imports():
    # The layering test is only as good as its scanner: `..train` from inside a subpackage is cnnlab.train.
    text = "from ..train.loop import fit\nfrom .. import train\nimport cnnlab.train.steps\nfrom .batcher import B\n"
    found = _resolve(text, ["cnnlab", "serve"])
    assert {"cnnlab.train.loop", "cnnlab.train", "cnnlab.train.steps", "cnnlab.serve.batcher"} <= found
    assert "cnnlab.infer" in _imported_modules(SRC / "serve" / "app.py")


# --------------------------------------------------------------------------- small units


def test_cuda_rng_keys_in_device_order():
    keys = ["rng/torch", "rng/cuda10", "rng/cuda2", "model/w", "rng/cuda0", "rng/cuda1", "rng/cudax"]
    assert ck.cuda_rng_keys(keys) == ["rng/cuda0", "rng/cuda1", "rng/cuda2", "rng/cuda10"]
    assert sorted(k for k in keys if k.startswith("rng/cuda")) != ck.cuda_rng_keys(keys)  # text order was wrong


def test_eval_mode_restores_every_submodule_also_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout())
    model.train()
    model[1].eval()  # e.g. a frozen backbone's batch norm, kept in eval mode while the rest trains
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_predict_logits_restores_train_mode_when_the_model_fails():
    model = create_model("lenet5").train()
    with pytest.raises(ModelError):
        predict_logits(model, torch.zeros(2, 1, 32, 32, dtype=torch.uint8))  # wrong size: raises inside
    assert model.training


def test_preprocess_json_round_trip_and_bad_records():
    p = Preprocess(size=(32, 32), channels=3, crop=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert Preprocess.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.input_hw == (24, 24) and p.shape == (3, 32, 32)
    with pytest.raises(CheckpointError, match="unknown keys colour"):
        Preprocess.from_json({**p.to_json(), "colour": 1})
    with pytest.raises(CheckpointError, match="invert 'sometimes'"):
        Preprocess.from_json({**p.to_json(), "invert": "sometimes"})


def test_defaults_for_runs_saved_before_the_record():
    def info(name: str, shape: tuple[int, int, int]) -> SimpleNamespace:
        return SimpleNamespace(name=name, shape=shape)

    assert Preprocess.for_dataset(info("mnist", (1, 28, 28)), (1, 28, 28)).invert == "auto"
    assert Preprocess.for_dataset(info("fashion-mnist", (1, 28, 28)), (1, 28, 28)).invert == "auto"
    assert Preprocess.for_dataset(info("folder:/x", (1, 28, 28)), (1, 28, 28)).invert == "no"
    old_cifar = Preprocess.for_dataset(info("cifar10", (3, 32, 32)), (3, 24, 24))
    assert old_cifar.invert == "no" and old_cifar.size == (32, 32) and old_cifar.crop == (24, 24)


def test_no_silent_crop_or_pad():
    meta = create_model("lenet5").meta  # 1x28x28
    cifar_like = SimpleNamespace(name="x", shape=(1, 32, 32))
    with pytest.raises(ModelError, match="images are 32x32 but lenet5 takes 28x28"):
        for_training(cifar_like, meta, random_crop=False)
    assert for_training(cifar_like, meta, random_crop=True).crop == (28, 28)  # the CIFAR tutorial's scheme
    with pytest.raises(ModelError, match="images are 20x20"):
        for_training(SimpleNamespace(name="x", shape=(1, 20, 20)), meta, random_crop=True)  # never padded
    flexible = SimpleNamespace(name="any", input_size=(1, 28, 28), flexible_size=True)
    assert for_training(cifar_like, flexible, random_crop=False).crop is None  # fed the recorded size
    # Random-resized crops are brought to the model's input: evaluation takes the centre crop of that size.
    for model in (meta, flexible):
        assert for_training(cifar_like, model, random_crop=False, resized_crop=True).crop == (28, 28)
        with pytest.raises(ModelError, match="random_resized_crop .* 28x28 crops but the images are 20x20"):
            for_training(SimpleNamespace(name="x", shape=(1, 20, 20)), model, False, resized_crop=True)
    with pytest.raises(ModelError, match="img_size=32"):
        to_input(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), (1, 28, 28))
    # Non-square images: img_size is one side, so the advice is a square size, never img_size=<height>.
    with pytest.raises(ModelError, match=r"images are 20x30 but lenet5 takes 28x28 .*; lenet5 takes square inputs "
                                         r"only: decode the images at its size \(folder:PATH\?size=28\) or at a "
                                         r"square size N with img_size=N$") as e:
        for_training(SimpleNamespace(name="x", shape=(1, 20, 30)), meta, random_crop=False)
    assert "img_size=20" not in str(e.value)
    assert to_input(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), (1, 28, 28), crop=(28, 28)).shape == (1, 1, 28, 28)


# --------------------------------------------------------------------------- the forward pass's shortcuts


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN, and the same strides (the next layer sees the same tensor)."""
    same_nan = torch.equal(a.isnan(), b.isnan())
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and same_nan and a.stride() == b.stride()


@pytest.fixture
def slices_always(monkeypatch):
    """Every tiling max-pool takes the slices, whatever the input's size and layout."""
    monkeypatch.setattr("cnnlab.infer.WINDOW_MAX_MIN_NUMEL", 0)
    monkeypatch.setattr("cnnlab.infer.WINDOW_MAX_CL_CHANNELS", 10**9)


@contextlib.contextmanager
def _without_max_pool2d():
    """nn.MaxPool2d's own path fails inside the block, so what a pool computes there came from the slices."""
    def refuse(*a, **k):
        raise AssertionError("max_pool2d called")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.modules.pooling.F, "max_pool2d", refuse)
        yield


SHAPES = [(3, 6, 8, 8), (1, 6, 8, 8), (4, 1, 8, 8), (2, 5, 9, 10), (1, 1, 2, 2), (2, 3, 2, 9), (6, 7, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_window_max_pool_gives_max_pool2d_values_and_layout(shape, slices_always):
    torch.manual_seed(0)
    for fmt, k in itertools.product([torch.contiguous_format, torch.channels_last], [1, 2, 3]):
        if min(shape[-2:]) < k:
            continue
        x = torch.randn(shape)
        x.view(-1)[::7] = float("nan")
        x.view(-1)[1::5] = 0.0
        x = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
        ceil = (shape[-1] % k == 0 and shape[-2] % k == 0)  # ceil mode where it changes nothing: slices too
        pool = torch.nn.MaxPool2d(k, ceil_mode=ceil)
        want = pool(x)
        assert use_window_max_pool(pool) == 1 and type(pool) is WindowMaxPool2d
        with torch.no_grad(), _without_max_pool2d():
            assert _same(pool(x), want), (fmt, k)


def test_window_max_pool_leaves_the_rest_to_max_pool2d():
    torch.manual_seed(0)
    others = [torch.nn.MaxPool2d(3, 2), torch.nn.MaxPool2d(2, padding=1), torch.nn.MaxPool2d(2, dilation=2),
              torch.nn.MaxPool2d(2, return_indices=True), torch.nn.AvgPool2d(2)]
    assert use_window_max_pool(torch.nn.Sequential(*others)) == 0  # windows that overlap, pad or skip; indices
    pool = torch.nn.MaxPool2d(2, ceil_mode=True)
    use_window_max_pool(pool)
    x = torch.randn(2, 3, 7, 7)  # a ceil-mode window runs off the edge
    assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2, ceil_mode=True)) and pool(x).shape[-1] == 4
    # A gradient wanted: max_pool2d's own backward (the slices would split a tie's gradient).
    x = torch.ones(1, 1, 64, 64, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad.sum().item() == 32 * 32  # one window element each, as max_pool2d routes it
    # Export (ONNX export traces the model) records the pool as such.
    big = torch.randn(4, 8, 64, 64)
    assert WindowMaxPool2d.pays(big)
    graph = torch.export.export(pool, (big,)).graph
    assert [str(n.target) for n in graph.nodes if n.op == "call_function"] == ["aten.max_pool2d.default"]


def test_window_max_pool_is_taken_where_max_pool2d_is_slow_only():
    assert not WindowMaxPool2d.pays(torch.zeros(1, 6, 28, 28))  # a single small image: a fixed cost
    assert WindowMaxPool2d.pays(torch.zeros(32, 6, 28, 28).contiguous(memory_format=torch.channels_last))
    assert WindowMaxPool2d.pays(torch.zeros(32, 96, 14, 14))  # the contiguous kernel, at any width
    assert not WindowMaxPool2d.pays(torch.zeros(32, 96, 14, 14).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("name", ["lenet5", "tf-core-convnet", "mnist-fast", "cifar10-prettytensor"])
def test_cpu_rewrites_keep_the_logits_bit_for_bit(name, slices_always):
    torch.manual_seed(0)
    model = create_model(name).eval()
    for m in model.modules():  # trained-looking batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    c, h, w = model.meta.input_size
    images = torch.randint(0, 256, (5, c, h, w), dtype=torch.uint8)
    for channels_last in (False, True):
        plain = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        fast = copy.deepcopy(plain)
        apply_cpu_rewrites(fast, "torch", "cpu")
        assert any(isinstance(m, WindowMaxPool2d) for m in fast.modules())
        for batch in (5, 2):  # one batch; three, the last one short (a batch's size may change the rounding)
            want = predict_logits(plain, images, batch_size=batch, channels_last=channels_last)
            with _without_max_pool2d():
                assert torch.equal(predict_logits(fast, images, batch_size=batch, channels_last=channels_last), want)


def test_to_input_scales_crops_and_lays_out_as_float_division():
    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (3, 3, 10, 12), dtype=torch.uint8)
    x = to_input(u8, (3, 10, 12), channels_last=True)
    assert torch.equal(x, u8.float() / 255) and x.is_contiguous(memory_format=torch.channels_last)
    assert to_input(u8, (3, 10, 12)).is_contiguous()
    cropped = to_input(u8, (3, 8, 8), crop=(8, 8))  # crop on the bytes, then scale: the same values
    assert torch.equal(cropped, (u8.float() / 255)[..., 1:9, 2:10])
    padded = to_input(u8, (3, 12, 14), crop=(12, 14))
    assert torch.equal(padded, torch.nn.functional.pad(u8.float() / 255, (1, 1, 1, 1)))


def test_predict_logits_switches_a_training_model_to_eval_and_back():
    torch.manual_seed(0)
    model = create_model("tf-core-convnet")  # dropout: a training-mode forward pass would be random
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    model.train()
    model.head[1].eval()
    first = predict_logits(model, images)
    assert torch.equal(first, predict_logits(model, images))
    assert [m.training for m in model.modules()].count(False) == 1  # each flag as it was
    assert torch.equal(predict_logits(model.eval(), images), first)  # an eval-mode model: the same, untouched
    assert not any(m.training for m in model.modules())


def test_batcher_forward_thread_gets_its_own_torch_thread_count():
    from cnnlab.serve.batcher import MicroBatcher, forward_threads

    assert forward_threads(cpus=2, torch_threads=2) == 1  # one core left to the event loop
    assert forward_threads(cpus=8, torch_threads=8) == 7
    assert forward_threads(cpus=8, torch_threads=3) == 3  # never more than torch was told
    assert forward_threads(cpus=1, torch_threads=4) == 1

    before = torch.get_num_threads()
    mine = 1 if before > 1 else 2

    async def scenario() -> tuple[list[float], int]:
        b = MicroBatcher(lambda x: torch.full((len(x),), float(torch.get_num_threads())), threads=mine)
        await b.start()
        try:
            return (await b.submit(torch.zeros(2, 1))).tolist(), torch.get_num_threads()
        finally:
            await b.stop()

    counts, caller = asyncio.run(scenario())
    assert counts == [mine, mine]
    seen = []  # a thread started later still gets torch's default, not the worker's count
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert caller == before and seen == [before]


# --------------------------------------------------------------------------- trained runs


def _three_paths_agree(run, capsys):
    """Asserts that results.json (written by fit), `cnnlab evaluate --json` and the report's analysis give the
    same accuracy, loss and count for ``run``; returns the analysis."""
    fit_res = json.loads((run / "results.json").read_text())["test"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    cli_res = json.loads(capsys.readouterr().out)
    report = analyze(run)
    assert cli_res["accuracy"] == fit_res["accuracy"] == report.metrics.accuracy
    assert cli_res["loss"] == fit_res["loss"] and cli_res["n"] == fit_res["n"] == report.metrics.n
    return report


def test_bf16_run_same_accuracy_from_fit_evaluate_and_report(tiny_data, tmp_path, capsys):
    run = tmp_path / "bf16"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--steps=6", "--batch_size=16",
                 "--eval_batch_size=16", "--precision=bf16", "--channels_last=true", "--lr=0.05", *QUIET]) == 0
    report = _three_paths_agree(run, capsys)
    # The recorded precision is what makes them agree: the same weights in fp32 give other logits.
    trained = load_trained(run)
    assert trained.precision == "bf16" and trained.channels_last
    ds = trained.load_split("test")
    fp32 = predict_logits(trained.model, ds.images, batch_size=16)
    assert not torch.equal(fp32, report.logits)


def test_fp32_run_same_figures_from_fit_evaluate_and_report(tiny_data, tmp_path, capsys, monkeypatch):
    """fit evaluates through the CPU rewrites (oneDNN dense layers, whose rounding differs from torch's BLAS);
    evaluate and report rebuild the model with the same rewrites, so all three give the same figures."""
    monkeypatch.setenv("CNNLAB_LINEAR", "onednn")  # the rewrite on any machine; its 3136x1024 layer is large
    run = tmp_path / "fp32"
    assert main(["train", "--recipe", "tf-estimator-cnn-mnist-short", "--model-dir", str(run), "--steps=4",
                 "--batch_size=16", "--eval_batch_size=32", "--precision=fp32", "--lr=0.05", *QUIET]) == 0
    assert json.loads((run / "config.json").read_text())["fp32_linear"] == "onednn"
    _three_paths_agree(run, capsys)
    assert any(type(m).__name__ == "OneDnnLinear" for m in load_trained(run).model.modules())


def test_predict_and_report_take_the_checkpoint_option(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--steps=4", "--batch_size=16",
                 "--eval_batch_size=16", "--ckpt_every=2", "--lr=0.05", *QUIET]) == 0
    image = tmp_path / "digit.png"
    Image.fromarray((np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)).save(image)
    early = ck.checkpoint_path(run, 2)
    probs = {}
    for which in ("latest", str(early)):
        capsys.readouterr()
        assert main(["predict", str(run), str(image), "--json", "--all-probs", "--checkpoint", which]) == 0
        probs[which] = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert probs[str(early)] != probs["latest"]  # two steps of training apart
    want = load_trained(early).predict([image])[0]["probabilities"]
    assert np.allclose(probs[str(early)], want, atol=1e-6)
    assert main(["report", str(run), "--checkpoint", str(early), "--out", str(tmp_path / "r.html")]) == 0
    assert f"{run} step 2:" in capsys.readouterr().out
    assert main(["report", str(run), "--checkpoint", "best"]) != 0  # the run kept no best checkpoint
    err = capsys.readouterr().err.strip()
    assert "best.safetensors" in err and "\n" not in err


def test_preprocess_is_recorded_in_checkpoint_and_config(tiny_data, tmp_path):
    run = tmp_path / "cifar"
    assert main(["train", "--recipe", "cifar10-prettytensor", "--model-dir", str(run), "--steps=2",
                 "--batch_size=8", "--eval_batch_size=20", *QUIET]) == 0
    _, header = ck.load_checkpoint(ck.latest_checkpoint(run))
    want = {"size": [32, 32], "channels": 3, "invert": "no", "resize": "stretch", "interpolation": "bilinear",
            "mean": None, "std": None, "crop": [24, 24]}  # random 24x24 crops in training, the centre one after
    assert header["data"]["preprocess"] == want
    assert json.loads((run / "config.json").read_text())["data"]["preprocess"] == want
    assert load_trained(run).preprocess.crop == (24, 24)


def test_size_mismatch_fails_before_training(tiny_data, tmp_path, capsys):
    code = main(["train", "--model=lenet5", "--dataset=cifar10", "--model-dir", str(tmp_path / "r"), "--steps=1",
                 *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "images are 32x32 but lenet5 takes 28x28" in err and err.count("\n") == 1
    assert not list((tmp_path / "r").glob("ckpt-*"))


def _strip_preprocess(ckpt: Path) -> None:
    """Rewrite a checkpoint as a version without the preprocessing record wrote it."""
    tensors, meta = ck.load_checkpoint(ckpt)
    del meta["data"]["preprocess"]
    ckpt.write_bytes(st_save(tensors, metadata={"cnnlab": json.dumps(meta)}))


def test_old_checkpoint_without_record_gets_dataset_defaults(tiny_data, tmp_path):
    run = tmp_path / "old"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--steps=2", "--batch_size=16",
                 "--eval_batch_size=16", *QUIET]) == 0
    recorded = load_trained(run).preprocess
    _strip_preprocess(ck.latest_checkpoint(run))
    assert load_trained(run).preprocess == recorded == Preprocess(size=(28, 28), channels=1, invert="auto")


def _gray_folder(root: Path) -> Path:
    """Two classes of dark shapes on a light background (a light border), grayscale PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(["bar", "dot"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = np.full((16, 16), 230, np.uint8)
                if c == 0:
                    a[4:12, 7:9] = 20
                else:
                    a[6:10, 6:10] = 20
                a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a, "L").save(d / f"{i}.png")
    return root


def test_folder_run_predicts_with_its_recorded_polarity(data_env, tmp_path, capsys):
    root = _gray_folder(tmp_path / "shapes")
    run = tmp_path / "run"
    assert main(["train", "--model-dir", str(run), f"--dataset=folder:{root}?size=16", "--lr=0.01",
                 "--model=spec:in1x16x16-conv4k3-pool2-fc2", "--steps=2", "--batch_size=4", "--eval_batch_size=4",
                 *QUIET]) == 0
    trained = load_trained(run)
    assert trained.preprocess.invert == "no"  # folders train on their pixels as they are
    file = root / "val" / "bar" / "0.png"
    raw = torch.from_numpy(np.array(Image.open(file)))[None, None]
    assert torch.equal(trained.prepare(file), raw)  # light border, yet not inverted
    assert torch.equal(trained.prepare(file, invert="yes"), 255 - raw)  # an explicit choice still wins
    clf = Classifier(model_dir=run)
    assert torch.equal(clf.predict_proba(file), clf.predict_proba(file, invert="no"))
    assert not torch.allclose(clf.predict_proba(file), clf.predict_proba(file, invert="auto"))
    capsys.readouterr()
    assert main(["predict", str(run), str(file), "--json", "--all-probs"]) == 0
    cli = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert cli == pytest.approx(clf.predict_proba(file)[0].tolist(), abs=0)


def test_classifier_refuses_another_model_for_an_existing_run(tiny_data, tmp_path):
    run = tmp_path / "lenet"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--steps=1", "--batch_size=16",
                 "--eval_batch_size=16", *QUIET]) == 0
    assert Classifier(model="lenet5", model_dir=run).config.model == "lenet5"
    with pytest.raises(cnnlab.errors.ConfigError, match="holds a lenet5 run, not tf2-convnet"):
        Classifier(model="tf2-convnet", model_dir=run)


def test_server_decodes_as_the_run_recorded(data_env, tmp_path):
    pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
    from cnnlab.serve.decode import decode, plan_file

    root = _gray_folder(tmp_path / "shapes")
    run = tmp_path / "run"
    assert main(["train", "--model-dir", str(run), f"--dataset=folder:{root}?size=16", "--lr=0.01",
                 "--model=spec:in1x16x16-conv4k3-pool2-fc2", "--steps=1", "--batch_size=4", "--eval_batch_size=4",
                 *QUIET]) == 0
    trained = load_trained(run)
    assert trained.preprocess.resize == "shorter-crop"  # the folder default: a wide photo is not squashed
    wide = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (16, 1))
    wide[:, :4] = 0  # left edge dark: a stretch and a centre crop differ
    file = tmp_path / "wide.png"
    Image.fromarray(wide, "L").save(file)
    p = trained.preprocess
    served = decode(plan_file(file.read_bytes(), trained.data_shape, False), trained.data_shape, p.invert, False,
                    p.resize)
    assert torch.equal(served, trained.prepare(file))
    stretched = decode(plan_file(file.read_bytes(), trained.data_shape, False), trained.data_shape, p.invert, False)
    assert not torch.equal(served, stretched)  # what the server did before it read the record
