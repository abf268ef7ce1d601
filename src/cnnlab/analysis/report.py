"""One self-contained HTML page per run: config, curves, metrics, confusion, mistakes, filters, activations.

Images are embedded as base64 PNG data URIs and the style sheet is inline, so the file opens offline and
can be mailed as is. All text from the run (class names, config values, paths) is HTML-escaped.
A section that cannot be drawn (e.g. no metrics log, dataset missing) says why instead of failing the page.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import CnnlabError
from ..io import atomic_write_text
from . import plots
from .analyze import Analysis
from .layers import conv_layers, feature_modules, filter_weights
from .metrics import format_confusion

# The page's sections, in order: (id, heading). Tests check that every id is present.
SECTIONS = [("run", "Run"), ("curves", "Training curves"), ("metrics", "Metrics"), ("per-class", "Per-class scores"),
            ("confusion", "Confusion matrix"), ("most-confused", "Most confused pairs"),
            ("misclassified", "Misclassified examples"), ("predictions", "Predictions"),
            ("probabilities", "Class probabilities of one image"), ("augmentation", "Augmentation"),
            ("filters", "Convolution filters"), ("activations", "Activations")]
MAX_LAYERS = 4  # filter / activation plots per report (the first conv layers)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:0 20px 40px;color:#212121;line-height:1.45}
h1{margin:24px 0 4px}h2{border-bottom:2px solid #e0e0e0;padding-bottom:4px;margin-top:36px}
nav a{margin-right:12px;font-size:14px}.sub{color:#616161;margin:0 0 12px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
td,th{border:1px solid #e0e0e0;padding:3px 9px;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:8px 0;border:1px solid #eeeeee}
pre{background:#fafafa;border:1px solid #eeeeee;padding:8px;overflow-x:auto;font-size:13px}
.big{font-size:20px;font-weight:600}.na{color:#9e9e9e;font-style:italic}.wrong{color:#c62828}
details summary{cursor:pointer;color:#1565c0}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(v, fmt: str = ".4f") -> str:
    if isinstance(v, float) and math.isnan(v):
        return '<span class="na">n/a</span>'
    return format(v, fmt) if isinstance(v, (int, float)) else _e(v)


def _img(fig, alt: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str] | None, rows: list[list[str]], num: tuple[int, ...] = ()) -> str:
    """Rows of already-escaped cell HTML; the columns in ``num`` are right-aligned numbers."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if j in num else f"<td>{c}</td>"
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _na(reason: str) -> str:
    return f'<p class="na">Not available: {_e(reason)}</p>'


# --- sections: each takes the Analysis and returns HTML (raising CnnlabError when it cannot be drawn) ---

def _run(a: Analysis) -> str:
    run, t = a.run, a.trained
    facts = [("model", f"{t.model.meta.name} {t.model.meta.args or ''}"), ("dataset", t.dataset),
             ("classes", ", ".join(t.classes)), ("step", f"{t.step} of {run.get('total_steps', '?')}"),
             ("checkpoint", t.path.name)]
    facts += [(k, run[k]) for k in ("code_version", "torch", "device", "cpu", "threads", "seed") if k in run]
    seconds = a.results.get("seconds")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
        facts.append(("training time", f"{seconds:.1f} s"))
    out = _table(None, [[_e(k), _e(v)] for k, v in facts])
    config = t.config or run.get("config", {})
    out += "<details><summary>Full training config</summary>" + _table(
        ["key", "value"], [[_e(k), _e(v)] for k, v in sorted(config.items())]) + "</details>"
    return out


def _curves(a: Analysis) -> str:
    if not a.records:
        raise CnnlabError(f"no metrics log ({a.run_dir / 'metrics.jsonl'})")
    return _img(plots.plot_curves(a.records), "training curves")


def _metrics(a: Analysis) -> str:
    a.need_data()
    m = a.metrics
    rows = [["accuracy (top-1)", f'<span class="big">{m.accuracy:.2%}</span> ({round(m.accuracy * m.n)} / {m.n})'],
            ["loss (cross-entropy)", _num(m.loss)]]
    rows += [[f"top-{k} accuracy", f"{v:.2%}"] for k, v in m.top_k.items()]
    rows.append(["macro F1", _num(m.macro_f1)])
    return f'<p class="sub">{_e(a.split)} split, {m.n} images</p>' + _table(["metric", "value"], rows)


def _per_class(a: Analysis) -> str:
    a.need_data()
    rows = [[_e(c.name), _num(c.precision, ".3f"), _num(c.recall, ".3f"), _num(c.f1, ".3f"), str(c.support)]
            for c in a.metrics.per_class]
    return _table(["class", "precision", "recall", "F1", "support"], rows, (1, 2, 3, 4))


def _confusion(a: Analysis) -> str:
    a.need_data()
    m = a.metrics
    return (_img(plots.plot_confusion(m.confusion, a.classes, f"Confusion matrix, {a.split} split"), "confusion matrix")
            + f"<details><summary>As text</summary><pre>{_e(format_confusion(m.confusion, a.classes))}</pre></details>")


