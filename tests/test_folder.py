"""Image-folder datasets: layout, splits, sizes and modes, training and predicting on a generated folder, errors."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_images import png_header_only

from cnnlab.cli import main
from cnnlab.data import dataset_info, load_dataset
from cnnlab.data import folder as folder_mod
from cnnlab.data.cache import decoded_dir
from cnnlab.data.loader import BatchSource
from cnnlab.errors import DataError
from cnnlab.train.steps import EpochSampler

COLOURS = {"blue": (30, 40, 220), "green": (30, 190, 40), "red": (220, 30, 30)}
SHAPES = {"blue": "ellipse", "green": "rectangle", "red": "polygon"}


def draw(name: str, i: int, size: tuple[int, int]) -> Image.Image:
    """One picture of class ``name``: its colour and shape on white, placed a little differently each time."""
    w, h = size
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0 = 2 + i % 4, 3 + (i * 3) % 5
    box = (x0, y0, x0 + w // 2 + i % 3, y0 + h // 2)
    if SHAPES[name] == "polygon":
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=COLOURS[name])
    else:
        getattr(d, SHAPES[name])(box, fill=COLOURS[name])
    return im


def make_folder(root: Path, per_class: int = 8, val: int = 2, sizes=((32, 32), (36, 30))) -> list[Path]:
    """root/train/<class>/*.png|jpg and root/val/<class>/*; returns every file written."""
    files = []
    for name in COLOURS:
        for split, n in (("train", per_class), ("val", val)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = d / f"{name}{i}.{'png' if i % 2 else 'jpg'}"
                draw(name, i, sizes[i % len(sizes)]).save(path)
                files.append(path)
    return files


@pytest.fixture
def folder(tmp_path, data_env) -> Path:
    root = tmp_path / "shapes"
    make_folder(root)
    (root / "train" / "red" / "notes.txt").write_text("not an image: skipped")
    (root / "train" / ".hidden.png").write_bytes(b"skipped too")
    return root


def test_layout_classes_labels_and_size(folder):
    info = dataset_info(f"folder:{folder}")
    assert info.class_names == ("blue", "green", "red") and info.num_classes == 3
    assert info.shape == (3, 224, 224)  # RGB; DEFAULT_SIZE, never the images' own size
    train = load_dataset(f"folder:{folder}?size=32", "train")
    test = load_dataset(f"folder:{folder}?size=20x24", "test")
    assert train.images.shape == (24, 3, 32, 32) and train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert test.images.shape == (6, 3, 20, 24) and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Pixels are the pictures': the red class is red where its shape is, white elsewhere.
    r, g, b = train.images[train.labels == 2][0].float()
    shape = g < 128  # not white
    assert shape.sum() > 20 and r[shape].mean() > 150 and b[shape].mean() < 100 and r[~shape].mean() > 240


def test_split_fraction_is_stratified_and_deterministic(tmp_path, data_env):
    root = tmp_path / "flat"
    for name in COLOURS:  # flat layout: root/<class>/*, no train/ or val/
        (root / name).mkdir(parents=True)
        for i in range(10):
            draw(name, i, (28, 28)).save(root / name / f"{i}.png")
    name = f"folder:{root}?val=0.3&size=28"
    tr, te = load_dataset(name, "train"), load_dataset(name, "test")
    assert len(tr) == 21 and len(te) == 9 and te.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = load_dataset(name, "test")
    assert (again.images == te.images).all()
    # Held-out images are not in the training split.
    flat_tr = tr.images.reshape(len(tr), -1)
    assert not any((flat_tr == img.reshape(-1)).all(1).any() for img in te.images)
    other = load_dataset(f"{name}&seed=5", "test")
    assert len(other) == 9 and not (other.images == te.images).all()
    assert len(load_dataset(f"folder:{root}?size=28", "test")) == 6  # default val=0.2
    assert (load_dataset(name, "val").images == te.images).all()  # no test/ folder: test is the val split
    with pytest.raises(DataError, match="the test split is empty") as e:  # never a NaN accuracy
        load_dataset(f"folder:{root}?val=0", "test")
    assert "\n" not in str(e.value)
    assert len(load_dataset(f"folder:{root}?val=0&size=28", "train")) == 30


def test_modes_grayscale_alpha_and_16_bit(tmp_path, data_env):
    root = tmp_path / "gray"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (10, 10), 200).save(root / "a" / "l.png")
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(root / "a" / "i16.png")  # 16-bit grayscale
    Image.new("1", (10, 10), 1).save(root / "b" / "bw.png")
    Image.new("LA", (10, 10), (0, 0)).save(root / "b" / "transparent.png")
    ds = load_dataset(f"folder:{root}?val=0&size=10", "train")
    assert ds.info.shape == (1, 10, 10)  # all grayscale -> one channel
    by_file = dict(zip(["i16", "l", "bw", "transparent"], ds.images[:, 0, 5, 5].tolist()))
    assert by_file == {"i16": round(40000 / 65535 * 255), "l": 200, "bw": 255, "transparent": 255}
    # One colour image makes the whole set RGB; channels=1 forces grayscale.
    Image.new("RGB", (10, 10), (255, 0, 0)).save(root / "b" / "red.png")
    assert dataset_info(f"folder:{root}?val=0&size=10").shape == (3, 10, 10)
    assert load_dataset(f"folder:{root}?val=0&channels=1&size=10", "train").images.shape == (5, 1, 10, 10)


def test_train_on_folder_then_predict_its_files(folder, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model-dir", str(run), f"--dataset=folder:{folder}?size=28",
            "--model=spec:in3x28x28-conv8k3-pool2-conv16k3-pool2-fc3", "--optimizer=adam", "--lr=0.01",
            "--steps=40", "--batch_size=12", "--log_every=20", "--ckpt_every=40", "--eval_batch_size=16",
            "--no-report", "--threads=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: step 40" in out and "(6 images)" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["classes"] == ["blue", "green", "red"] and cfg["data"]["shape"] == [3, 28, 28]
    files = sorted((folder / "val").rglob("*.*")) + sorted((folder / "train").rglob("*.jpg"))
    assert main(["predict", str(run), *map(str, files), "--json", "--top-k=2"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in preds] == [str(f) for f in files]
    assert all(len(p["top_k"]) == 2 and p["label"] in ("blue", "green", "red") for p in preds)
    # Colour and shape tell the classes apart: the trained model names (nearly) every file's folder.
    right = sum(p["label"] == Path(p["file"]).parent.name for p in preds)
    assert right >= 0.9 * len(files), [(Path(p["file"]).parent.name, p["label"]) for p in preds]


def one_class_folder(root: Path) -> None:
    """root/train/red/* and root/test/red/*: images of one class only (a classifier of it is always right)."""
    for split in ("train", "test"):
        (root / split / "red").mkdir(parents=True)
        for i in range(3):
            draw("red", i, (32, 32)).save(root / split / "red" / f"red{i}.png")


@pytest.mark.robust
@pytest.mark.parametrize("setup,option,needle", [
    (lambda r: None, "", "image folder not found"),
    (lambda r: (r / "train").mkdir(parents=True), "", "no class folders"),
    (lambda r: (r / "train" / "cat").mkdir(parents=True), "", "no images"),
    (lambda r: (make_folder(r, 2, 1), (r / "train" / "red" / "broken.png").write_bytes(b"\x89PNG not really")),
     "", "broken.png: not a"),  # read as a header (all-gray check) or decoded: named either way
    (lambda r: make_folder(r, 2, 1), "?val=0.2", "drop val=0.2"),
    (lambda r: (make_folder(r, 2, 1), (r / "val" / "cyan").mkdir()), "", "cyan not in"),
    (lambda r: make_folder(r, 2, 1), "?size=0", "bad size='0'"),
    (lambda r: make_folder(r, 2, 1), "?val=1.5", "bad val='1.5'"),
    (lambda r: make_folder(r, 2, 1), "?colour=1", "unknown option 'colour'"),
    (lambda r: make_folder(r, 2, 1), "?size=100000", "bad size='100000'"),
    (lambda r: make_folder(r, 2, 1), "?resize=squash", "bad resize='squash'"),
    (lambda r: (make_folder(r, 2, 1), (r / "train" / "red" / "huge.png").write_bytes(png_header_only(20000, 20000))),
     "", "huge.png: image too large"),
    (lambda r: (make_folder(r, 2, 1), (r / "test" / "red").mkdir(parents=True)), "", "test: no images"),
    (lambda r: one_class_folder(r), "", "only one class folder ('red'); need at least 2 classes"),
])
def test_bad_folders_fail_with_one_line(tmp_path, data_env, capsys, setup, option, needle):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=None) as e:
        load_dataset(f"folder:{root}{option}", "train")
    assert needle in str(e.value) and "\n" not in str(e.value)
    code = main(["train", "--model-dir", str(tmp_path / "run"), f"--dataset=folder:{root}{option}", "--model=lenet5",
                 "--steps=1", "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cnnlab: error: ") and needle in err and err.count("\n") == 1


@pytest.mark.robust
def test_unreadable_pixels_name_the_file(tmp_path, data_env):
    """A file whose header reads but whose pixel data is cut is named when the split is decoded."""
    root = tmp_path / "cut"
    make_folder(root, 2, 1)
    path = root / "train" / "blue" / "blue1.png"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="blue1.png"):
        load_dataset(f"folder:{root}", "train")


@pytest.mark.robust
def test_a_big_file_in_the_middle_is_named_when_decoding(tmp_path, data_env):
    """A 48-megapixel header passes the scan (only 400 MP bombs fail there) and is refused, by name, on decoding."""
    root = tmp_path / "ds"
    make_folder(root, 2, 1)
    (root / "train" / "red" / "big.png").write_bytes(png_header_only(8000, 6000))
    with pytest.raises(DataError, match="big.png: image too large") as e:
        load_dataset(f"folder:{root}?size=16", "train")
    assert "\n" not in str(e.value)


def test_train_val_test_folders_are_three_splits(tmp_path, data_env):
    root = tmp_path / "ds"
    make_folder(root, per_class=4, val=2)  # train/ and val/
    for name in COLOURS:
        (root / "test" / name).mkdir(parents=True)
        draw(name, 9, (32, 32)).save(root / "test" / name / "t.png")
    sizes = {s: len(load_dataset(f"folder:{root}?size=16", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 6, "test": 3}
    # test/ without val/: val is held out of train only when asked, else it is the test split.
    (root / "val").rename(tmp_path / "val-aside")
    assert len(load_dataset(f"folder:{root}?size=16", "val")) == 3
    assert len(load_dataset(f"folder:{root}?size=16&val=0.25", "val")) == 3  # one of each class's 4
    assert len(load_dataset(f"folder:{root}?size=16&val=0.25", "train")) == 9


def count_decodes(monkeypatch) -> dict:
    calls = {"n": 0}
    real = folder_mod.open_image

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(folder_mod, "open_image", counted)
    return calls


def test_cache_is_reused_and_invalidated_by_a_changed_file(folder, data_env, monkeypatch):
    calls = count_decodes(monkeypatch)
    name = f"folder:{folder}?size=16"
    first = load_dataset(name, "train")
    assert calls["n"] == 24
    again = load_dataset(name, "train")
    assert calls["n"] == 24 and again.images.equal(first.images)  # mapped from the cache, nothing decoded
    cached = list(decoded_dir().glob("*.npy"))
    assert len(cached) == 1 and not list(decoded_dir().glob("*.tmp-*"))
    # Another size is another cache entry; touching one file decodes its split again.
    load_dataset(f"folder:{folder}?size=8", "train")
    assert calls["n"] == 48
    path = folder / "train" / "red" / "red1.png"
    draw("blue", 1, (32, 32)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = load_dataset(name, "train")
    assert calls["n"] == 72 and not changed.images.equal(first.images)
    # cache=0 decodes into memory and writes nothing.
    before = sorted(decoded_dir().iterdir())
    load_dataset(f"folder:{folder}?size=12&cache=0", "train")
    assert calls["n"] == 96 and sorted(decoded_dir().iterdir()) == before


def test_concurrent_loads_decode_once(folder, data_env, monkeypatch):
    """Two loaders at once (as two torchrun ranks): one decodes, the other waits and maps its file."""
    calls = count_decodes(monkeypatch)
    name = f"folder:{folder}?size=16&workers=2"
    out = [None, None]

    def load(i):
        out[i] = load_dataset(name, "train").images

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls["n"] == 24 and out[0].equal(out[1])


def test_a_truncated_cache_file_is_decoded_again(folder, data_env, monkeypatch):
    calls = count_decodes(monkeypatch)
    name = f"folder:{folder}?size=16"
    first = load_dataset(name, "train").images.clone()
    (cache,) = decoded_dir().glob("*.npy")
    cache.write_bytes(cache.read_bytes()[:1000])
    assert load_dataset(name, "train").images.equal(first) and calls["n"] == 48


def test_streaming_gives_the_same_batches_as_resident(folder, data_env):
    ds = load_dataset(f"folder:{folder}?size=16", "train")
    resident = BatchSource(ds.images, ds.labels, torch.device("cpu"))
    streamed = BatchSource(ds.images, ds.labels, torch.device("cpu"), memory_gb=1e-6)  # ~1 KB budget
    assert not resident.streaming and streamed.streaming
    sampler = EpochSampler(len(ds), 10, seed=3)
    for step in range(8):  # crosses epoch boundaries
        idx = sampler.indices(step)
        (a, ya), (b, yb) = resident.take(idx), streamed.take(idx)
        assert a.equal(b) and ya.equal(yb) and a.equal(ds.images[idx])


def train_args(run: Path, folder: Path, steps: int, *extra) -> list[str]:
    return ["train", "--model-dir", str(run), f"--dataset=folder:{folder}?size=28",
            "--model=spec:in3x28x28-conv8k3-pool2-conv16k3-pool2-fc3", "--optimizer=adam", "--lr=0.01",
            f"--steps={steps}", "--batch_size=6", "--log_every=2", "--ckpt_every=2", "--eval_batch_size=16",
            "--no-report", "--threads=1", "--random_resized_crop=0.3,1.0", "--flip=true", *extra]


def test_random_resized_crop_run_resumes_bit_identically(folder, tmp_path, capsys):
    assert main(train_args(tmp_path / "a", folder, 6)) == 0
    assert main(train_args(tmp_path / "b", folder, 2)) == 0
    assert main(train_args(tmp_path / "b", folder, 6)) == 0
    assert "resuming from" in capsys.readouterr().out
    from safetensors.torch import load_file
    a, b = (load_file(max((tmp_path / r).glob("ckpt-*.safetensors"))) for r in "ab")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_random_resized_crop_draws_crops_from_the_step_generator():
    from cnnlab.data.augment import random_resized_crop
    from cnnlab.train.steps import step_generator
    x = torch.rand(5, 3, 40, 30)
    a = random_resized_crop(x, (16, 16), (0.2, 1.0), step_generator(0, 7))
    b = random_resized_crop(x, (16, 16), (0.2, 1.0), step_generator(0, 7))
    c = random_resized_crop(x, (16, 16), (0.2, 1.0), step_generator(0, 8))
    assert a.shape == (5, 3, 16, 16) and a.equal(b) and not a.equal(c)
    whole = random_resized_crop(x, (40, 30), (1.0, 1.0), step_generator(0, 7), ratio=(0.75, 0.75))
    assert torch.allclose(whole, x, atol=1e-5)  # the whole image at its own size and aspect: unchanged


def test_predict_a_directory_as_csv_and_jsonl(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, folder, 2)) == 0
    capsys.readouterr()
    (folder / "val" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "preds.csv"
    args = ["predict", str(run), str(folder / "val"), "--format", "csv", "--out", str(out), "--batch-size", "4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err
    rows = list(csv.DictReader(out.open()))
    expected = sorted(p for p in (folder / "val").rglob("*.*") if p.name != "broken.png")
    assert [Path(r["file"]) for r in rows] == expected
    assert all(r["label"] in COLOURS and 0 <= float(r["probability"]) <= 1 and r["top_k"].count(":") == 3 for r in rows)
    assert main(["predict", str(run), str(folder / "val"), "--format", "jsonl", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(expected) and all(len(json.loads(line)["top_k"]) == 2 for line in lines)
    assert main(["predict", str(run), str(tmp_path / "run")]) == 2  # no images there: one-line error
    assert capsys.readouterr().err.count("\n") == 1


def test_a_streamed_run_ends_with_the_resident_runs_weights(folder, tmp_path, capsys):
    """data_memory_gb below the split's size streams batches from the cache: same batches, same weights."""
    assert main(train_args(tmp_path / "resident", folder, 4)) == 0
    assert main(train_args(tmp_path / "streamed", folder, 4, "--data_memory_gb=0.000001")) == 0
    from safetensors.torch import load_file
    a, b = (load_file(max((tmp_path / r).glob("ckpt-*.safetensors"))) for r in ("resident", "streamed"))
    assert all(a[k].equal(b[k]) for k in a)


def test_an_unwritable_cache_folder_decodes_into_memory(folder, tmp_path, monkeypatch, data_env):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ds = load_dataset(f"folder:{folder}?size=16", "train")
    assert ds.images.shape == (24, 3, 16, 16) and ds.images.float().mean() > 0


def test_sized_for_model_adds_a_size_only_to_folder_names_without_one():
    assert folder_mod.sized_for_model("folder:/d", (28, 28)) == "folder:/d?size=28x28"
    assert folder_mod.sized_for_model("folder:/d?val=0.1", (32, 24)) == "folder:/d?val=0.1&size=32x24"
    assert folder_mod.sized_for_model("folder:/d?size=64", (28, 28)) == "folder:/d?size=64"
    assert folder_mod.sized_for_model("mnist", (28, 28)) == "mnist"


def test_old_unused_cache_files_are_pruned_when_a_new_one_is_written(folder, data_env):
    load_dataset(f"folder:{folder}?size=16", "train")
    (old,) = decoded_dir().glob("*.npy")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    leftover = decoded_dir() / "abc.tmp-99999.npy"  # a killed writer's
    leftover.write_bytes(b"partial")
    os.utime(leftover, (month_ago, month_ago))
    load_dataset(f"folder:{folder}?size=16", "train")  # a use touches it: not old any more
    load_dataset(f"folder:{folder}?size=8", "train")  # writing another prunes only what is unused
    assert old.exists() and not leftover.exists()
    os.utime(old, (month_ago, month_ago))
    load_dataset(f"folder:{folder}?size=12", "train")
    assert not old.exists() and len(list(decoded_dir().glob("*.npy"))) == 2


def test_val_split_picks_the_model_and_test_is_evaluated_once(folder, tmp_path, capsys):
    """With val/ and test/ folders, evaluations during training use val; test is evaluated once, at the end."""
    for name in COLOURS:  # three test images per class (val/ has two): the record sizes tell the splits apart
        (folder / "test" / name).mkdir(parents=True)
        for i in range(3):
            draw(name, i + 5, (32, 32)).save(folder / "test" / name / f"{name}{i}.png")
    run = tmp_path / "run"
    assert main(train_args(run, folder, 6, "--eval_every=2")) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["split"], r["step"], r["n"]) for r in evals if r["kind"] == "eval"]
    assert evals == [("val", 2, 6), ("val", 4, 6), ("val", 6, 6), ("test", 6, 9)]
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["n"] == 6 and results["test"]["n"] == 9
    assert results["best"]["metric"] == "val_accuracy" and results["best"]["step"] in (2, 4, 6)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--checkpoint", "latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**results["val"], "step": 6, "split": "val", "tta": "none"}


def test_folder_without_test_folder_evaluates_its_val_split_as_test(folder, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(run, folder, 4, "--eval_every=2")) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in evals if r["kind"] == "eval"] == [("test", 2), ("test", 4)]
    assert "val" not in json.loads((run / "results.json").read_text())


def test_folder_without_size_is_decoded_at_the_models_input_size(folder, tmp_path):
    run = tmp_path / "run"
    args = train_args(run, folder, 2)
    args[3] = f"--dataset=folder:{folder}?seed=1"  # no size=: the spec model takes 28x28
    args.remove("--random_resized_crop=0.3,1.0")  # (with it, the folder is decoded larger: the test below)
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["shape"] == [3, 28, 28]
    assert cfg["config"]["dataset"] == f"folder:{folder}?seed=1&size=28x28"
    assert main(["evaluate", str(run), "--json"]) == 0  # evaluate loads the recorded (sized) name


def test_random_resized_crop_of_bigger_images_evaluates_the_centre_crop(folder, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(run, folder, 2)
    args[3] = f"--dataset=folder:{folder}?size=32"  # decoded at 32, the model takes 28
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["preprocess"]["size"] == [32, 32] and cfg["data"]["preprocess"]["crop"] == [28, 28]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    args = train_args(tmp_path / "small", folder, 2)
    args[3] = f"--dataset=folder:{folder}?size=20"
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "random_resized_crop" in err and "20x20" in err and "\n" not in err


def test_random_resized_crop_without_a_size_decodes_larger_and_resumes_bit_identically(folder, tmp_path, capsys):
    def sizeless(run: Path, steps: int) -> list[str]:
        args = train_args(run, folder, steps)
        args[3] = f"--dataset=folder:{folder}"  # no size=: the run picks it for the model and the crops
        return args

    assert main(sizeless(tmp_path / "a", 4)) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["config"]["dataset"] == f"folder:{folder}?size=32x32"  # 28 / 0.875: crops keep their pixels
    assert cfg["data"]["preprocess"]["size"] == [32, 32] and cfg["data"]["preprocess"]["crop"] == [28, 28]
    assert main(sizeless(tmp_path / "b", 2)) == 0
    assert main(sizeless(tmp_path / "b", 4)) == 0
    from safetensors.torch import load_file
    a, b = (load_file(max((tmp_path / r).glob("ckpt-*.safetensors"))) for r in "ab")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "a"), "--json"]) == 0  # the recorded size and centre crop
    assert json.loads(capsys.readouterr().out)["n"] == 6


def test_decode_size_is_the_model_size_unless_training_on_resized_crops():
    from cnnlab.data.folder import decode_size
    assert decode_size((224, 224), resized_crop=False) == (224, 224)
    assert decode_size((224, 224), resized_crop=True) == (256, 256)
    assert decode_size((28, 20), resized_crop=True) == (32, 22)
    assert decode_size((1, 1), resized_crop=True) == (1, 1)


def test_threads_decode_the_same_rows_as_one_and_stop_at_a_broken_file(folder, data_env, tmp_path):
    from cnnlab.data.folder import read_images
    files = [(p, 0) for p in sorted((folder / "train").glob("*/*.png"))] * 5  # 60 rows: several runs per thread
    one, _ = read_images(files, (3, 12, 10), workers=1, cache=False)
    many, _ = read_images(files, (3, 12, 10), workers=4, cache=False, decode="threads")
    assert one.shape == (60, 3, 12, 10) and np.array_equal(one, many) and one.std() > 0
    cached, _ = read_images(files, (3, 12, 10), workers=3, cache=True, decode="threads")
    assert np.array_equal(cached, one)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: not a"):
        read_images([*files[:30], (broken, 0), *files[30:]], (3, 12, 10), workers=3, cache=False, decode="threads")


