"""Run directories (fault catalogue): one writer at a time, users' files never touched, SIGTERM resumes exactly,
odd paths and full disks end in one line."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from runs import train_tiny_run

from cnnlab import checkpoint as ck
from cnnlab import rundir
from cnnlab.cli import main
from cnnlab.train import hooks

pytestmark = pytest.mark.robust

TINY = ["--recipe", "lenet5-mnist", "--batch_size=16", "--log_every=2", "--eval_batch_size=16", "--no-report",
        "--no-progress"]


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("cnnlab: error: "), err
    for n in needles:
        assert n in err, err
    return err


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("rundir"))


@pytest.fixture
def run(tiny_data, template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


# --- the lock ------------------------------------------------------------------------------------------------

def _train_cmd(model_dir: Path) -> list[str]:
    # ckpt_every above steps: the only checkpoint before the end is the one SIGTERM asks for
    return [sys.executable, "-m", "cnnlab", "train", *TINY, "--steps=12", "--ckpt_every=100", "--model-dir",
            str(model_dir)]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = ck.load_checkpoint(ck.latest_checkpoint(model_dir))[0]
    return {k: v for k, v in tensors.items() if k.startswith(("model/", "optim/"))}


def _trainer_paused_at_step_5(run: Path, env: dict) -> subprocess.Popen:
    """A `cnnlab train` of ``_train_cmd(run)`` that has finished step 5 and waits for a signal (stderr piped)."""
    proc = subprocess.Popen(_train_cmd(run), env={**env, "CNNLAB_TEST_PAUSE_AT_STEP": "5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = Path(f"{run}.paused-5")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    return proc


def _resumes_to_the_reference(run: Path, ref: Path, env: dict) -> None:
    """Rerunning the command resumes ``run`` from step 5 and ends with the uninterrupted ``ref``'s tensors."""
    rerun = subprocess.run(_train_cmd(run), env=env, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0 and "resuming from ckpt-00000005" in rerun.stdout, rerun.stderr
    want, got = _tensors(ref), _tensors(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_second_trainer_is_refused_and_sigterm_resumes_bit_identically(tiny_data, tmp_path, capsys):
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data)}
    subprocess.run(_train_cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    proc = _trainer_paused_at_step_5(run, env)
    # A second trainer on the same directory stops at once, naming the first one.
    one_line_error(capsys, main(["train", *TINY, "--steps=12", "--model-dir", str(run)]),
                   f"in use by another cnnlab train (pid {proc.pid})")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == rundir.PREEMPTED_EXIT, err
    assert "stopped by SIGTERM at step 5" in err and "Traceback" not in err, err
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt-00000005.safetensors"]
    assert not (run / "results.json").exists()
    _resumes_to_the_reference(run, tmp_path / "ref", env)


def test_ctrl_c_during_training_saves_the_step_and_resumes_bit_identically(tiny_data, tmp_path):
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data)}
    subprocess.run(_train_cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    proc = _trainer_paused_at_step_5(run, env)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == rundir.INTERRUPTED_EXIT, err
    assert "saving a checkpoint after this step" in err and "stopped by SIGINT at step 5" in err, err
    assert "Traceback" not in err, err
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt-00000005.safetensors"]
    _resumes_to_the_reference(run, tmp_path / "ref", env)


def test_ctrl_c_outside_the_steps_or_twice_interrupts_at_once(tmp_path):
    with rundir.on_stop_signals(tmp_path) as stop:
        with pytest.raises(KeyboardInterrupt):  # not armed: loading data, the final evaluation...
            signal.raise_signal(signal.SIGINT)
        stop.armed = True
        signal.raise_signal(signal.SIGINT)  # armed: a request for the end of the step
        assert stop.requested and stop.signal_name == "SIGINT" and stop.check(1)
        with pytest.raises(KeyboardInterrupt):  # the second one does not wait
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a script ignores Ctrl-C
    try:
        with rundir.on_stop_signals(tmp_path) as stop:
            stop.armed = True
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and keeps ignoring it
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous)


