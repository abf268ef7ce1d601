"""The command line explains itself: train --help from TrainConfig, --model-dir everywhere a run is taken,
folder:PATH in `cnnlab datasets`."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest

from cnnlab.cli import main
from cnnlab.config import TrainConfig, describe_fields
from cnnlab.data import folder
from cnnlab.errors import CnnlabError
from cnnlab.predict_files import write_predictions


def test_train_help_lists_every_config_key_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for f in dataclasses.fields(TrainConfig):
        line = rows.get(f.name)
        assert line is not None, f"{f.name} missing from train --help"
        assert str(f.type) in line and f.metadata["help"] in line, line
    assert "tf-estimator-cnn" in rows["model"] and "1.0,1.0" in rows["contrast"] and "true" in rows["channels_last"]


def test_describe_fields_follows_the_dataclass():
    assert [r[0] for r in describe_fields()] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert dict((r[0], r[2]) for r in describe_fields())["lr"] == str(TrainConfig().lr)


@pytest.mark.parametrize("argv", [["evaluate", "--json"], ["predict", "x.png"], ["report"], ["export"], ["serve"],
                                  ["plot", "curves"]])
def test_a_run_is_required(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a run is required: give RUN or --model-dir RUN" in err


@pytest.mark.parametrize("command", ["evaluate", "report", "export", "serve"])
def test_two_different_runs_are_refused(command, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "a"), "--model-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "two runs given" in err, err


def test_evaluate_with_model_dir_matches_positional(tiny_run, capsys):
    data = ["--data-dir", str(tiny_run.data)]
    assert main(["evaluate", "--model-dir", str(tiny_run.path), "--json", *data]) == 0
    by_flag = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(tiny_run.path), "--json", *data]) == 0
    by_position = json.loads(capsys.readouterr().out)
    assert by_flag == by_position and by_flag["step"] == 4 and by_flag["n"] == 32
    # The same run both ways is not a conflict.
    assert main(["evaluate", str(tiny_run.path), "--model-dir", f"{tiny_run.path}/", "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out) == by_flag


def test_evaluate_tta_overrides_the_recorded_views_for_that_evaluation_only(tiny_run, capsys):
    from cnnlab.infer import eval_result, load_trained, predict_logits

    data = ["--data-dir", str(tiny_run.data)]
    assert main(["evaluate", str(tiny_run.path), "--json", *data]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert recorded["tta"] == "none"  # the tiny run's own
    assert main(["evaluate", str(tiny_run.path), "--json", "--tta", "flip-translate", *data]) == 0
    views = json.loads(capsys.readouterr().out)
    assert views["tta"] == "flip-translate" and views["loss"] != recorded["loss"]
    # the same figures as the run's own evaluation code computes with those views
    trained = load_trained(tiny_run.path)
    ds = trained.load_split("test", str(tiny_run.data))
    kw = {**trained.inference_kw(), "tta": "flip-translate"}
    expected = eval_result(predict_logits(trained.model, ds.images, **kw), ds.labels)
    assert views["loss"] == pytest.approx(expected.loss, rel=1e-5) and views["accuracy"] == expected.accuracy
    assert main(["evaluate", str(tiny_run.path), "--tta", "flip", *data]) == 0
    assert "test-time views flip" in capsys.readouterr().out
    assert main(["evaluate", str(tiny_run.path), "--json", *data]) == 0  # nothing recorded changed
    assert json.loads(capsys.readouterr().out) == recorded


def test_evaluate_refuses_an_unknown_tta(tiny_run, capsys):
    import torch

    from cnnlab.errors import ConfigError
    from cnnlab.infer import load_trained
    from cnnlab.train.classifier import Classifier

    assert main(["evaluate", str(tiny_run.path), "--tta", "rotate", "--data-dir", str(tiny_run.data)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "cnnlab: error: tta must be one of none, flip, translate, flip-translate, got 'rotate'"
    with pytest.raises(ConfigError, match="tta must be one of none, flip, translate, flip-translate"):
        Classifier(model_dir=str(tiny_run.path), data_dir=str(tiny_run.data)).evaluate(tta="rotate")
    trained = load_trained(tiny_run.path)  # an unknown mode would otherwise quietly mean the single view
    with pytest.raises(ConfigError, match="got 'Flip'"):
        trained.logits(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), tta="Flip")


def test_predict_with_model_dir_takes_every_positional_as_an_image(tiny_run, tmp_path, capsys):
    from PIL import Image

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        Image.new("L", (28, 28)).save(p)
    assert main(["predict", "--model-dir", str(tiny_run.path), *map(str, paths), "--json"]) == 0
    assert [p["file"] for p in json.loads(capsys.readouterr().out)] == [str(p) for p in paths]


def test_datasets_lists_folder_with_its_options(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("folder:PATH"))
    for key in folder._OPTIONS:
        assert f"{key}=" in line
    assert "mnist" in out


def test_library_messages_reach_the_user_once_on_stderr(capsys):
    from cnnlab.data import sources

    for _ in range(2):  # however often main() runs in one process
        assert main(["recipes"]) == 0
    capsys.readouterr()
    sources.log.info("downloading %s into %s", "mnist", "/somewhere")
    captured = capsys.readouterr()
    assert captured.err == "cnnlab: downloading mnist into /somewhere\n" and captured.out == ""


def _run_entry_point(prelude: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``prelude``, then the console entry point ``cnnlab.cli.run`` with ``argv``, in a fresh interpreter."""
    code = f"import sys; from cnnlab.cli import run\n{prelude}\nsys.argv = ['cnnlab', *{argv!r}]\nrun()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_entry_point_exits_with_mains_code_after_the_exit_handlers(tmp_path):
    prelude = "import atexit; atexit.register(lambda: print('exit handler ran'))"
    ok = _run_entry_point(prelude, ["models"])
    assert ok.returncode == 0 and "mnist-fast" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    bad = _run_entry_point(prelude, ["evaluate", str(tmp_path / "missing")])
    assert bad.returncode == 2 and bad.stderr.startswith("cnnlab: error: ") and "exit handler ran" in bad.stdout
    cli = subprocess.run([sys.executable, "-m", "cnnlab", "evaluate", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1


def test_a_profiler_of_the_cli_gets_to_write_its_results(tmp_path):
    out = tmp_path / "cli.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "cnnlab", "models"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mnist-fast" in done.stdout
    import pstats

    assert any(name == "main" for _, _, name in pstats.Stats(str(out)).stats)  # cnnlab.cli.main was profiled


def test_the_entry_point_waits_for_a_running_thread():
    # the thread runs until the main thread reaches Python's own shutdown: alive whenever run() looks, however
    # long the command takes, and it prints only if run() exits the usual way, which waits for it
    prelude = ("import threading\n"
               "threading.Thread(target=lambda: (threading.main_thread().join(), print('thread done', flush=True)))"
               ".start()")
    done = _run_entry_point(prelude, ["models"])
    assert done.returncode == 0 and done.stdout.rstrip().endswith("thread done")


def _digit(tmp_path) -> str:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("L", (28, 28)).save(path)
    return str(path)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.robust
def test_predict_without_images_says_so(tiny_run, capsys):
    for argv in (["predict", str(tiny_run.path)], ["predict", "--model-dir", str(tiny_run.path)]):
        err = _usage_error(argv, capsys)
        assert "no images given" in err and f"cnnlab predict {tiny_run.path} digit.png" in err, err


@pytest.mark.robust
def test_predict_with_only_a_folder_of_images_asks_for_the_run(tmp_path, capsys):
    """Any folder counted as a run here, so a folder of images was told to add images."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _digit(photos)
    err = _usage_error(["predict", str(photos)], capsys)
    assert f"a run is required: give RUN or --model-dir RUN, then the images ({photos} is not a run" in err, err


def test_predict_model_dir_then_a_folder_of_images(tiny_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = Path(_digit(photos))
    assert main(["predict", "--model-dir", str(tiny_run.path), str(photos), "--json"]) == 0
    assert [p["file"] for p in json.loads(capsys.readouterr().out)] == [str(image)]
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.json").write_text("{}")
    err = _usage_error(["predict", "--model-dir", str(tiny_run.path), str(other), str(image)], capsys)
    assert "two runs given" in err


def test_predict_json_is_a_format_and_goes_to_out(tiny_run, tmp_path, capsys):
    image, out = _digit(tmp_path), tmp_path / "o.json"
    assert main(["predict", str(tiny_run.path), image, "--json", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    doc = json.loads(out.read_text())
    assert [p["file"] for p in doc] == [image] and "probabilities" not in doc[0]
    assert main(["predict", str(tiny_run.path), image, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc
    for fmt in ("csv", "jsonl", "text"):
        err = _usage_error(["predict", str(tiny_run.path), image, "--json", "--format", fmt], capsys)
        assert f"--json and --format {fmt} disagree" in err, err


def test_all_probs_adds_every_class_probability_in_every_format(tiny_run, tmp_path, capsys):
    image, run = _digit(tmp_path), str(tiny_run.path)
    assert main(["predict", run, image, "--json", "--all-probs"]) == 0
    probs = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert len(probs) == 10
    assert main(["predict", run, image, "--format", "jsonl", "--all-probs"]) == 0
    assert json.loads(capsys.readouterr().out)["probabilities"] == [round(p, 6) for p in probs]
    assert main(["predict", run, image, "--format", "csv", "--all-probs"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split(",")[4:] == [f"prob_{c}" for c in range(10)]
    assert row.split(",")[4:] == [f"{p:.6f}" for p in probs]
    assert main(["predict", run, image, "--all-probs"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("all: " + ", ".join(f"{c} {p:.3f}" for c, p in enumerate(probs)))


@pytest.mark.robust
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
def test_predict_out_is_replaced_whole_or_not_at_all(tmp_path, fmt):
    """A full disk or Ctrl-C halfway through left a partial file in place of the earlier one."""
    pred = {"label": "3", "probability": 0.9, "top_k": [{"label": "3", "probability": 0.9}]}

    def failing(exc):
        yield Path("a.png"), pred  # the first line is written: the output is open
        raise exc

    out = tmp_path / "preds.out"
    out.write_text("earlier predictions\n")
    for exc in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()):
        with pytest.raises((CnnlabError, KeyboardInterrupt)) as e:
            write_predictions(failing(exc), fmt, out)
        assert isinstance(exc, KeyboardInterrupt) or str(e.value) == f"cannot write {out}: No space left on device"
        assert out.read_text() == "earlier predictions\n" and sorted(tmp_path.iterdir()) == [out]
    write_predictions([(Path("a.png"), pred), (Path("b.png"), pred)], fmt, out)
    assert out.read_text().count("b.png") == 1 and sorted(tmp_path.iterdir()) == [out]
    fifo = tmp_path / "fifo"  # what exists and is not a regular file is written in place
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_predictions([(Path("c.png"), pred)], fmt, fifo)
    reader.join(10)
    assert "c.png" in got[0] and fifo.is_fifo()


@pytest.mark.robust
def test_predict_out_removes_what_a_killed_earlier_run_left(tmp_path):
    """SIGKILL during `predict --out FILE` left .FILE.cnnlab-tmp-PID beside FILE for good (outside run directories
    nothing swept it). The next write of FILE removes its own dead writers' temp files, nothing else."""
    pred = {"label": "3", "probability": 0.9, "top_k": [{"label": "3", "probability": 0.9}]}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "preds.csv"
        left = tmp_path / f".preds.csv.cnnlab-tmp-{dead.pid}"
        kept = [tmp_path / f".preds.csv.cnnlab-tmp-{alive.pid}",  # a predict writing FILE now
                tmp_path / ".preds.csv.cnnlab-tmp-mine",  # not a pid: not cnnlab's
                tmp_path / f".other.csv.cnnlab-tmp-{dead.pid}"]  # another file's
        for p in (left, *kept):
            p.write_text("partial\n")
        write_predictions([(Path("a.png"), pred)], "csv", out)
        assert sorted(tmp_path.iterdir()) == sorted([out, *kept]) and "a.png" in out.read_text()
    finally:
        alive.kill()
        alive.wait()


def test_csv_top_k_escapes_its_separators_in_class_names(tmp_path):
    """A class called 'a:b;c' made the top_k cell split into the wrong pairs."""
    names = ["a:b;c", "50%", "plain"]
    top = [{"label": n, "probability": p} for n, p in zip(names, (0.5, 0.3, 0.2))]
    out = tmp_path / "p.csv"
    write_predictions([(Path("x.png"), {"label": names[0], "probability": 0.5, "top_k": top})], "csv", out)
    (row,) = csv.DictReader(out.open())
    pairs = [item.rsplit(":", 1) for item in row["top_k"].split(";")]
    assert row["label"] == "a:b;c" and [(unquote(n), float(p)) for n, p in pairs] == [(n, t["probability"])
                                                                                   for n, t in zip(names, top)]


def test_bare_command_prints_help_and_version_is_known(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cnnlab") and "train" in out and "serve" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from cnnlab import __version__

    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cnnlab {__version__}"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"], []])
def test_help_and_version_do_not_import_torch(argv):
    """`import cnnlab` loads the library's API on first use, so the help answers at once (torch takes a second)."""
    code = ("import sys\nfrom cnnlab.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip() and out.stderr.strip() == "False"


def test_the_library_api_resolves_on_first_use():
    import cnnlab

    code = ("import cnnlab\nprint([n for n in cnnlab.__all__ if getattr(cnnlab, n) is None])\n"
            "print(cnnlab.models.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "cnnlab.models"]
    assert {"fit", "create_model", "load_trained", "Classifier", "CnnlabError"} <= set(dir(cnnlab))
    assert sorted(cnnlab.__all__) == sorted(cnnlab._API)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        cnnlab.no_such_thing  # noqa: B018
