"""Analysis: metrics by hand, every plot rendered from tiny trained runs, the HTML report, TensorBoard logging."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import CIFAR_LABEL_NAMES, write_cifar, write_mnist
from PIL import Image

from cnnlab import checkpoint as ck
from cnnlab.analysis import (
    SECTIONS,
    analyze,
    compute_metrics,
    conv_layers,
    feature_modules,
    filter_weights,
    format_confusion,
    plot_activations,
    plot_curves,
    plot_filters,
    png_bytes,
)
from cnnlab.analysis.plots import DPI
from cnnlab.analysis.report import _RENDER, activation_layers
from cnnlab.cli import main
from cnnlab.errors import DataError, ModelError
from cnnlab.models import create_model, list_models

TINY = ["--steps=4", "--batch_size=16", "--log_every=1", "--ckpt_every=4", "--eval_batch_size=16", "--eval_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs (trained once for the module): LeNet-5 on MNIST, the CIFAR tutorial net with its
    distortions and TensorBoard logging. Dataset lookup is cut off from the machine (as conftest's data_env)."""
    from cnnlab.data import download as dl
    from cnnlab.data import sources

    root = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        mp.setattr(sources, "SYSTEM_DATA_DIRS", ())
        for name in ("MNIST_REMOTE", "FASHION_MNIST_REMOTE", "CIFAR10_REMOTE"):
            mp.setattr(dl, name, dataclasses.replace(getattr(dl, name), mirrors=()))
        write_mnist(root / "data")
        write_cifar(root / "data")
        mp.setenv("CNNLAB_DATA", str(root / "data"))
        mnist, cifar = root / "mnist", root / "cifar"
        assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(mnist), "--lr=0.05", *TINY]) == 0
        assert main(["train", "--recipe", "cifar10-prettytensor", "--model-dir", str(cifar), "--tensorboard",
                     *TINY]) == 0
        yield {"mnist": mnist, "cifar": cifar, "data": root / "data", "root": root}


