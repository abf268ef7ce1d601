"""Training end to end on tiny data: CLI train -> resume -> evaluate -> predict, resume equality, API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runs import crash_during_step

from cnnlab import Classifier, create_model, load_dataset, train_step
from cnnlab import checkpoint as ck
from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.errors import CheckpointError
from cnnlab.train import finetune
from cnnlab.train.loop import fit

TINY = ["--batch_size=16", "--log_every=2", "--ckpt_every=4", "--eval_batch_size=16", "--no-report"]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ck.load_checkpoint(ck.latest_checkpoint(model_dir))
    return ck.section(tensors, "model")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_train_resume_evaluate_predict(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "tf-estimator-cnn-mnist-short", "--model-dir", str(run), "--steps=6", *TINY]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "test accuracy" in out
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt-00000004.safetensors", "ckpt-00000006.safetensors"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert records[-1]["kind"] == "eval" and records[-1]["n"] == 32
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["steps"] == 6 and cfg["seed"] == 0 and "code_version" in cfg

    # Same command with more steps: resumes from step 6 instead of starting again.
    argv = ["train", "--recipe", "tf-estimator-cnn-mnist-short", "--model-dir", str(run), "--steps=10", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming from ckpt-00000006.safetensors (step 6)" in out and "step 10/10" in out and "step 2/" not in out
    assert "settings changed since that checkpoint: steps 6 -> 10\n" in out  # the one setting that differs

    assert main(["evaluate", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 32 and res["step"] == 10 and 0 <= res["accuracy"] <= 1

    img = tmp_path / "digit.png"
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(img)
    assert main(["predict", str(run), str(img), "--json", "--top-k", "2"]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    assert pred["file"] == str(img) and len(pred["top_k"]) == 2 and pred["label"] in [str(i) for i in range(10)]
    assert pred["top_k"][0]["probability"] >= pred["top_k"][1]["probability"]

    paper = np.full((90, 90), 255, np.uint8)
    paper[5:30, 70:76] = 0  # a small dark '1' in the corner of a white page
    Image.fromarray(paper).save(img)
    got = {}
    for flag in ([], ["--centre"]):
        assert main(["predict", str(run), str(img), "--json", "--all-probs", *flag]) == 0
        got[bool(flag)] = json.loads(capsys.readouterr().out)[0]["probabilities"]
    want = Classifier(model_dir=run).predict(Image.fromarray(paper), centre=True)[0]["probabilities"]
    assert np.allclose(got[True], want, atol=1e-6) and not np.allclose(got[True], got[False], atol=1e-4)


@pytest.mark.parametrize("optimizer", [{"model": "tf-estimator-cnn", "optimizer": "adam", "lr": 1e-3},
                                       {"model": "mnist-fast", "optimizer": "muon", "lr": 0.05},
                                       {"model": "mnist-fast", "optimizer": "nesterov", "lr": 0.05, "flip": True,
                                        "alternate_flip": True}])
def test_interrupted_run_resumes_to_identical_weights(tiny_data, tmp_path, monkeypatch, optimizer):
    config = make_config({**optimizer, "dataset": "mnist", "schedule": "onecycle", "warmup": 0.25,
                          "batch_size": 24, "steps": 12, "ckpt_every": 4, "log_every": 4, "eval_batch_size": 32})
    fit(config, tmp_path / "a", progress=False, log=lambda *_: None)

    # dies during step 7, after checkpoint 4 was written
    crash_during_step(monkeypatch, 7, lambda: fit(config, tmp_path / "b", progress=False, log=lambda *_: None))
    assert ck.latest_checkpoint(tmp_path / "b").name == "ckpt-00000004.safetensors"
    torch.manual_seed(123)  # resume must not depend on the process's RNG state before it
    fit(config, tmp_path / "b", progress=False, log=lambda *_: None)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [4, 8, 12]  # the log holds no duplicates of the re-run steps


def _train_cmd(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cnnlab", "train", "--recipe", "tf-estimator-cnn-mnist-short",
            "--model-dir", str(model_dir), "--steps=40", "--batch_size=32", "--ckpt_every=5", "--log_every=5",
            "--eval_batch_size=32", "--no-progress", "--no-report"]


def test_sigkill_then_rerun_equals_uninterrupted(tiny_data, tmp_path):
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data)}
    subprocess.run(_train_cmd(tmp_path / "a"), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not ck.list_checkpoints(tmp_path / "b"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ck.latest_checkpoint(tmp_path / "b")
    assert killed_at is not None and killed_at.name != "ckpt-00000040.safetensors", "run ended before the kill"
    rerun = subprocess.run(_train_cmd(tmp_path / "b"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_same_seed_same_weights_other_seed_differs(tiny_data, tmp_path):
    base = {"model": "lenet5", "dataset": "mnist", "batch_size": 16, "steps": 5, "ckpt_every": 5, "log_every": 5}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        fit(make_config({**base, "seed": seed}), tmp_path / name, progress=False, log=lambda *_: None)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not torch.equal(weights(tmp_path / "a")["features.0.weight"], weights(tmp_path / "c")["features.0.weight"])


def test_cifar_recipe_with_distortions_runs(tiny_data, tmp_path, capsys):
    run = tmp_path / "cifar"
    assert main(["train", "--recipe", "cifar10-prettytensor", "--model-dir", str(run), "--steps=3",
                 "--batch_size=8", "--log_every=1", "--eval_batch_size=8", "--no-report"]) == 0
    assert "step 3/3" in capsys.readouterr().out
    img = tmp_path / "cat.jpg"
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(img)
    assert main(["predict", str(run), str(img)]) == 0
    assert capsys.readouterr().out.split(":")[1].split()[0] in load_dataset("cifar10").info.class_names


def test_classifier_api(tiny_data, tmp_path):
    clf = Classifier(model="lenet5", model_dir=tmp_path / "lenet", dataset="mnist", batch_size=16, lr=0.05,
                     log_every=5, ckpt_every=10)
    metrics = clf.train(steps=10, log=lambda *_: None)
    assert set(metrics) == {"loss", "accuracy", "n"}
    ev = clf.evaluate()
    assert ev["accuracy"] == pytest.approx(metrics["accuracy"]) and ev["step"] == 10
    test = load_dataset("mnist", "test")
    preds = clf.predict(test.images[:4])
    assert len(preds) == 4 and all(abs(sum(p["probabilities"]) - 1) < 1e-5 for p in preds)
    arrays = clf.predict([test.images[0, 0].numpy()])  # an HxW uint8 array
    assert arrays[0]["class"] == preds[0]["class"]
    # A second Classifier on the same directory picks the run up from its config.
    again = Classifier(model_dir=tmp_path / "lenet")
    assert again.config.model == "lenet5" and again.evaluate()["step"] == 10


def test_plain_building_blocks():
    model = create_model("lenet5")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    first, _ = train_step(model, opt, x, y)
    for _ in range(20):
        loss, logits = train_step(model, opt, x, y)
    assert loss < first and logits.shape == (8, 10)


def test_resume_refuses_another_architecture(tiny_run_copy, capsys):
    run, data = tiny_run_copy
    argv = ["train", "--recipe", "tf2-convnet-mnist", "--model-dir", str(run), "--data-dir", str(data), "--steps=6"]
    assert main([*argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds lenet5" in err and "another --model-dir" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run_copy, capsys):
    run, data = tiny_run_copy  # checkpoints at steps 2 and 4
    good = weights(run)
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), "--data-dir", str(data),
                 "--batch_size=16", "--log_every=1", "--ckpt_every=2", "--no-report", "--steps=8",
                 "--lr=1e30"]) == 2  # diverges at once
    err = capsys.readouterr().err
    assert "loss became" in err and "ckpt-00000004" in err
    assert ck.latest_checkpoint(run).name == "ckpt-00000004.safetensors"
    assert_same_weights(good, weights(run))


def test_pickle_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "ckpt-00000001.safetensors"
    torch.save({"model": 1}, evil)
    with pytest.raises(CheckpointError, match="not a valid cnnlab checkpoint"):
        ck.load_checkpoint(evil)


@pytest.mark.parametrize("backend", ["onednn", "torch"])
def test_training_runs_dense_layers_on_the_chosen_backend_and_records_it(tiny_data, tmp_path, monkeypatch, backend):
    from cnnlab.models.layers import OneDnnLinear

    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    monkeypatch.setenv("CNNLAB_LINEAR", backend)
    cfg = {"model": "tf-estimator-cnn", "dataset": "mnist", "batch_size": 16, "steps": 2, "ckpt_every": 2,
           "log_every": 2, "eval_batch_size": 16}
    res = fit(make_config(cfg), tmp_path / "run", progress=False, log=lambda *_: None)
    kinds = {type(m) for m in res.model.modules()}
    assert (OneDnnLinear in kinds) == (backend == "onednn")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fp32_linear"] == backend
    # The checkpoint is a plain state dict: it loads into a model built the ordinary way.
    saved = ck.load_checkpoint(ck.latest_checkpoint(tmp_path / "run"))[0]
    create_model("tf-estimator-cnn").load_state_dict(ck.section(saved, "model"))


def test_compile_option_compiles_the_training_model(tiny_data, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model, *a, **kw):  # records the call; torch.compile itself takes too long for a unit test
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = {"model": "lenet5", "dataset": "mnist", "batch_size": 16, "steps": 2, "ckpt_every": 2, "log_every": 2,
           "eval_batch_size": 16, "compile": True}
    res = fit(make_config(cfg), tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(compiled) == 1 and compiled[0] is res.model
    assert res.step == 2
    # compiled models keep nn.Linear (inductor wants plain aten ops), and config.json says so
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fp32_linear"] == "torch"


@pytest.mark.parametrize("kind", ["sgd", "momentum", "nesterov", "adam", "adamw", "muon"])
def test_eager_optimizers_update_and_save_as_torch_optim_does(kind):
    from cnnlab.train.muon import Muon
    from cnnlab.train.steps import make_optimizer

    def trained(compile_: bool):
        torch.manual_seed(0)
        model = create_model("lenet5")
        opt = make_optimizer(make_config({"optimizer": kind, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                                          "compile": compile_}), model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            train_step(model, opt, torch.rand(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        assert torch.is_grad_enabled()  # the step's grad mode is restored
        return model, opt

    model, opt = trained(False)
    ref_model, ref_opt = trained(True)  # with compile, the plain torch.optim class
    assert type(ref_opt) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, Muon)
    assert type(opt) is not type(ref_opt) and isinstance(opt, type(ref_opt))
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]
    assert state["state"].keys() == ref_state["state"].keys()
    for k in state["state"]:
        for name, v in state["state"][k].items():
            assert torch.equal(v, ref_state["state"][k][name]), (k, name)
    ref_opt.load_state_dict(state)  # each loads the other's state
    opt.load_state_dict(ref_state)


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_training_does_not_import_torch_dynamo(tiny_data, tmp_path, optimizer):
    """torch.optim's compile wrappers import torch._dynamo, the largest import of a training command; a run
    that does not compile skips them (a new torch that marks its optimizers some other way fails here)."""
    code = ("import sys; from cnnlab.cli import main; "
            f"rc = main(['train', '--model-dir', {str(tmp_path / 'run')!r}, '--data-dir', {str(tiny_data)!r}, "
            f"'--model=lenet5', '--optimizer={optimizer}', '--steps=3', '--batch_size=8', '--eval_batch_size=16', "
            "'--no-report', '--no-progress']); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"
    assert (tmp_path / "run" / "results.json").exists()


def test_unfreezing_leaves_the_parameters_a_model_keeps_fixed_fixed():
    m = create_model("airbench", w1=8, w2=8, w3=8)
    fixed = [p for p in m.parameters() if not p.requires_grad]
    assert fixed  # the whitening filters
    for step in range(3):
        finetune.apply_freeze(m, step, 2)
        assert all(not p.requires_grad for p in m.features.parameters()) == (step < 2)
    assert all(not p.requires_grad for p in fixed)
    assert all(p.requires_grad for p in m.parameters() if all(p is not q for q in fixed))
