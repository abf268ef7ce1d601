"""The fault catalogue (see docs/robustness.md): each bad input or crash ends in one clear line on stderr and a
non-zero exit, never a traceback, and loses no data. Run with ``pytest -m robust``.

Dataset-file faults (truncated, corrupt, wrong magic, wrong counts, labels out of range, hostile pickles, missing
files) are in test_data.py, also marked ``robust``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import checkpoint as ck
from cnnlab import rundir
from cnnlab.cli import main

pytestmark = pytest.mark.robust

TINY = ["--batch_size=16", "--log_every=2", "--ckpt_every=2", "--eval_batch_size=16", "--no-report"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def trained(tiny_data, tiny_run_copy):
    """A private copy of the session's tiny lenet5 run, checkpoints at steps 2 and 4 (tests may damage it)."""
    return tiny_run_copy.path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.section(ck.load_checkpoint(path)[0], "model")


# --- names and config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needles", [
    (["--recipe", "lenet5-mnist", "--model=resnet9000"], ["unknown model 'resnet9000'"]),
    (["--recipe", "lenet5-mnist", "--dataset=imagenet"], ["imagenet"]),
    (["--recipe", "lenet7-mnist"], ["unknown recipe 'lenet7-mnist'"]),
    (["--recipe", "lenet5-mnist", "--learning_rate=0.1"], ["unknown config key 'learning_rate'"]),
    (["--recipe", "lenet5-mnist", "--lr=-0.1"], ["lr must be > 0"]),
    (["--recipe", "lenet5-mnist", "--batch_size=0"], ["batch_size must be > 0"]),
    (["--recipe", "lenet5-mnist", "--steps=ten"], ["bad value for steps"]),
    (["--recipe", "lenet5-mnist", "--model_args.width=3"], ["takes no argument"]),
    # Set by the data: a clash of arguments (TypeError) before; the accepted-argument list no longer offers them.
    (["--recipe", "lenet5-mnist", "--model_args.num_classes=5"],
     ["model_args.num_classes is set by the dataset (10 classes); remove it"]),
    (["--recipe", "lenet5-mnist", "--model_args.in_chans=3"],
     ["model_args.in_chans is set by the dataset (1 channel); remove it"]),
    (["--recipe", "lenet5-mnist", "--model_args.foo=3"], ["takes no argument(s) foo; it takes img_size"]),
    # Inputs too small for the architecture failed in the first forward pass (RuntimeError).
    (["--recipe", "lenet5-mnist", "--model_args.img_size=4"], ["model 'lenet5' takes inputs of at least", "not 4x4"]),
    (["--recipe", "lenet5-mnist", "--model=mnist-fast", "--model_args.img_size=1"],
     ["model 'mnist-fast' takes inputs of at least", "not 1x1"]),
    (["--recipe", "lenet5-mnist", "--model=mnist-fast", "--model_args.img_size=2,3"],
     ["img_size must be a whole number >= 1", "got '2,3'"]),
    # A side no checkpoint can record: trained (at great cost) into checkpoints that cnnlab then refused to read.
    (["--recipe", "lenet5-mnist", "--model_args.img_size=5000"],
     ["model 'lenet5': img_size 5000 is larger than cnnlab's limit of 4096 pixels a side"]),
    (["--recipe", "lenet5-mnist", "--translate=1000"], ["translate=1000 is too large for the model's 28x28 input"]),
    (["--recipe", "lenet5-mnist", "--seed=99999999999999999999"], ["seed must be in [0, 2**63 - 1]"]),
    (["--recipe", "lenet5-mnist", "--lr=1e308"], ["lr is 1e+308, more than a float32 holds"]),
    (["--recipe", "lenet5-mnist", "--lr=inf"], ["lr must be finite, got inf"]),
    (["--recipe", "lenet5-mnist", "--optimizer=muon", "--muon_lr=inf"], ["muon_lr must be finite, got inf"]),
    (["--recipe", "lenet5-mnist", "--threads=-1"], ["threads must be >= 0, got -1"]),
])
def test_bad_names_and_values(tiny_data, tmp_path, capsys, argv, needles):
    code, _, err = run_cli(capsys, "train", "--model-dir", str(tmp_path / "r"), *argv)
    assert_one_line_error(code, err, *needles)
    assert not list((tmp_path / "r").glob("ckpt-*")) if (tmp_path / "r").exists() else True