def load_png(path_or_bytes) -> np.ndarray:
    """RGB array of a PNG file or bytes; fails unless it really is a PNG."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def assert_not_blank(img: np.ndarray) -> None:
    """Real content: many colours, contrast, and the middle of the picture is not one flat colour."""
    packed = (img[..., 0].astype(np.uint32) << 16) | (img[..., 1].astype(np.uint32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 20
    assert img.std() > 20
    h, w = img.shape[:2]
    assert img[h // 4:3 * h // 4, w // 4:3 * w // 4].std() > 10


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_hand_computed_values():
    # 3 classes; true labels and predictions chosen so every number below can be checked by hand.
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 0, 1, 1, 2])
    logits = torch.full((8, 3), -2.0)
    logits[torch.arange(8), preds] = 2.0
    logits[0, 2] = 1.0  # second choice of example 0 is class 2
    m = compute_metrics(logits, labels, ["a", "b", "c"], top_k=(2, 5))
    assert m.n == 8 and m.accuracy == pytest.approx(4 / 8)
    assert m.confusion.tolist() == [[2, 1, 0], [1, 1, 0], [0, 2, 1]]
    a, b, c = m.per_class
    assert (a.precision, a.recall, a.support) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall) == (pytest.approx(1 / 4), pytest.approx(1 / 2))
    assert b.f1 == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert (c.precision, c.recall) == (pytest.approx(1.0), pytest.approx(1 / 3))
    assert [(p.actual, p.predicted, p.count) for p in m.most_confused] == [("c", "b", 2), ("a", "b", 1), ("b", "a", 1)]
    assert list(m.top_k) == [2]  # top-5 of 3 classes would always be 1: skipped
    # the wrong examples are 2, 4, 5, 6; all have the same logit margin, the hand loss is identical
    assert {t.index for t in m.top_losses[:4]} == {2, 4, 5, 6}
    assert m.top_losses[0].loss == pytest.approx(torch.nn.functional.cross_entropy(logits[2:3], labels[2:3]).item())
    assert m.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    # top-2: example 0 is right already; the wrong ones have equal -2 logits elsewhere, so topk picks by index
    expected_top2 = (logits.topk(2, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert m.top_k[2] == pytest.approx(expected_top2)


def test_precision_is_nan_for_a_class_never_predicted():
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    m = compute_metrics(logits, torch.tensor([0, 2, 1]), ["x", "y", "z"])
    assert math.isnan(m.per_class[2].precision) and m.per_class[2].recall == 0.0
    assert m.macro_f1 == pytest.approx((2 * 0.5 * 1 / 1.5 + 1.0 + 0.0) / 3)


def test_confusion_text_has_rows_named_and_column_numbers():
    cm = np.array([[12, 0], [3, 1005]])
    text = format_confusion(cm, ["cat", "dog"]).splitlines()
    assert text[0].split() == ["12", "0", "(0)", "cat"] and text[1].split() == ["3", "1005", "(1)", "dog"]
    assert text[2].split() == ["(0)", "(1)"]


@pytest.mark.robust
def test_metrics_reject_mismatched_inputs():
    with pytest.raises(DataError, match="class names"):
        compute_metrics(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), ["a", "b"])
    with pytest.raises(DataError, match="labels must be"):
        compute_metrics(torch.zeros(2, 3), torch.tensor([0, 7]), ["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ plots

# Fixed figure sizes (pixels = inches x DPI); a change of layout that changes them should be deliberate.
SIZES = {"samples": (800, 880), "predictions": (800, 880), "misclassified": (800, 880), "confusion": (820, 700),
         "curves": (1300, 420), "filters": (750, 680), "activations": (1000, 680), "augment": (660, 740),
         "probs": (900, 480)}


@pytest.mark.parametrize("kind", list(SIZES))
@pytest.mark.parametrize("run", ["mnist", "cifar"])
def test_every_plot_kind_writes_a_real_image(runs, run, kind, tmp_path, capsys):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(runs[run]), kind, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    img = load_png(out)
    assert (img.shape[1], img.shape[0]) == SIZES[kind]
    assert_not_blank(img)


def test_plot_defaults_to_the_run_plots_folder(runs, capsys):
    assert main(["plot", str(runs["mnist"]), "curves"]) == 0
    assert (runs["mnist"] / "plots" / "curves.png").is_file()


def test_filters_print_the_tutorial_statistics_of_the_whole_layer(runs, capsys):
    assert main(["plot", str(runs["cifar"]), "filters", "--layer", "1", "--channel", "3",
                 "--out", str(runs["root"] / "f.png")]) == 0
    out = capsys.readouterr().out
    tensors, _ = ck.load_checkpoint(ck.latest_checkpoint(runs["cifar"]))
    w = tensors["model/features.4.weight"].float().numpy()  # conv layer 1 of the CIFAR net is features[4]
    assert f"Min: {w.min():.5f}, Max: {w.max():.5f}" in out
    assert f"Mean: {w.mean():.5f}, Stdev: {w.std():.5f}" in out


def test_filter_plot_uses_a_symmetric_diverging_map_and_activations_binary(runs):
    a = analyze(runs["cifar"])
    fig = plot_filters(a.model, 0, 2)
    im = fig.axes[0].images[0]
    _, w, stats = filter_weights(a.model, 0)
    assert im.get_cmap().name.startswith("seismic")
    lo, hi = im.get_clim()
    assert lo == pytest.approx(-hi) and hi == pytest.approx(float(w.abs().max()))
    assert "Min:" in fig.axes[0].get_title() and "Stdev:" in fig.axes[0].get_title()
    # white at 0: a zero weight is drawn white, negative blue, positive red
    assert im.cmap(im.norm(0.0))[:3] == pytest.approx((1.0, 1.0, 1.0), abs=0.01)
    assert im.cmap(im.norm(-hi))[2] > im.cmap(im.norm(-hi))[0]  # more blue than red
    img, _, _ = a.image(0)
    act = plot_activations(a.model, img, 2, crop=a.trained.preprocess.crop)  # the run's centre 24x24
    assert act.axes[1].images[0].get_cmap().name.startswith("binary")
    # the montage shows all 64 maps of the layer, and the scale spans the layer's own min..max
    lo, hi = act.axes[1].images[0].get_clim()
    assert lo == pytest.approx(0.0) and hi > 0  # after ReLU


def test_class_names_are_readable_on_cifar_plots(runs):
    a = analyze(runs["cifar"])
    from cnnlab.analysis import plot_confusion, plot_predictions

    fig = plot_confusion(a.metrics.confusion, a.classes)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CIFAR_LABEL_NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == CIFAR_LABEL_NAMES
    # rotated x labels never touch: neighbours at 45 degrees are dx * sin(45) apart, more than a line of text
    fig.canvas.draw()
    xs = [ax.transData.transform((i, 0))[0] for i in range(len(CIFAR_LABEL_NAMES))]
    line_px = ax.get_xticklabels()[0].get_fontsize() * DPI / 72 * 1.2
    assert ax.get_xticklabels()[0].get_rotation() == 45
    assert min(np.diff(xs)) * math.sin(math.pi / 4) > line_px
    boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert not any(b1.overlaps(b2) for i, b1 in enumerate(boxes) for b2 in boxes[i + 1:])
    xlabel = ax.xaxis.label.get_window_extent()
    assert not any(t.get_window_extent().overlaps(xlabel) for t in ax.get_xticklabels())
    fig = plot_predictions(a.images, a.labels, a.logits, a.classes)
    fig.canvas.draw()
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert titles and all(any(n in t.get_text() for n in CIFAR_LABEL_NAMES) for t in titles)
    boxes = [t.get_window_extent() for t in titles]
    assert not any(b1.overlaps(b2) for i, b1 in enumerate(boxes) for b2 in boxes[i + 1:])
    assert all(b.width < fig.bbox.width / 4 for b in boxes)  # each title fits its column


def test_misclassified_shows_only_mistakes_in_red(runs):
    a = analyze(runs["mnist"])
    from cnnlab.analysis import plot_misclassified

    fig = plot_misclassified(a.images, a.labels, a.logits, a.classes, n=9)
    wrong = int((a.logits.argmax(1) != a.labels).sum())
    shown = [ax for ax in fig.axes if ax.get_title()]
    assert 0 < len(shown) == min(9, wrong)
    for ax in shown:
        true, pred = re.match(r"True: (\S+)\nPred: (\S+) ", ax.get_title()).groups()
        assert true != pred and ax.title.get_color() == "#c62828"


def test_curves_follow_the_metrics_log(runs):
    records = [json.loads(line) for line in (runs["mnist"] / "metrics.jsonl").read_text().splitlines()]
    fig = plot_curves(records)
    loss_ax, acc_ax, lr_ax = fig.axes
    train = [r for r in records if r["kind"] == "train"]
    assert list(loss_ax.lines[0].get_xdata()) == [r["step"] for r in train]
    assert list(loss_ax.lines[0].get_ydata()) == pytest.approx([r["loss"] for r in train])
    evals = [r for r in records if r["kind"] == "eval"]
    assert list(acc_ax.lines[-1].get_ydata()) == pytest.approx([r["accuracy"] for r in evals])
    assert list(lr_ax.lines[0].get_ydata()) == pytest.approx([r["lr"] for r in train])
    with pytest.raises(DataError, match="no training records"):
        plot_curves([])


def test_augment_preview_uses_the_runs_distortions(runs, capsys):
    a = analyze(runs["cifar"])
    aug, own = a.augment()
    assert own and aug.random_crop and aug.flip and aug.hue == 0.05  # the CIFAR recipe's distortions
    aug, own = analyze(runs["mnist"]).augment()
    assert not own and aug.active and not aug.flip  # LeNet run had none: demonstration, no flipped digits


def test_probabilities_and_activations_of_an_image_file(runs, tmp_path, capsys):
    img = tmp_path / "digit.png"
    arr = np.zeros((28, 28), np.uint8)
    arr[6:22, 12:16] = 255
    Image.fromarray(arr).save(img)
    out = tmp_path / "p.png"
    assert main(["plot", str(runs["mnist"]), "probs", "--image", str(img), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("digit.png: ")
    probs = [float(v) for v in re.findall(r" (\d\.\d{3})", text.splitlines()[0])]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001
    assert_not_blank(load_png(out))
    assert main(["plot", str(runs["mnist"]), "activations", "--image", str(img), "--layer", "4",
                 "--out", str(out)]) == 0
    assert_not_blank(load_png(out))


def test_layers_listing_gives_conv_and_module_indices(runs, capsys):
    assert main(["plot", str(runs["mnist"]), "layers"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 6  # LeNet-5's features: conv, tanh, pool, conv, relu, pool
    assert rows[0].split()[:4] == ["0", "0", "0", "Conv2d"] and rows[3].split()[:4] == ["3", "1", "3", "Conv2d"]
    assert "(16, 10, 10)" in rows[4]
    assert len({row.index("(") for row in rows}) == 1  # the shapes line up, whatever the type names' lengths


@pytest.mark.parametrize("name", list_models())
def test_filters_and_activations_work_for_every_zoo_model(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    convs = conv_layers(model)
    assert convs, f"{name} has no conv layer in .features"
    c, h, w = model.meta.input_size
    image = torch.randint(0, 256, (c, h, w), dtype=torch.uint8)
    img = load_png(png_bytes(plot_filters(model, len(convs) - 1, 0)))  # the deepest conv: many input channels
    assert (img.shape[1], img.shape[0]) == (int(7.5 * DPI), int(6.8 * DPI))
    assert_not_blank(img)
    layers = activation_layers(model)
    assert len(layers) == min(4, len(convs)) and all(0 <= i < len(feature_modules(model)) for i in layers)
    assert_not_blank(load_png(png_bytes(plot_activations(model, image, layers[0]))))


@pytest.mark.robust
@pytest.mark.parametrize("args, message", [
    (["filters", "--layer", "7"], "conv layer 7 out of range: the model has 2 conv layers"),
    (["filters", "--channel", "1"], "input channel 1 out of range"),
    (["activations", "--layer", "40"], "layer 40 out of range: model.features has 6 modules"),
    (["activations", "--index", "5000"], "index 5000 out of range: the test split has 32 images"),
    (["probs", "--image", "/nonexistent/x.png"], "image not found"),
    (["histogram"], "unknown plot kind 'histogram'"),
])
def test_bad_plot_requests_are_one_clear_line(runs, args, message, capsys):
    assert main(["plot", str(runs["mnist"]), *args, "--out", str(runs["root"] / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ") and message in err and err.count("\n") == 1


@pytest.mark.robust
def test_report_and_plot_of_a_missing_run_are_one_clear_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["plot", str(tmp_path / "nope"), "curves"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("cnnlab: error: no such run directory") for line in err)


# ------------------------------------------------------------------------------------------------ report


def check_report(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    for sid, heading in SECTIONS:
        assert f'<section id="{sid}"><h2>{heading}</h2>' in text, sid
    # self-contained: no external resources of any kind
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    for data in images:
        assert_not_blank(load_png(base64.b64decode(data)))
    return text


def test_train_writes_a_report_with_every_section(runs):
    text = check_report(runs["mnist"] / "report.html")
    images = re.findall(r'<img alt="([^"]+)"', text)
    # curves, confusion, misclassified, predictions, probabilities, augmentation, 2 filters, 2 activations
    assert len(images) == 10 and "filters of conv layer 1" in images and "activations of feature module 4" in images
    a = analyze(runs["mnist"])
    assert f"{a.metrics.accuracy:.2%}" in text  # the test accuracy is the one the model gets now
    assert "Min: " in text and "Stdev: " in text and "Not available" not in text


def test_report_command_and_class_names_are_escaped(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(runs["cifar"]), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"test accuracy \d\.\d{4}, top-3 \d\.\d{4}, top-5 \d\.\d{4}, loss", stdout)
    assert f"report: {out}" in stdout
    text = check_report(out)
    assert "automobile" in text and "airplane" in text
    a = analyze(runs["cifar"])
    a.trained.classes[0] = "<b>plane & co</b>"
    a.metrics = compute_metrics(a.logits, a.labels, a.classes)
    for section in ("run", "per-class", "most-confused"):  # the sections that print class names as text
        html = _RENDER[section](a)
        assert "<b>plane" not in html and "&lt;b&gt;plane &amp; co&lt;/b&gt;" in html, section


def test_report_without_the_dataset_still_shows_what_needs_no_data(runs, tmp_path, monkeypatch, capsys, data_env):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "empty"))
    out = tmp_path / "r.html"
    assert main(["report", str(runs["mnist"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # The download attempt is announced ("cnnlab: downloading mnist into ..."); then one warning.
    lines = [line for line in err.splitlines() if not line.startswith("cnnlab: downloading mnist into ")]
    assert len(lines) == 1 and lines[0].startswith("cnnlab: warning: no test metrics in the report:"), err
    text = out.read_text()
    metrics = re.search(r'<section id="metrics">(.*?)</section>', text, re.S).group(1)
    assert "Not available" in metrics
    filters = re.search(r'<section id="filters">(.*?)</section>', text, re.S).group(1)
    assert "data:image/png;base64," in filters
    assert "data:image/png;base64," in re.search(r'<section id="curves">(.*?)</section>', text, re.S).group(1)


def test_no_report_flag_and_a_failing_report_never_lose_the_run(runs, monkeypatch, capsys):
    monkeypatch.setenv("CNNLAB_DATA", str(runs["data"]))
    quiet = runs["root"] / "quiet"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(quiet), "--no-report", *TINY]) == 0
    assert ck.latest_checkpoint(quiet) is not None and not (quiet / "report.html").exists()

    import cnnlab.analysis

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cnnlab.analysis, "write_report", broken)
    capsys.readouterr()
    failing = runs["root"] / "failing"
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(failing), *TINY]) == 0
    err = capsys.readouterr().err
    assert "cnnlab: warning: report not written (RuntimeError: disk on fire)" in err and err.count("\n") == 1
    assert ck.latest_checkpoint(failing).name == "ckpt-00000004.safetensors"
    assert json.loads((failing / "results.json").read_text())["step"] == 4


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_events_hold_the_runs_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((runs["cifar"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "train/samples_per_s", "test/loss", "test/accuracy"} <= tags
    records = [json.loads(line) for line in (runs["cifar"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e.value for e in acc.Scalars("test/accuracy")] == pytest.approx([r["accuracy"] for r in evals])


@pytest.mark.robust
def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    from cnnlab.errors import ConfigError
    from cnnlab.train.tensorboard import TensorBoardLog

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'cnnlab\[tensorboard\]'"):
        TensorBoardLog(tmp_path / "tb")


@pytest.mark.robust
def test_bad_layer_index_via_the_api_is_a_model_error():
    model = create_model("lenet5")
    with pytest.raises(ModelError, match="2 conv layers"):
        plot_filters(model, 2, 0)


def test_analyze_reuses_an_evaluation_only_of_the_loaded_weights(runs, monkeypatch):
    from cnnlab.infer import EvalResult

    monkeypatch.setenv("CNNLAB_DATA", str(runs["data"]))
    a = analyze(runs["mnist"])
    step, fresh = a.trained.step, a.logits
    acc = float((fresh.argmax(1) == a.labels).float().mean())
    # doubled logits: the same predictions and accuracy, yet told apart from a second evaluation's
    done = EvalResult(loss=0.0, accuracy=acc, n=len(a.labels), logits=fresh * 2)
    reused = analyze(runs["mnist"], evaluated=(step, done))
    assert torch.equal(reused.logits, fresh * 2)
    assert reused.metrics.accuracy == pytest.approx(a.metrics.accuracy)
    assert reused.metrics.loss != pytest.approx(a.metrics.loss)  # the metrics come from the reused logits
    # another step's weights, another accuracy on these labels, or part of the split: evaluated again
    for other, kw in [((step - 1, done), {}),
                      ((step, dataclasses.replace(done, accuracy=acc + 0.5)), {}),
                      ((step, done), {"limit": 8})]:
        b = analyze(runs["mnist"], evaluated=other, **kw)
        assert torch.allclose(b.logits, fresh[:len(b.logits)], atol=1e-5)


def test_train_report_reuses_the_final_test_evaluation(tiny_data, tmp_path, monkeypatch):
    from cnnlab.infer import TrainedModel

    calls, real = [], TrainedModel.logits

    def counted(self, x, *args, **kw):
        calls.append(len(x))
        return real(self, x, *args, **kw)

    monkeypatch.setattr(TrainedModel, "logits", counted)
    run = tmp_path / "run"
    args = ["--steps=4", "--batch_size=16", "--eval_batch_size=16", "--log_every=2"]
    assert main(["train", "--recipe", "lenet5-mnist", "--model-dir", str(run), *args]) == 0
    assert (run / "report.html").is_file()
    assert 32 not in calls  # the 32 test images were evaluated once, by training, not again for the report
    recorded = json.loads((run / "results.json").read_text())["test"]["accuracy"]
    assert analyze(run).metrics.accuracy == pytest.approx(recorded)
    assert 32 in calls  # a later analysis has no training evaluation to reuse


@pytest.mark.robust
def test_a_plot_file_holds_the_format_its_name_says(tmp_path):
    from cnnlab.analysis.plots import save_figure
    from cnnlab.errors import ConfigError

    fig = plot_filters(create_model("lenet5"), 0, 0)
    heads = {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF", ".jpg": b"\xff\xd8\xff", "": b"\x89PNG"}
    for suffix, head in heads.items():
        assert save_figure(fig, tmp_path / f"f{suffix}").read_bytes().startswith(head), suffix
    with pytest.raises(ConfigError, match=r"'\.txt'.*\.png, \.svg, \.pdf or \.jpg"):
        save_figure(fig, tmp_path / "f.txt")
    assert not (tmp_path / "f.txt").exists()


@pytest.mark.robust
def test_plot_refuses_a_bad_suffix_before_evaluating(runs, monkeypatch, capsys):
    import cnnlab.analysis

    monkeypatch.setattr(cnnlab.analysis, "analyze", lambda *a, **kw: pytest.fail("evaluated before the check"))
    assert main(["plot", str(runs["mnist"]), "confusion", "--out", str(runs["root"] / "c.gif")]) == 2
    assert "cannot write a plot as '.gif'" in capsys.readouterr().err