def _most_confused(a: Analysis) -> str:
    a.need_data()
    pairs = a.metrics.most_confused
    if not pairs:
        return "<p>No confusions: every image was classified correctly.</p>"
    return _table(["true class", "predicted as", "count"],
                  [[_e(p.actual), _e(p.predicted), str(p.count)] for p in pairs], (2,))


def _misclassified(a: Analysis) -> str:
    a.need_data()
    losses = [[str(t.index), _e(t.actual), f'<span class="wrong">{_e(t.predicted)}</span>' if t.actual != t.predicted
               else _e(t.predicted), f"{t.probability:.3f}", f"{t.actual_probability:.3f}", f"{t.loss:.3f}"]
              for t in a.metrics.top_losses]
    return (_img(plots.plot_misclassified(a.images, a.labels, a.logits, a.classes), "misclassified examples")
            + "<h3>Top losses</h3>" + _table(["index", "true", "predicted", "p(predicted)", "p(true)", "loss"], losses,
                                                 (0, 3, 4, 5)))


def _predictions(a: Analysis) -> str:
    a.need_data()
    return _img(plots.plot_predictions(a.images, a.labels, a.logits, a.classes), "predictions")


def _probabilities(a: Analysis) -> str:
    img, y, caption = a.image(0)
    return f'<p class="sub">{_e(caption)}</p>' + _img(
        plots.plot_probabilities(a.probabilities(img), a.classes, img, y), "class probabilities")


def _augmentation(a: Analysis) -> str:
    img, y, _ = a.image(0)
    aug, own = a.augment()
    note = ("The run's training augmentation applied to one test image." if own else
            "This run trained without augmentation; shown are demonstration distortions (the CIFAR tutorial's "
            "for colour images, small shifts and contrast/brightness changes for grayscale).")
    return f'<p class="sub">{_e(note)}</p>' + _img(plots.plot_augmentations(img, aug, a.classes[y]), "augmentation")


def _filters(a: Analysis) -> str:
    out = ['<p class="sub">Weights for input channel 0 of each conv layer; blue negative, red positive, white 0 '
           "(one symmetric scale per layer).</p>"]
    for i in range(min(MAX_LAYERS, len(conv_layers(a.model)))):
        name, _, stats = filter_weights(a.model, i)
        out.append(f"<h3>Conv layer {i} (features.{_e(name)})</h3><pre>{_e(chr(10).join(stats.lines()))}</pre>")
        out.append(_img(plots.plot_filters(a.model, i, 0), f"filters of conv layer {i}"))
    return "".join(out)


_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def activation_layers(model: nn.Module, limit: int = MAX_LAYERS) -> list[int]:
    """Feature-module indices worth showing: the output of each of the first conv layers, taken after its
    activation function when one follows it directly or after a normalisation (as the tutorial's
    ``output_conv1``, whose conv includes its ReLU)."""
    mods = feature_modules(model)
    names = [n for n, _ in mods]
    out = []
    for name, _ in conv_layers(model)[:limit]:
        i = j = names.index(name)
        while j + 1 < len(mods) and isinstance(mods[j + 1][1], _NORMS):  # conv -> norm -> activation
            j += 1
        is_act = j + 1 < len(mods) and type(mods[j + 1][1]).__module__ == "torch.nn.modules.activation"
        out.append(j + 1 if is_act else i)
    return out


def _activations(a: Analysis) -> str:
    img, _, caption = a.image(0)
    out = [f'<p class="sub">Feature maps for {_e(caption)}; white low, black high (one scale per layer).</p>']
    for i in activation_layers(a.model):
        fig = plots.plot_activations(a.model, img, i, caption, crop=a.trained.preprocess.crop)
        out.append(_img(fig, f"activations of feature module {i}"))
    return "".join(out)


_RENDER: dict[str, Callable[[Analysis], str]] = {
    "run": _run, "curves": _curves, "metrics": _metrics, "per-class": _per_class, "confusion": _confusion,
    "most-confused": _most_confused, "misclassified": _misclassified, "predictions": _predictions,
    "probabilities": _probabilities, "augmentation": _augmentation, "filters": _filters, "activations": _activations,
}


def render_report(a: Analysis) -> str:
    """The report of an analysed run as one HTML string (no external resources)."""
    t0 = time.perf_counter()
    body = []
    for sid, heading in SECTIONS:
        try:
            content = _RENDER[sid](a)
        except CnnlabError as e:
            content = _na(str(e))
        body.append(f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>')
    nav = "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h in SECTIONS)
    title = f"cnnlab report: {a.run_dir.name}"
    acc = f", {a.split} accuracy {a.metrics.accuracy:.2%}" if a.metrics else ""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f'<p class="sub">{_e(a.trained.model.meta.name)} on {_e(a.trained.dataset)}, '
            f"step {a.trained.step}{_e(acc)}; "
            f"{_e(str(a.run_dir))}; written {_e(when)} in {time.perf_counter() - t0:.1f} s</p><nav>{nav}</nav>"
            + "".join(body) + "</body></html>\n")


def write_report(a: Analysis, out: str | Path | None = None) -> Path:
    """Write the report (default ``RUN_DIR/report.html``) atomically; returns its path."""
    path = Path(out) if out else a.run_dir / "report.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot create {path.parent}: {e.strerror}") from None
    atomic_write_text(path, render_report(a))
    return path
