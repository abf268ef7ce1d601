"""Training controls: best checkpoint, early stopping, class balance, clipping, accumulation, fp16, MixUp/CutMix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from runs import crash_during_step

from cnnlab import checkpoint as ck
from cnnlab import create_model, load_dataset
from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.data.augment import Augment
from cnnlab.data.sources import ArrayDataset
from cnnlab.errors import CheckpointError, ConfigError
from cnnlab.infer import EvalResult, load_trained
from cnnlab.train import controls
from cnnlab.train import loop as loop_mod
from cnnlab.train.loop import fit
from cnnlab.train.steps import AlternatingFlip, EpochSampler, loss_terms, step_generator, train_step

QUIET = {"progress": False, "log": lambda *_: None}


def _config(**kw):
    base = {"model": "lenet5", "dataset": "mnist", "optimizer": "adam", "lr": 3e-3, "batch_size": 16, "steps": 12,
            "ckpt_every": 4, "log_every": 4, "eval_batch_size": 64}
    return make_config({**base, **kw})


def _sets():
    """Tiny MNIST, and a validation set of the training images with every label moved to the next class:
    the better the model learns, the worse it scores there, so validation accuracy peaks early."""
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    val = ArrayDataset(images=train.images, labels=(train.labels + 1) % 10, info=train.info, split="val")
    return {"train_set": train, "test_set": test, "val_set": val}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.section(ck.load_checkpoint(path)[0], "model")


def _evals(run: Path, split: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "eval" and r["split"] == split]


# ------------------------------------------------------------------ best checkpoint


def test_best_checkpoint_is_chosen_by_validation_and_used_by_evaluate(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    result = fit(_config(eval_every=2, keep_checkpoints=1), run, **_sets(), **QUIET)
    evals = _evals(run, "val")
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    peak = max(evals, key=lambda r: r["accuracy"])  # first of the maxima
    results = json.loads((run / "results.json").read_text())
    best_test = results["best"].pop("test")
    assert results["best"] == {"metric": "val_accuracy", "value": peak["accuracy"], "step": peak["step"]}
    assert peak["step"] < 12  # the set-up works: validation peaked before the end
    # the run reports the test split's reading of the weights it serves, as `evaluate` gives it
    assert main(["evaluate", str(run), "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["step"] == peak["step"] and result.best[0] == peak["step"]
    assert best_test["accuracy"] == pytest.approx(served["accuracy"]) == pytest.approx(result.best[1].accuracy)
    assert best_test["loss"] == pytest.approx(served["loss"], rel=1e-5)
    assert results["test"]["loss"] != pytest.approx(best_test["loss"])  # the final weights' reading is another

    # Kept beside the newest checkpoint, untouched by keep_checkpoints=1, and not what training resumes from.
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt-00000012.safetensors"]
    _, meta = ck.load_checkpoint(run / "best.safetensors")
    assert meta["step"] == peak["step"] and meta["optimizer"] is None
    assert ck.choose_checkpoint(run) == run / "best.safetensors"
    assert ck.choose_checkpoint(run, "latest") == run / "ckpt-00000012.safetensors"

    assert main(["evaluate", str(run), "--split", "train", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["step"] == peak["step"]
    assert main(["evaluate", str(run), "--split", "train", "--json", "--checkpoint", "latest"]) == 0
    latest = json.loads(capsys.readouterr().out)
    assert latest["step"] == 12 and latest["accuracy"] > best["accuracy"]  # latest fits train better
    path = run / "ckpt-00000012.safetensors"
    assert main(["evaluate", str(run), "--json", "--checkpoint", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 12
    # export, serve and report load through load_trained: the best by default too
    assert load_trained(run).step == peak["step"] and load_trained(run, checkpoint="latest").step == 12


def test_val_loss_picks_the_lowest_loss(tiny_data, tmp_path):
    run = tmp_path / "run"
    fit(_config(eval_every=4, select_metric="val_loss"), run, **_sets(), **QUIET)
    evals = _evals(run, "val")
    low = min(evals, key=lambda r: r["loss"])
    assert json.loads((run / "results.json").read_text())["best"]["step"] == low["step"]


def test_choose_checkpoint_errors_are_one_line(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    fit(_config(steps=4), run, **QUIET)  # eval_every=0: no best kept
    assert ck.choose_checkpoint(run) == ck.latest_checkpoint(run)
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        ck.choose_checkpoint(run, "best")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ck.choose_checkpoint(run, str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ck.choose_checkpoint(tmp_path, "latest")
    assert main(["evaluate", str(run), "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err
    assert "no best.safetensors" in err and len(err.strip().splitlines()) == 1


def test_fresh_start_removes_an_old_best_file(tiny_data, tmp_path):
    run = tmp_path / "run"
    fit(_config(eval_every=2, steps=4), run, **_sets(), **QUIET)
    assert (run / "best.safetensors").is_file()
    for p in ck.list_checkpoints(run):
        p.unlink()
    fit(_config(steps=4), run, **QUIET)  # starts again from step 0 without evaluations
    assert not (run / "best.safetensors").exists()


# ------------------------------------------------------------------ early stopping


def test_selection_counts_evaluations_without_improvement():
    sel = controls.Selection("val_accuracy", patience=2, min_delta=0.01, eval_every=5)
    stops = []
    for step, acc in [(5, 0.5), (10, 0.6), (15, 0.605), (20, 0.62), (25, 0.62), (30, 0.61)]:
        sel.update({"accuracy": acc}, step)
        stops.append(sel.should_stop(step))
    assert (sel.best_value, sel.best_step) == (0.62, 20)  # 0.605 was within min_delta of 0.6
    assert stops == [False, False, False, False, False, True]
    loss = controls.Selection("val_loss", patience=1, min_delta=0.0, eval_every=1)
    assert loss.update({"loss": 2.0}, 1) and loss.update({"loss": 1.5}, 2) and not loss.update({"loss": 1.7}, 3)
    assert loss.should_stop(3) and not controls.Selection("val_loss", 0, 0.0, 1).should_stop(99)
    assert not loss.update({"loss": float("nan")}, 4)


def test_early_stop_stops_at_the_expected_step_and_a_rerun_stays_stopped(tiny_data, tmp_path, monkeypatch):
    run, sets = tmp_path / "run", _sets()
    result = fit(_config(eval_every=2, patience=2, steps=40), run, **sets, **QUIET)
    best = json.loads((run / "results.json").read_text())["best"]
    assert result.step == best["step"] + 2 * 2 < 40  # two evaluations without improvement after the best
    assert json.loads((run / "results.json").read_text())["stopped_early"] is True
    assert ck.latest_checkpoint(run).name == f"ckpt-{result.step:08d}.safetensors"

    calls = []
    monkeypatch.setattr(loop_mod, "train_step", lambda *a, **k: calls.append(1))
    again = fit(_config(eval_every=2, patience=2, steps=40), run, **sets, **QUIET)
    assert again.step == result.step and calls == []


def test_patience_needs_evaluations():
    with pytest.raises(ConfigError, match="patience needs eval_every > 0"):
        _config(patience=3)


class _Dist:
    """A one-process DistContext stand-in whose evaluations return given accuracies, recording each call."""

    device = torch.device("cpu")

    def __init__(self, accuracies: list[float]):
        self.accuracies, self.calls = list(accuracies), []

    def evaluate(self, model, images, labels, **kw) -> EvalResult:
        self.calls.append(images)
        return EvalResult(loss=1.0, accuracy=self.accuracies.pop(0), n=len(images), logits=torch.zeros(0))


def _evaluator(dist: _Dist, separate: bool, eval_every: int = 2, patience: int = 0):
    test = SimpleNamespace(images=torch.zeros(3), labels=torch.zeros(3), split="test")
    val = SimpleNamespace(images=torch.zeros(2), labels=torch.zeros(2), split="val") if separate else test
    records, saved = [], []
    config = _config(eval_every=eval_every, patience=patience)
    ev = controls.Evaluator.for_run(config, None, val, test, controls.Selection.from_config(config), dist,
                                    records.append, lambda: saved.append(1))
    return ev, records, saved


def test_evaluator_validates_on_schedule_and_the_final_test_counts_for_the_best_when_it_is_the_val_split():
    dist = _Dist([0.5, 0.7])
    ev, records, saved = _evaluator(dist, separate=False)
    assert [s for s in range(1, 7) if ev.due(s, total=6)] == [2, 4]  # not 6: the final test evaluation is it
    ev.validate(None, 2)
    test, val = ev.finish(None, 6)
    assert (test.accuracy, val) == (0.7, None) and len(dist.calls) == 2
    assert [(r["split"], r["step"]) for r in records] == [("test", 2), ("test", 6)]
    assert (ev.selection.best_step, len(saved)) == (6, 2)  # the final evaluation improved: saved as the best


def test_evaluator_reuses_an_evaluation_of_the_final_step_and_evaluates_a_separate_test_split():
    dist = _Dist([0.5, 0.4, 0.9])
    ev, records, saved = _evaluator(dist, separate=True)
    assert [s for s in range(1, 6) if ev.due(s, total=5)] == [2, 4, 5]  # the last step is validated too
    ev.validate(None, 4)
    ev.validate(None, 5)
    test, val = ev.finish(None, 5)
    assert (test.accuracy, val.accuracy, val.n, test.n) == (0.9, 0.4, 2, 3)  # val not evaluated again
    assert [(r["split"], r["step"]) for r in records] == [("val", 4), ("val", 5), ("test", 5)]
    assert (ev.selection.best_step, len(saved)) == (4, 1)  # the test split never picks the best

    stopped = _Dist([0.5])  # one split, stopped early right after validating: no second evaluation
    ev, records, _ = _evaluator(stopped, separate=False)
    ev.validate(None, 2)
    assert ev.finish(None, 2)[0].accuracy == 0.5 and len(stopped.calls) == 1 and len(records) == 1


def test_set_lr_follows_the_schedule_times_each_groups_lr_mult():
    config = _config(lr=0.1, schedule="linear")
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_mult": 1.0},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr_mult": 0.5},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=0.1)
    loop_mod.set_lr(opt, config, step=3, total=4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.0125, 0.025])


# ------------------------------------------------------------------ class balance


def test_balanced_class_weights_change_the_loss_as_computed_by_hand():
    labels = torch.tensor([0, 0, 0, 1])
    w = controls.class_weights(labels, 3, "balanced")
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]))  # n / (K * count); an absent class gets 0
    assert controls.class_weights(labels, 3, "none") is None

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=3)
    x, y = torch.rand(4, 1, 28, 28), labels
    with torch.no_grad():
        logp = F.log_softmax(model(x), 1)
    by_hand = -(w[y] * logp[torch.arange(4), y]).sum() / w[y].sum()
    plain = -logp[torch.arange(4), y].mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(model, opt, x, y, class_weight=w)
    assert torch.allclose(loss, by_hand, atol=1e-6) and not torch.allclose(loss, plain, atol=1e-3)


def test_soft_targets_give_the_hard_target_loss_for_one_hot_rows():
    torch.manual_seed(0)
    logits, y, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1]), torch.rand(4)
    for smoothing in (0.0, 0.1):
        want = F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing)
        total, denom = loss_terms(logits, F.one_hot(y, 4).float(), weight=w, label_smoothing=smoothing)
        assert torch.allclose(total / denom, want, atol=1e-6)


def test_balanced_sampler_is_balanced_and_a_function_of_seed_and_step():
    labels = torch.tensor([0] * 90 + [1] * 10)
    s = controls.BalancedSampler(labels, batch_size=50, seed=3)
    drawn = torch.cat([s.indices(step) for step in range(40)])
    minority = (labels[drawn] == 1).float().mean().item()
    assert 0.4 < minority < 0.6  # 0.1 with shuffled epochs
    again = controls.BalancedSampler(labels, batch_size=50, seed=3)
    assert torch.equal(s.indices(17), again.indices(17)) and not torch.equal(s.indices(17), s.indices(18))
    assert not torch.equal(s.indices(17), controls.BalancedSampler(labels, 50, seed=4).indices(17))


def test_class_weights_and_balanced_sampler_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        _config(class_weights="balanced", sampler="balanced")


# ------------------------------------------------------------------ clipping and accumulation


def _grad_norm(model: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_clipping_bounds_the_gradient_norm():
    torch.manual_seed(0)
    model = create_model("lenet5")
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    free = copy.deepcopy(model)
    train_step(free, torch.optim.SGD(free.parameters(), lr=0.1), x, y)
    assert _grad_norm(free) > 0.05  # without clipping the norm is above the limit
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, clip_grad_norm=0.05)
    assert _grad_norm(model) <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("targets", ["hard", "weighted", "soft"])
def test_accumulation_of_4x25_matches_one_batch_of_100(targets):
    torch.manual_seed(0)
    model = create_model("lenet5")  # no batch norm, no dropout: the step is the same function of the batch
    x, y = torch.rand(100, 1, 28, 28), torch.randint(0, 10, (100,))
    weight = controls.class_weights(y, 10, "balanced") if targets == "weighted" else None
    if targets == "soft":
        x, y = controls.mix_batch(x, y, 10, step_generator(0, 0), mixup=0.4, cutmix=1.0)
    after = {}
    for n in (1, 4):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        loss, logits = train_step(m, opt, x, y, class_weight=weight, label_smoothing=0.1, accumulate=n)
        after[n] = (loss, logits.shape, m.state_dict())
    assert after[1][1] == after[4][1] == (100, 10)
    assert torch.allclose(after[1][0], after[4][0], atol=1e-5)
    for k, v in after[1][2].items():
        assert (v - after[4][2][k]).abs().max().item() <= 1e-5, k
        assert not torch.equal(v, model.state_dict()[k])  # the step did move every weight


def test_accumulation_in_a_run_matches_the_plain_run(tiny_data, tmp_path):
    for name, acc in (("one", 1), ("four", 4)):
        fit(_config(steps=1, ckpt_every=1, accumulate=acc, lr=0.01), tmp_path / name, **QUIET)
    a, b = (_weights(ck.latest_checkpoint(tmp_path / n)) for n in ("one", "four"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


# ------------------------------------------------------------------ fp16


def test_fp16_on_cpu_is_a_one_line_error(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="^fp16 needs a CUDA device; use bf16 on CPU$"):
        controls.check_precision("fp16", torch.device("cpu"))
    controls.check_precision("fp16", torch.device("cuda"))
    rc = main(["train", "--model-dir", str(tmp_path / "r"), "--model=lenet5", "--steps=1", "--precision=fp16",
               "--device=cpu", "--no-report", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "fp16 needs a CUDA device; use bf16 on CPU" in err


def test_scaler_disabled_outside_fp16_and_its_logic_on_cpu():
    """The fp16 path runs the GradScaler; here a CPU scaler exercises the same calls (not measured on a GPU)."""
    assert not controls.make_scaler("fp32", torch.device("cpu")).is_enabled()
    assert controls.scaler_state(controls.make_scaler("bf16", torch.device("cpu"))) == {}
    torch.manual_seed(0)
    model = create_model("lenet5")
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y, clip_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    train_step(scaled, torch.optim.SGD(scaled.parameters(), lr=0.1), x, y, clip_grad_norm=0.5, scaler=scaler)
    for k, v in plain.state_dict().items():  # unscaled before clipping: the same step
        assert torch.allclose(v, scaled.state_dict()[k], atol=1e-6), k

    # Non-finite gradients (an fp16 overflow) skip the step and halve the scale; the state goes through the
    # checkpoint header.
    before = copy.deepcopy(scaled.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    train_step(scaled, torch.optim.SGD(scaled.parameters(), lr=0.1), bad, y, scaler=scaler)
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in before.items())
    state = controls.scaler_state(scaler)
    assert state["scale"] == 2.0**11 and json.loads(json.dumps(state)) == state
    fresh = torch.amp.GradScaler("cpu")
    controls.restore_scaler(fresh, {"extra": {"grad_scaler": state}})
    assert fresh.get_scale() == 2.0**11


# ------------------------------------------------------------------ MixUp / CutMix


def test_mix_batch_is_seeded_soft_and_leaves_the_global_rng_alone():
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    rng = torch.get_rng_state()
    a = controls.mix_batch(x, y, 4, step_generator(0, 5), mixup=0.4, cutmix=1.0)
    b = controls.mix_batch(x, y, 4, step_generator(0, 5), mixup=0.4, cutmix=1.0)
    c = controls.mix_batch(x, y, 4, step_generator(0, 6), mixup=0.4, cutmix=1.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert torch.allclose(a[1].sum(1), torch.ones(8)) and a[1].shape == (8, 4)


def test_cutmix_targets_are_the_pasted_area():
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 10, 10).contiguous()  # image i is all i
    y = torch.arange(4)
    mixed, t = controls.mix_batch(x, y, 4, step_generator(1, 0), cutmix=1.0)
    for i in range(4):
        own = (mixed[i] == i).float().mean()
        assert torch.isclose(t[i, i], own), i  # (1 when paired with itself: then it is all its own)
    assert (t.diagonal() < 1).any()  # some image did get a patch of another


def test_mixup_cutmix_resume_is_bit_identical(tiny_data, tmp_path, monkeypatch):
    config = _config(mixup=0.4, cutmix=1.0, class_weights="balanced", clip_grad_norm=1.0, accumulate=2,
                     eval_every=4, steps=12, random_crop=True, translate=2)
    sets = _sets()
    fit(config, tmp_path / "a", **sets, **QUIET)
    # dies during step 7, after checkpoint 4 was written
    crash_during_step(monkeypatch, 7, lambda: fit(config, tmp_path / "b", **sets, **QUIET))
    torch.manual_seed(123)
    fit(config, tmp_path / "b", **sets, **QUIET)
    for name in ("ckpt-00000012.safetensors", "best.safetensors"):
        a, b = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    plain = _config(steps=12, eval_every=4)
    fit(plain, tmp_path / "c", **sets, **QUIET)
    a = _weights(tmp_path / "a" / "ckpt-00000012.safetensors")
    c = _weights(tmp_path / "c" / "ckpt-00000012.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the controls did change training


def test_balanced_sampler_resume_is_bit_identical(tiny_data, tmp_path, monkeypatch):
    config = _config(sampler="balanced", steps=8)
    fit(config, tmp_path / "a", **QUIET)
    crash_during_step(monkeypatch, 6, lambda: fit(config, tmp_path / "b", **QUIET))
    fit(config, tmp_path / "b", **QUIET)
    a, b = _weights(ck.latest_checkpoint(tmp_path / "a")), _weights(ck.latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key, value, message", [
    ("select_metric", "val_f1", "select_metric must be one of"),
    ("accumulate", 17, "accumulate must be in"),
    ("clip_grad_norm", -1.0, "clip_grad_norm must be >= 0"),
    ("mixup", -0.1, "mixup must be >= 0, got -0.1"),
    ("sampler", "weighted", "sampler must be one of"),
    ("precision", "fp8", "precision must be one of"),
])
def test_bad_control_values_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        _config(**{key: value})


def test_export_takes_the_best_by_default_and_latest_on_request(tiny_data, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    fit(_config(eval_every=2, steps=8, ckpt_every=8), run, **_sets(), **QUIET)
    assert json.loads((run / "results.json").read_text())["best"]["step"] < 8
    x, outs = torch.rand(2, 1, 28, 28), []
    for choice in ("auto", "latest"):
        assert main(["export", str(run), "--checkpoint", choice]) == 0
        assert f"wrote {run / 'model.onnx'}" in capsys.readouterr().out
        got = ort.InferenceSession(str(run / "model.onnx")).run(None, {"image": x.numpy()})[0]
        which = "best" if choice == "auto" else "latest"
        with torch.no_grad():
            want = load_trained(run, checkpoint=which).model(x)
        assert torch.allclose(torch.from_numpy(got), want, atol=1e-4), choice
        outs.append(got)
    assert not torch.allclose(torch.from_numpy(outs[0]), torch.from_numpy(outs[1]), atol=1e-3)  # two models


def test_alternating_flip_mirrors_each_image_once_in_any_two_epochs():
    n, batch = 40, 16  # batches straddle the epoch boundaries (every 2.5 batches)
    sampler, flips = EpochSampler(n, batch, seed=3), AlternatingFlip(n, batch, seed=3)
    seen: dict[int, list[bool]] = {i: [] for i in range(n)}
    for step in range(4 * n // batch):  # four epochs
        idx = sampler.indices(step)
        for i, mirrored in zip(idx.tolist(), flips.mask(idx, step).tolist()):
            seen[i].append(mirrored)
    for views in seen.values():
        assert len(views) == 4 and views[0] != views[1] and views[1] != views[2] and views[2] != views[3]
    first = [views[0] for views in seen.values()]
    assert 10 < sum(first) < 30  # half of the images start mirrored
    assert torch.equal(AlternatingFlip(n, batch, seed=3).first, flips.first)
    assert not torch.equal(AlternatingFlip(n, batch, seed=4).first, flips.first)


def test_augment_mirrors_the_masked_samples_without_drawing():
    x = torch.rand(4, 1, 5, 5)
    augment = Augment(size=(5, 5), flip=True)
    mask = torch.tensor([True, False, False, True])
    gen = step_generator(0, 0)
    out = augment(x, gen, mask)
    assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])
    assert torch.equal(gen.get_state(), step_generator(0, 0).get_state())  # the other draws are unchanged


def test_alternate_flip_needs_flip():
    with pytest.raises(ConfigError, match="alternate_flip needs flip"):
        make_config({"alternate_flip": True})


def test_training_batches_alternate_each_images_flip_between_epochs():
    n, batch = 6, 4  # an asymmetric image per index: its mirror is never itself
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, :, 0] = torch.arange(1, n + 1, dtype=torch.uint8)[:, None] * 40  # left column brightness = index
    config = make_config({"flip": True, "alternate_flip": True, "batch_size": batch, "channels_last": False})
    parts = SimpleNamespace(
        sampler=EpochSampler(n, batch, config.seed), flips=AlternatingFlip(n, batch, config.seed),
        batches=SimpleNamespace(take=lambda idx: (images[idx], idx), device=torch.device("cpu")),
        augment=Augment.from_config(config, (4, 4)), num_classes=10)
    dist = SimpleNamespace(shard=lambda t: t)
    mirrored: dict[int, list[bool]] = {i: [] for i in range(n)}
    for step in range(3):  # two epochs of 6 in batches of 4
        _, x, y = loop_mod._batch(parts, step, config, dist)
        for image, i in zip(x, y.tolist()):
            mirrored[i].append(bool(image[0, 0, -1] > 0))  # the bright column moved to the right
    assert all(len(m) == 2 and m[0] != m[1] for m in mirrored.values())