def caller_decodes(monkeypatch, calls: tuple[int, ...] = ()) -> None:
    """In this process, only the `_decode_runs` calls numbered in ``calls`` run (0 is the share it takes beside
    its children, 1 the runs a dead child left); forked children run the real one, so with ``calls=()`` every
    row comes from a child."""
    real, caller, seen = folder_mod._decode_runs, os.getpid(), []

    def decode_runs(*args, **kwargs):
        seen.append(1)
        if os.getpid() != caller or len(seen) - 1 in calls:
            real(*args, **kwargs)

    monkeypatch.setattr(folder_mod, "_decode_runs", decode_runs)


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_processes_decode_the_same_rows_as_threads(folder, data_env):
    from cnnlab.data.folder import read_images
    files = [(p, 0) for p in sorted((folder / "train").glob("*/*.[jp][pn]g"))] * 4  # 96 rows, png and jpg
    threads, _ = read_images(files, (3, 12, 10), workers=1, cache=False)
    in_memory, _ = read_images(files, (3, 12, 10), workers=3, cache=False, decode="processes")
    cached, _ = read_images(files, (3, 12, 10), workers=2, cache=True, decode="processes")
    assert threads.std() > 0 and np.array_equal(in_memory, threads) and np.array_equal(cached, threads)


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_rows_written_by_children_alone_are_complete(folder, data_env, monkeypatch):
    from cnnlab.data.folder import read_images
    files = [(p, 0) for p in sorted((folder / "train").glob("*/*.[jp][pn]g"))] * 2
    reference, _ = read_images(files, (3, 12, 10), workers=1, cache=False)
    caller_decodes(monkeypatch)
    for cache in (False, True):
        rows, _ = read_images(files, (3, 12, 10), workers=2, cache=cache, decode="processes")
        assert np.array_equal(rows, reference)


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_a_broken_file_met_in_a_child_is_one_line_and_leaves_no_cache(folder, data_env, monkeypatch):
    caller_decodes(monkeypatch)
    (folder / "train" / "green" / "green3.png").write_bytes(b"\x89PNG not really")
    for cache in ("0", "1"):  # channels=3: no header scan, so the decoding child is the first to open the file
        with pytest.raises(DataError, match="green3.png: not a") as e:
            load_dataset(f"folder:{folder}?size=12&channels=3&workers=2&decode=processes&cache={cache}", "train")
        assert "\n" not in str(e.value)
    assert not list(data_env.rglob("*.npy"))  # neither the split nor a temporary file is left
    assert not multiprocessing.active_children()


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_the_runs_of_a_child_that_died_are_decoded_by_the_caller(folder, data_env, monkeypatch):
    from cnnlab.data.folder import read_images
    files = [(p, 0) for p in sorted((folder / "train").glob("*/*.[jp][pn]g"))] * 2
    reference, _ = read_images(files, (3, 12, 10), workers=1, cache=False)
    caller, real = os.getpid(), folder_mod.decode_file

    def decode_file(path, *args, **kwargs):
        if os.getpid() != caller and path.name == "red5.png":
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder_mod, "decode_file", decode_file)
    caller_decodes(monkeypatch, calls=(1,))  # the child takes every run; the caller only finishes what it left
    rows, _ = read_images(files, (3, 12, 10), workers=2, cache=True, decode="processes")
    assert np.array_equal(rows, reference)


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_a_fork_that_fails_leaves_the_work_to_the_caller(folder, data_env, monkeypatch):
    from cnnlab.data.folder import read_images
    files = [(p, 0) for p in sorted((folder / "train").glob("*/*.[jp][pn]g"))] * 2
    reference, _ = read_images(files, (3, 12, 10), workers=1, cache=False)

    def no_fork(self):
        raise OSError(12, "Cannot allocate memory")  # as fork fails under strict overcommit

    monkeypatch.setattr(multiprocessing.get_context("fork").Process, "start", no_fork)
    rows, _ = read_images(files, (3, 12, 10), workers=3, cache=True, decode="processes")
    assert np.array_equal(rows, reference)


