"""Image-folder datasets: layout, splits, sizes and modes, training and predicting on a generated folder, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnnlab.cli import main
from cnnlab.data import dataset_info, load_dataset
from cnnlab.errors import DataError

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
    assert info.shape == (3, 32, 32)  # RGB; the first training image's size (blue0.jpg is 32x32)
    train = load_dataset(f"folder:{folder}", "train")
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
    assert len(load_dataset(f"folder:{root}", "test")) == 6  # default val=0.2
    assert len(load_dataset(f"folder:{root}?val=0", "test")) == 0


def test_modes_grayscale_alpha_and_16_bit(tmp_path, data_env):
    root = tmp_path / "gray"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (10, 10), 200).save(root / "a" / "l.png")
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(root / "a" / "i16.png")  # 16-bit grayscale
    Image.new("1", (10, 10), 1).save(root / "b" / "bw.png")
    Image.new("LA", (10, 10), (0, 0)).save(root / "b" / "transparent.png")
    ds = load_dataset(f"folder:{root}?val=0", "train")
    assert ds.info.shape == (1, 10, 10)  # all grayscale -> one channel
    by_file = dict(zip(["i16", "l", "bw", "transparent"], ds.images[:, 0, 5, 5].tolist()))
    assert by_file == {"i16": round(40000 / 65535 * 255), "l": 200, "bw": 255, "transparent": 255}
    # One colour image makes the whole set RGB; channels=1 forces grayscale.
    Image.new("RGB", (10, 10), (255, 0, 0)).save(root / "b" / "red.png")
    assert dataset_info(f"folder:{root}?val=0").shape == (3, 10, 10)
    assert load_dataset(f"folder:{root}?val=0&channels=1", "train").images.shape == (5, 1, 10, 10)


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


@pytest.mark.robust
@pytest.mark.parametrize("setup,option,needle", [
    (lambda r: None, "", "image folder not found"),
    (lambda r: (r / "train").mkdir(parents=True), "", "no class folders"),
    (lambda r: (r / "train" / "cat").mkdir(parents=True), "", "no images"),
    (lambda r: (make_folder(r, 2, 1), (r / "train" / "red" / "broken.png").write_bytes(b"\x89PNG not really")),
     "", "broken.png: not a readable image"),
    (lambda r: make_folder(r, 2, 1), "?val=0.2", "drop val=0.2"),
    (lambda r: (make_folder(r, 2, 1), (r / "val" / "cyan").mkdir()), "", "cyan not in"),
    (lambda r: make_folder(r, 2, 1), "?size=0", "bad size='0'"),
    (lambda r: make_folder(r, 2, 1), "?val=1.5", "bad val='1.5'"),
    (lambda r: make_folder(r, 2, 1), "?colour=1", "unknown option 'colour'"),
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