def test_lock_held_in_this_process_is_named(run, capsys):
    with rundir.lock(run):
        one_line_error(capsys, main(["train", *TINY, "--steps=6", "--model-dir", str(run)]),
                       f"(pid {os.getpid()})")


def test_stale_lock_of_a_dead_process_is_taken_over(run, capsys):
    (run / rundir.LOCK_NAME).write_text(f"{dead_pid()}\n")
    assert main(["train", *TINY, "--steps=6", "--model-dir", str(run)]) == 0
    assert ck.latest_checkpoint(run).name == "ckpt-00000006.safetensors"


def test_lock_is_released_after_a_failed_run(run, capsys):
    one_line_error(capsys, main(["train", *TINY, "--steps=8", "--lr=1e38", "--model-dir", str(run)]), "loss became")
    with rundir.lock(run):  # free again
        pass


# --- ownership -----------------------------------------------------------------------------------------------

def test_directory_with_user_files_is_refused_and_left_alone(tiny_data, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text('{"theme": "dark"}')
    (d / "results.json").write_text('{"score": 3}')
    (d / "metrics.jsonl").write_text("my own log line\n")
    (d / ".data.tmp-5").write_text("a user's temp file")
    before = contents(d)
    one_line_error(capsys, main(["train", *TINY, "--steps=2", "--model-dir", str(d)]),
                   "holds files cnnlab did not write", "'.data.tmp-5'", "'config.json'", "--force")
    assert contents(d) == before
    assert main(["train", *TINY, "--steps=2", "--model-dir", str(d), "--force"]) == 0
    assert (d / ".data.tmp-5").read_text() == "a user's temp file"  # never cnnlab's to delete


def test_only_cnnlab_temp_files_are_removed(run):
    pid = dead_pid()
    own = [f".ckpt-00000002.safetensors{rundir.TEMP_MARK}{pid}", f".config.json.tmp-{pid}"]  # new and old style
    theirs = [f".notes.txt.tmp-{pid}", "draft.tmp-1", f".config.json{rundir.TEMP_MARK}{os.getpid() + 10**7}x"]
    for name in own + theirs:
        (run / name).write_text("partial")
    assert sorted(p.name for p in rundir.remove_stale_temps(run)) == sorted(own)
    assert all((run / n).exists() for n in theirs)


def test_a_run_directory_cnnlab_wrote_is_all_its_own(run):
    (run / "plots").mkdir()
    (run / "tensorboard").mkdir()
    (run / "report.html").write_text("<!doctype html><html><head><title>cnnlab report: run</title>")
    assert rundir.foreign_entries(run) == []
    (run / "report.html").write_text("<html>my page</html>")
    assert rundir.foreign_entries(run) == ["report.html"]


def test_export_never_writes_over_a_checkpoint_or_record(run, capsys):
    pytest.importorskip("onnx")
    for target in (ck.latest_checkpoint(run), run / "config.json", run / "metrics.jsonl"):
        before = target.read_bytes()
        one_line_error(capsys, main(["export", str(run), "--out", str(target)]), "refusing to write over")
        assert target.read_bytes() == before



def _files(*dirs: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for d in dirs for p in d.rglob("*") if p.is_file() and not p.is_symlink()}


def test_predict_report_and_plot_never_write_over_a_checkpoint_a_record_or_an_input(run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    image = images / "digit.png"
    Image.new("L", (28, 28), 255).save(image)
    assert main(["report", str(run)]) == 0  # its own file: the default output stays allowed
    capsys.readouterr()
    ckpt = ck.latest_checkpoint(run)
    records = [ckpt, run / "config.json", run / "metrics.jsonl", run / "results.json", run / "report.html"]
    mine = tmp_path / "mine.safetensors"  # a checkpoint named by path, outside a run
    shutil.copy(ckpt, mine)
    link = tmp_path / "link.png"
    link.symlink_to(image)
    cases = [(["predict", str(run), str(image), "--format", "csv"], [*records, image, link]),
             (["predict", str(run), str(images), "--json"], [image]),  # an image found in a folder
             (["predict", str(mine), str(image)], [mine]),
             (["predict", str(run), str(image), "--checkpoint", str(mine)], [mine]),
             (["report", str(run)], records[:4]),
             (["plot", str(run), "samples"], records),
             (["plot", str(run), "activations", "--image", str(image)], [image, link])]
    before = _files(run, tmp_path)
    for argv, targets in cases:
        for target in targets:
            one_line_error(capsys, main([*argv, "--out", str(target)]), f"refusing to write over {target}")
    assert _files(run, tmp_path) == before  # byte-identical, and nothing new written anywhere


def test_a_failed_predict_leaves_an_existing_out_file_as_it_was(run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("yesterday's predictions\n")
    one_line_error(capsys, main(["predict", str(run), str(tmp_path / "missing.png"), "--out", str(out)]),
                   "image not found")
    assert out.read_text() == "yesterday's predictions\n"


def test_report_of_a_split_the_dataset_lacks_is_one_line_and_keeps_the_report(run, capsys):
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    before = (run / "report.html").read_bytes()
    for command in ("report", "evaluate"):  # the same error for both
        one_line_error(capsys, main([command, str(run), "--split", "val"]), "unknown split 'val' for mnist")
    assert (run / "report.html").read_bytes() == before


# --- odd paths, full disks, foreign records ------------------------------------------------------------------

def test_non_utf8_run_directory_trains_and_loads(tiny_data, tmp_path):
    d = os.path.join(os.fsencode(tmp_path), b"run-\xff")  # Linux allows any bytes but / in a name
    env = {**os.environ, "CNNLAB_DATA": str(tiny_data), "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"}  # strict stdout
    for argv in (["train", *TINY, "--steps=2", "--model-dir", d], ["evaluate", d]):
        p = subprocess.run([sys.executable, "-m", "cnnlab", *argv], env=env, capture_output=True, check=False)
        assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
    assert b"run-\xff step 2: test accuracy" in p.stdout  # the path printed as its own bytes


def test_disk_full_while_appending_metrics_is_one_line(run, monkeypatch, capsys):
    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(hooks, "open", lambda *a, **kw: Full(), raising=False)
    one_line_error(capsys, main(["train", *TINY, "--steps=8", "--model-dir", str(run)]),
                   "cannot append to", "metrics.jsonl", "No space left on device")


def test_foreign_config_json_in_a_run_is_one_line(run, capsys):
    (run / "config.json").write_text("[1, 2, 3]")
    for argv in (["evaluate", str(run)], ["report", str(run)]):
        one_line_error(capsys, main(argv), "config.json is not a cnnlab run record")


def test_huge_image_warning_is_not_printed(template, tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big)  # 100 megapixels, a few kB
    p = subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(template), str(big)], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "image too large" in p.stderr, p.stderr
    assert "site-packages" not in p.stderr


def test_a_failed_first_run_leaves_no_empty_directory_behind(tiny_data, tmp_path, capsys):
    (tiny_data / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")  # the data cannot be read
    fresh = tmp_path / "runs" / "new"
    one_line_error(capsys, main(["train", *TINY, "--steps=2", "--model-dir", str(fresh)]), "train-images")
    assert not fresh.exists() and (tmp_path / "runs").is_dir()  # the run's folder goes, its parent stays
    mine = tmp_path / "mine"
    mine.mkdir()  # a folder the user made is theirs: kept, with only the lock file in it
    one_line_error(capsys, main(["train", *TINY, "--steps=2", "--model-dir", str(mine)]), "train-images")
    assert mine.is_dir()