@pytest.mark.skipif(not folder_mod.forks(), reason="decoding processes are forked, on Linux only")
def test_an_interrupt_stops_the_children_and_leaves_no_cache(folder, data_env, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        if os.getpid() == caller:
            raise KeyboardInterrupt  # Ctrl-C, as it reaches the calling process while the children decode
        time.sleep(30)  # a child still busy: it is stopped, not waited for
        (tmp_path / f"finished-{os.getpid()}").touch()

    caller = os.getpid()
    monkeypatch.setattr(folder_mod, "_decode_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(f"folder:{folder}?size=12&channels=3&workers=3&decode=processes", "train")
    assert not list(data_env.rglob("*.npy"))
    assert not multiprocessing.active_children() and not list(tmp_path.glob("finished-*"))


def test_decode_picks_processes_for_large_splits_only(folder, data_env, monkeypatch):
    from cnnlab.data.folder import PROCESS_MIN_FILES, uses_processes
    forks = folder_mod.forks()
    assert uses_processes("auto", PROCESS_MIN_FILES, 2) == forks
    assert not uses_processes("auto", PROCESS_MIN_FILES - 1, 2)
    assert uses_processes("processes", 3, 2) == forks
    assert not uses_processes("processes", 10**6, 1) and not uses_processes("threads", 10**6, 8)
    monkeypatch.setattr(folder_mod, "_decode_processes", lambda *a, **k: pytest.fail("processes started"))
    assert len(load_dataset(f"folder:{folder}?size=12&workers=2", "train")) == 24  # auto, 24 files: threads
    with pytest.raises(DataError, match="bad decode='fork'; expected auto or threads or processes"):
        load_dataset(f"folder:{folder}?decode=fork", "train")


def test_scan_skips_hidden_entries_and_symlinked_folders_and_sorts_by_path_parts(tmp_path, data_env):
    from cnnlab.data.folder import _images_in
    d = tmp_path / "cls"
    for rel in ("b.png", "a-b/x.png", "a/x.png", "a/.h.png", ".hid/y.png", "a/z.JPG", "a/notes.txt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"")
    (d / "link").symlink_to(d / "a", target_is_directory=True)  # rglob does not descend into it either
    (d / "c.png").symlink_to(d / "b.png")  # a symlinked file is a file
    found = [p.relative_to(d).as_posix() for p in _images_in(d)]
    assert found == ["a/x.png", "a/z.JPG", "a-b/x.png", "b.png", "c.png"]  # ('a',) < ('a-b',): parts, not strings


def test_a_colour_folder_is_known_from_its_first_header(folder, data_env, monkeypatch):
    read = []
    real = folder_mod._header_mode
    monkeypatch.setattr(folder_mod, "_header_mode", lambda p: read.append(p) or real(p))
    assert dataset_info(f"folder:{folder}?cache=0").shape[0] == 3
    assert len(read) == 1  # not every header before decoding


def _mapped_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_evaluating_a_mapped_split_hands_its_pages_back(folder, data_env, monkeypatch):
    from cnnlab import infer
    from cnnlab.infer import predict_logits
    monkeypatch.setattr(infer, "DROP_PAGES_FROM", 0)  # the split here is tiny
    from cnnlab.models import create_model
    ds = load_dataset(f"folder:{folder}?size=28", "train")
    (cache,) = decoded_dir().glob("*.npy")
    torch.manual_seed(0)
    model = create_model("spec:in3x28x28-conv4k3-pool2-fc3")
    mapped = predict_logits(model, ds.images, batch_size=5)
    assert _mapped_rss_kb(cache) == 0  # every batch read was dropped from this process's memory
    predict_logits(model, ds.images[1::2], batch_size=5)  # a strided view, as a torchrun rank's share
    assert _mapped_rss_kb(cache) == 0
    assert mapped.equal(predict_logits(model, ds.images.clone(), batch_size=5))  # and the logits are the same


def test_a_resident_split_copied_from_the_cache_is_not_also_held_as_mapped_pages(folder, data_env):
    from cnnlab.data.loader import BatchSource
    ds = load_dataset(f"folder:{folder}?size=28", "train")
    (cache,) = decoded_dir().glob("*.npy")
    ds.images.sum()  # read every page of the mapping in
    assert _mapped_rss_kb(cache) > 0
    source = BatchSource(ds.images, ds.labels, torch.device("cpu"), memory_gb=0)
    assert _mapped_rss_kb(cache) == 0  # resident once (the private copy), not twice
    assert not source.streaming and source.images.equal(ds.images)


def test_evaluation_batches_are_bounded_in_bytes_with_the_same_logits(monkeypatch):
    from cnnlab import infer
    from cnnlab.models import create_model
    torch.manual_seed(0)
    model = create_model("spec:in3x28x28-conv4k3-pool2-fc3")
    images = torch.randint(0, 256, (10, 3, 28, 28), dtype=torch.uint8)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append(len(x)), forward(x))[1])
    whole = infer.predict_logits(model, images, batch_size=1000)
    assert seen == [10]  # small images: the requested batch
    seen.clear()
    monkeypatch.setattr(infer, "EVAL_INPUT_BYTES", 3 * 28 * 28 * 4 * 4)  # room for four images' float input
    bounded = infer.predict_logits(model, images, batch_size=1000)
    assert seen == [4, 4, 2]
    torch.testing.assert_close(bounded, whole)


def test_decode_tasks_cover_every_file_once_with_the_largest_first(tmp_path):
    from cnnlab.data.folder import _runs
    files = []
    for i in range(40):
        f = tmp_path / f"{i:02d}.jpg"
        f.write_bytes(b"x" * (50_000 if i in (7, 31) else 1000 + i))  # two "phone photos" among small files
        files.append(f)
    files.append(tmp_path / "missing.jpg")  # decoding reports it; the plan just includes it
    runs = _runs(files, workers=2)
    order = [i for r in runs for i in r]
    assert sorted(order) == list(range(len(files)))  # every row written exactly once
    assert order[:2] == [7, 31] and all(len(r) == 1 for r in runs[:2])  # the big ones first, each alone
    assert all(list(r) == list(range(r.start, r.stop)) for r in runs)  # runs of consecutive files
    assert [i for r in _runs(files, workers=1) for i in r] == list(range(len(files)))  # one thread: file order


def test_a_relative_folder_is_recorded_absolute_so_the_run_works_from_anywhere(tmp_path, data_env, monkeypatch,
                                                                                 capsys):
    make_folder(tmp_path / "work" / "shapes", per_class=2, val=1)
    monkeypatch.chdir(tmp_path / "work")
    args = ["--dataset=folder:shapes?size=28", "--model=lenet5", "--steps=2", "--batch_size=4", "--no-report"]
    assert main(["train", "--model-dir", "run", *args]) == 0
    recorded = json.loads((tmp_path / "work" / "run" / "config.json").read_text())["config"]["dataset"]
    assert recorded == f"folder:{tmp_path / 'work' / 'shapes'}?size=28"
    assert main(["train", "--model-dir", "run", *args[:-2], "--steps=3", "--no-report"]) == 0  # resumes: same data
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "work" / "run")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_absolute_folder_leaves_other_names_alone(tmp_path, monkeypatch):
    from cnnlab.data.folder import absolute_folder

    monkeypatch.chdir(tmp_path)
    assert absolute_folder("mnist") == "mnist"
    assert absolute_folder("folder:imgs?size=28&val=0.2") == f"folder:{tmp_path / 'imgs'}?size=28&val=0.2"
    assert absolute_folder("folder:/data/x") == "folder:/data/x"
    assert absolute_folder("folder:") == "folder:"