@pytest.mark.parametrize("argv,needle", [
    (["--model=resnet9000"], "unknown model 'resnet9000'"),
    (["--device=cuda:0"], "no CUDA GPU is available"),
    (["--precision=fp16", "--device=cpu"], "fp16 needs a CUDA device"),
])
def test_train_refuses_model_device_and_precision_before_printing_its_config(tiny_data, tmp_path, capsys, argv,
                                                                              needle):
    """The error was the last line under the whole printed config; now it is the command's only output."""
    if "cuda" in argv[0] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, out, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(tmp_path / "r"), *argv)
    assert_one_line_error(code, err, needle)
    assert out == "" and not (tmp_path / "r").exists()


def test_bad_recipe_file(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text("model = 'lenet5'\nlr = 'fast'\n")
    code, _, err = run_cli(capsys, "train", "--recipe", str(f))
    assert_one_line_error(code, err, "bad value for lr")
    f.write_bytes(b"\xff\xfe")  # UTF-16's byte-order mark: a UnicodeDecodeError before
    code, _, err = run_cli(capsys, "train", "--recipe", str(f))
    assert_one_line_error(code, err, f"recipe {f}: not UTF-8 text")


def test_a_folder_with_one_class_is_refused(tiny_data, tmp_path, capsys):
    """A one-class classifier is right every time: it trained and reported accuracy 1.0."""
    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (28, 28), 40 * i).save(tmp_path / "one" / split / "cat" / f"{i}.png")
    code, _, err = run_cli(capsys, "train", "--model-dir", str(tmp_path / "r"), "--model=lenet5",
                           f"--dataset=folder:{tmp_path / 'one'}", "--steps=2", *TINY)
    assert_one_line_error(code, err, "only one class folder ('cat'); need at least 2 classes")
    assert not list((tmp_path / "r").glob("ckpt-*"))


# --- damaged run records --------------------------------------------------------------------------------------

def test_report_and_plot_skip_damaged_metrics_lines_with_one_warning(trained, capsys):
    log = trained / "metrics.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b"\xff\xfe not text\n" + b"[1, 2]\n" + b'{"kind": "train", "step": "x"}\n')
    n = len(good.splitlines())
    code, out, err = run_cli(capsys, "report", str(trained))
    assert code == 0, err
    assert err.splitlines() == [f"cnnlab: warning: {log}: skipped 3 damaged or unknown lines "
                                f"(lines {n + 1}, {n + 2}, {n + 3})"], err
    assert (trained / "report.html").is_file() and "training curves" in (trained / "report.html").read_text()
    code, out, err = run_cli(capsys, "plot", str(trained), "curves")
    assert code == 0 and (trained / "plots" / "curves.png").is_file() and err.count("cnnlab: warning:") == 1, err


def test_report_is_written_without_an_unreadable_results_json(trained, capsys):
    results = trained / "results.json"
    results.write_text("[1,2\n")
    code, out, err = run_cli(capsys, "report", str(trained))
    assert code == 0, err
    assert err.splitlines() == [f"cnnlab: warning: {results} is unreadable (JSONDecodeError); the report leaves "
                                "out what it records"]
    assert "test accuracy" in out and (trained / "report.html").is_file()
    assert results.read_text() == "[1,2\n"  # the user's file is left as it was


def test_resume_with_force_drops_damaged_metrics_lines(trained, capsys):
    log = trained / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b"\xff\n")
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(trained), "--steps=6",
                           "--force", *TINY)
    assert code == 0, err
    assert b"\xff" not in log.read_bytes() and max(json.loads(x)["step"] for x in log.read_text().splitlines()) == 6


# --- files to predict ----------------------------------------------------------------------------------------

def test_predict_bad_files(trained, tmp_path, capsys):
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "text.png": b"this is not an image\n",
        "truncated.png": None,  # filled below
    }
    buf = tmp_path / "good.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf)
    cases["truncated.png"] = buf.read_bytes()[:40]
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        code, _, err = run_cli(capsys, "predict", str(trained), str(path))
        assert_one_line_error(code, err, name)


def test_a_skipped_file_is_named_once(trained, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    code, out, err = run_cli(capsys, "predict", str(trained), str(folder))
    skip = [line for line in err.splitlines() if line.startswith("cnnlab: skipped ")]
    assert "good.png" in out and len(skip) == 1 and skip[0].count("empty.png") == 1, err


@pytest.mark.parametrize("mode,size", [("RGBA", (60, 40)), ("P", (28, 28)), ("I;16", (28, 28)), ("CMYK", (100, 100)),
                                       ("1", (300, 200)), ("LA", (5, 5))])
def test_predict_converts_odd_modes_and_sizes(trained, tmp_path, capsys, mode, size):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    Image.new(mode, size).save(path)
    code, out, err = run_cli(capsys, "predict", str(trained), str(path), "--json")
    assert code == 0, err
    pred = json.loads(out)[0]
    assert 0 <= pred["class"] < 10 and abs(sum(t["probability"] for t in pred["top_k"])) <= 1.0001


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_missing_run_dir(tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no such run directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "empty"), "x.png")
    assert_one_line_error(code, err, "no checkpoint in")


def test_checkpoint_of_another_architecture(trained, tmp_path, capsys):
    # A tf2-convnet checkpoint placed in the lenet5 run: resume refuses it...
    other = tmp_path / "other"
    assert main(["train", "--recipe", "tf2-convnet-mnist", "--model-dir", str(other), "--steps=2", *TINY]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(other), "--steps=4", *TINY)
    assert_one_line_error(code, err, "holds tf2-convnet")
    # ... and a checkpoint whose weights do not fit its own header is refused on load.
    tensors, meta = ck.load_checkpoint(ck.latest_checkpoint(trained))
    from safetensors.torch import save_file
    meta["model"] = {**meta["model"], "name": "tf-core-convnet", "args": {}}
    save_file(tensors, str(tmp_path / "ckpt-00000009.safetensors"), metadata={"cnnlab": json.dumps(meta)})
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "ckpt-00000009.safetensors"))
    assert_one_line_error(code, err, "does not match the model")


def test_checkpoint_from_newer_format(trained, tmp_path, capsys):
    from safetensors.torch import save_file
    tensors, meta = ck.load_checkpoint(ck.latest_checkpoint(trained))
    meta["format_version"] = ck.FORMAT_VERSION + 1
    path = tmp_path / "ckpt-00000004.safetensors"
    save_file(tensors, str(path), metadata={"cnnlab": json.dumps(meta)})
    code, _, err = run_cli(capsys, "evaluate", str(path))
    assert_one_line_error(code, err, "newer than this cnnlab reads", "upgrade")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "zero"])
def test_corrupt_checkpoint_is_refused(trained, capsys, damage):
    path = ck.latest_checkpoint(trained)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(2000), "zero": b""}[damage])
    code, _, err = run_cli(capsys, "evaluate", str(trained))
    # the run's older checkpoint was left unmentioned; the hint names it and the way to use it, which works
    older = ck.list_checkpoints(trained)[-2]
    assert_one_line_error(code, err, path.name, f"older checkpoint(s), the newest {older.name}: give it with "
                          "--checkpoint, or move the damaged file away")
    assert run_cli(capsys, "evaluate", str(trained), "--checkpoint", str(older))[0] == 0


class _Evil:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_checkpoint_executes_nothing(tmp_path, capsys, how):
    sentinel = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    path = run / "ckpt-00000001.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"model": _Evil(sentinel)}))
    else:
        torch.save({"model": _Evil(sentinel)}, path)
    for argv in (["evaluate", str(run)], ["predict", str(run), "x.png"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "not a valid cnnlab checkpoint")
    assert not sentinel.exists()


def test_disk_full_while_saving_keeps_previous_checkpoint(trained, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in ck.list_checkpoints(trained)}
    real_fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".ckpt-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(trained), "--steps=8", *TINY)
    assert_one_line_error(code, err, "No space left on device", "ckpt-00000006")
    assert {p.name: p.read_bytes() for p in ck.list_checkpoints(trained)} == before  # nothing lost or changed
    assert not [p for p in trained.iterdir() if rundir.TEMP_MARK in p.name]  # no partial file left behind
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(trained), "--steps=8", *TINY]) == 0


def test_read_only_model_dir(trained, monkeypatch, capsys):
    real_open = open

    def read_only(file, mode="r", *a, **kw):  # root ignores chmod, so simulate a read-only mount
        if any(m in mode for m in "wax+") and str(file).startswith(str(trained)):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", read_only)
    before = {p.name: p.read_bytes() for p in ck.list_checkpoints(trained)}
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(trained), "--steps=8", *TINY)
    assert_one_line_error(code, err, "Read-only file system")
    monkeypatch.setattr("builtins.open", real_open)
    assert {p.name: p.read_bytes() for p in ck.list_checkpoints(trained)} == before


def test_unwritable_model_dir_path(tiny_data, capsys):
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", "/proc/cnnlab-run", "--steps=2",
                           *TINY)
    assert_one_line_error(code, err, "/proc/cnnlab-run")


def test_inf_loss_stops_with_message(trained, capsys):
    good = weights(ck.latest_checkpoint(trained))
    code, _, err = run_cli(capsys, "train", "--recipe", "lenet5-mnist", "--model-dir", str(trained), "--steps=8",
                           "--lr=1e38", *TINY)
    assert_one_line_error(code, err, "loss became", "ckpt-00000004")
    latest = ck.latest_checkpoint(trained)
    assert latest.name == "ckpt-00000004.safetensors"
    assert all(torch.equal(good[k], v) for k, v in weights(latest).items())


def test_no_traceback_from_a_real_process(tiny_data, tmp_path):
    for argv in (["train", "--recipe", "nope"], ["evaluate", str(tmp_path)], ["models", "zzz*"],
                 ["train", "--recipe", "lenet5-mnist", "--dataset=cifar100", "--model-dir", str(tmp_path / "x")]):
        p = subprocess.run([sys.executable, "-m", "cnnlab", *argv], capture_output=True, text=True)
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# --- crash safety --------------------------------------------------------------------------------------------

def _cmd(model_dir: Path) -> list[str]:
    # ckpt_every=1: a save at every step, so random kills often land inside one.
    return [sys.executable, "-m", "cnnlab", "train", "--recipe", "tf-estimator-cnn-mnist-short", "--model-dir",
            str(model_dir), "--steps=30", "--batch_size=32", "--ckpt_every=1", "--keep_checkpoints=2",
            "--log_every=5", "--eval_batch_size=32", "--no-progress", "--no-report"]


def _temps(run: Path) -> list[Path]:
    return [p for p in run.iterdir() if rundir.TEMP_MARK in p.name] if run.is_dir() else []


def test_sigkill_inside_a_checkpoint_write_loses_nothing(tiny_data, tmp_path):
    # Deterministic: the test hook holds the writer between its fsync and its rename, and the kill lands there.
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data)}
    subprocess.run(_cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    reference = weights(ck.latest_checkpoint(tmp_path / "ref"))
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env={**env, "CNNLAB_TEST_PAUSE_BEFORE_RENAME": "ckpt-00000010.*=120"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [p for p in _temps(run) if p.name.startswith(".ckpt-00000010")]:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never reached step 10"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _temps(run)  # the kill left a partial write behind...
    assert ck.latest_checkpoint(run).name == "ckpt-00000009.safetensors"  # ...and the last whole checkpoint
    ck.load_checkpoint(ck.latest_checkpoint(run))
    final = subprocess.run(_cmd(run), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    got = weights(ck.latest_checkpoint(run))
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    assert not _temps(run)  # the partial file was removed on restart


def test_sigkill_at_random_moments_loses_nothing(tiny_data, tmp_path):
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data)}
    subprocess.run(_cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    reference = weights(ck.latest_checkpoint(tmp_path / "ref"))
    run, rng = tmp_path / "run", random.Random(0)
    kills = 0
    while kills < 20:
        proc = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_step = ck.latest_checkpoint(run)
        # wait until this process has trained a little past where it resumed, then kill at a random moment
        deadline = time.time() + 60
        while time.time() < deadline and ck.latest_checkpoint(run) == start_step and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.25))
        if proc.poll() is not None:  # finished before the kill: start over to get more kills
            shutil.rmtree(run)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        latest = ck.latest_checkpoint(run)
        if latest is not None:  # a kill during start-up may come before the first checkpoint
            ck.load_checkpoint(latest)  # every surviving checkpoint is whole
    final = subprocess.run(_cmd(run), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    got = weights(ck.latest_checkpoint(run))
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    assert not _temps(run)  # stale partial files cleaned up
