"""The ``cnnlab`` command line. Thin: parses arguments, calls the library, prints results.

Every expected failure (bad input, missing data, bad config) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import CnnlabError, ConfigError
from .rundir import Preempted
from .runtime import tune_allocator

if TYPE_CHECKING:  # annotations only: the commands import torch where they need it
    import torch


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the fault catalogue's rule), pointing at --help for the rest."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float, high: float | None = None, *, above: bool = False):
    """An argparse type: ``kind`` (int or float) in [low, high] (or above ``low`` when ``above``), else usage error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or (v <= low if above else v < low) or (high is not None and v > high):
            rng = f"above {low:g}" if above else (f"{low:g} to {high:g}" if high is not None else f"at least {low:g}")
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {rng})")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE, NON_NEGATIVE = _number(int, 1), _number(int, 0)


def _add_checkpoint_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="auto", metavar="latest|best|PATH",
                   help="which checkpoint of the run: best, latest or a file (default: best when kept, else latest)")


def _config_keys_help() -> str:
    """The train command's epilog: every TrainConfig key with type, default and description, from the dataclass."""
    from .config import describe_fields

    rows = describe_fields()
    wk, wt, wd = (max(len(r[i]) for r in rows) for i in range(3))
    lines = [f"  {k:<{wk}}  {t:<{wt}}  {d:<{wd}}  {h}" for k, t, d, h in rows]
    return ("config keys (set as --key=value, --key value, --no-key for booleans, model_args.NAME=VALUE;\n"
            "dashes and underscores are the same; a recipe sets them as key = value):\n"
            f"  {'key':<{wk}}  {'type':<{wt}}  {'default':<{wd}}  description\n" + "\n".join(lines))


def _add_run(p: argparse.ArgumentParser, help: str = "run directory (newest checkpoint)") -> None:
    """The run a command works on: positional RUN, or --model-dir RUN as tf.estimator users type it."""
    p.add_argument("run_dir", nargs="?", metavar="RUN", help=f"{help}; or give it as --model-dir")
    p.add_argument("--model-dir", dest="model_dir", metavar="RUN", help="same as the positional RUN")


def _resolve_run(args, parser: argparse.ArgumentParser) -> None:
    """Settle ``args.run_dir`` from the positional and --model-dir; a usage error if neither or two differ.

    For predict the positional slot may hold the first image when --model-dir names the run.
    """
    given, flag = args.run_dir, args.model_dir
    if flag is None:
        if given is None:
            parser.error("a run is required: give RUN or --model-dir RUN")
        return
    if given is not None and Path(given) != Path(flag):
        if hasattr(args, "images") and not _looks_like_run(Path(given)):
            args.images = [given, *args.images]  # `predict --model-dir RUN a.png photos/`
        else:
            parser.error(f"two runs given: {given} and --model-dir {flag}; give one")
    args.run_dir = flag


def _looks_like_run(path: Path) -> bool:
    """A checkpoint file, or a folder holding a run's record or checkpoints (a folder of images is not)."""
    if path.suffix == ".safetensors":
        return True
    return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.safetensors")))


def _settle_predict(args, parser: argparse.ArgumentParser) -> None:
    """Check predict's images and output flags; a usage error when none are given or two disagree."""
    if not args.images:  # one positional: the run without images, or images without a run
        run = Path(args.run_dir)
        if not _looks_like_run(run):  # `cnnlab predict photos/`: images without a run
            parser.error(f"a run is required: give RUN or --model-dir RUN, then the images ({args.run_dir} is not "
                         "a run directory or checkpoint)")
        parser.error(f"no images given: list image files or folders after the run, e.g. "
                     f"`cnnlab predict {args.run_dir} digit.png photos/`")
    if args.json and args.format not in (None, "json"):
        parser.error(f"--json and --format {args.format} disagree: --json is --format json (one JSON document); "
                     "give one of them")
    args.format = "json" if args.json else (args.format or "text")


def _check_out(args, out: str | Path, reads: list[Path] | tuple = (), own: tuple[str, ...] = ()) -> None:
    """Refuse an ``--out`` that is a checkpoint or a record of a run, or a file the command reads.

    Called before the command opens or writes anything. Besides ``reads``, the checkpoint the command loads counts
    as read when it was named by path (a checkpoint file as RUN, or ``--checkpoint PATH``).
    """
    from .rundir import check_not_protected

    inputs = list(reads)
    if args.run_dir and Path(args.run_dir).is_file():
        inputs.append(Path(args.run_dir))
    if getattr(args, "checkpoint", "auto") not in ("auto", "latest", "best"):
        inputs.append(Path(args.checkpoint))
    check_not_protected(Path(out), reads=inputs, own=own)


def _add_common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="first place to look for dataset files (then $CNNLAB_DATA, ~/.cache/cnnlab)")


def cmd_train(args, extra: list[str]) -> int:
    from .config import parse_overrides, resolve_config
    from .train.distributed import is_main_process
    from .train.loop import fit

    config = resolve_config(args.recipe, parse_overrides(extra))
    _preflight(config)
    model_dir = Path(args.model_dir or Path("runs") / (args.recipe or config.model))
    if not is_main_process():  # a torchrun worker of rank > 0: rank 0 alone prints, logs and reports
        args.tensorboard, args.report = None, False
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (this worker process ends after training)
    print(f"cnnlab train: {args.recipe or 'no recipe'} -> {model_dir}")
    print(config.to_json())
    hooks = []
    if args.tensorboard is not None:
        from .train.tensorboard import TensorBoardLog

        hooks.append(TensorBoardLog(args.tensorboard or model_dir / "tensorboard"))
    result = fit(config, model_dir, data_dir=args.data_dir, progress=args.progress, hooks=hooks, force=args.force)
    print(f"done: step {result.step}, test accuracy {result.test.accuracy:.4f}, loss {result.test.loss:.4f}, "
          f"{result.seconds:.1f} s; model in {model_dir}")
    # the best checkpoint is what evaluate, predict, export and serve load: say what it scores when it is not the last
    evaluated = result.best or (result.step, result.test)
    if evaluated[0] != result.step:
        print(f"best checkpoint (step {evaluated[0]}, used by evaluate, predict, export and serve): test accuracy "
              f"{evaluated[1].accuracy:.4f}, loss {evaluated[1].loss:.4f}")
    if args.report:
        try:  # the trained run is safe on disk whatever happens here: a failure is one warning line
            from .analysis import analyze, write_report
            from .infer import select_device

            # training's test evaluation of the weights the report loads stands in for a second pass
            analysis = analyze(model_dir, data_dir=args.data_dir, device=select_device(config.device),
                               evaluated=evaluated)
            print(f"report: {write_report(analysis)}")
        except Exception as e:  # noqa: BLE001  (whatever fails in the optional report is one warning)
            print(f"cnnlab: warning: report not written ({type(e).__name__}: {e}); "
                  f"try `cnnlab report {model_dir}`", file=sys.stderr)
    return 0


def _preflight(config) -> None:
    """Refuse an unknown model, a missing device or a precision the device cannot run before anything is printed.

    `fit` checks the same again. These checks are cheap (a ``timm:`` name imports timm, which the build needs
    anyway), and the error becomes the command's only line instead of following the whole printed config.
    """
    from .infer import select_device
    from .models.registry import model_entry
    from .runtime import resolve_precision
    from .train.controls import check_precision

    model_entry(config.model)
    device = select_device(config.device)
    check_precision(resolve_precision(config.precision, device.type), device)


def cmd_evaluate(args, extra: list[str]) -> int:
    from .train.classifier import Classifier

    clf = Classifier(model_dir=args.run_dir, data_dir=args.data_dir, checkpoint=args.checkpoint)
    res = clf.evaluate(args.split, tta=args.tta)
    if args.json:
        print(json.dumps(res))
    else:
        views = f", test-time views {res['tta']}" if args.tta else ""
        print(f"{args.run_dir} step {res['step']}: {args.split} accuracy {res['accuracy']:.4f}  "
              f"loss {res['loss']:.4f}  ({res['n']} images{views})")
    return 0


def cmd_predict(args, extra: list[str]) -> int:
    from .predict_files import image_files, predictions, write_predictions
    from .train.classifier import Classifier

    files = image_files(args.images)
    if args.out:  # before the checkpoint is read or anything is opened: never over a run's files or an input
        _check_out(args, args.out, reads=files)
    clf = Classifier(model_dir=args.run_dir, checkpoint=args.checkpoint)
    classes = clf.trained.classes if args.all_probs else None  # loads the run now: its errors come first
    results = predictions(lambda batch: clf.predict(batch, top_k=args.top_k, invert=args.invert, centre=args.centre),
                          files, args.batch_size)
    write_predictions(results, args.format, args.out, classes=classes)
    return 0


def cmd_models(args, extra: list[str]) -> int:
    from .models import count_params, create_model, list_models, model_entry

    if args.describe:  # layer-by-layer table of one model (registered name or spec:...)
        from .models.spec import describe_model

        print(describe_model(create_model(args.describe)))
        return 0
    names = list_models(args.pattern)
    if not names:
        raise CnnlabError(f"no model matches {args.pattern!r}")
    if ":" in args.pattern:  # a prefix's names (e.g. timm's, hundreds of them): listed, not built
        print("\n".join(names))
        return 0
    rows = []
    for n in names:
        m = create_model(n)
        rows.append((n, f"{count_params(m):,}", "x".join(map(str, m.meta.input_size)), model_entry(n).description))
    w = [max(len(r[i]) for r in rows + [("model", "params", "input", "")]) for i in range(3)]
    print(f"{'model':<{w[0]}}  {'params':>{w[1]}}  {'input':<{w[2]}}  layers")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    print("\nany timm architecture: --model timm:NAME (pretrained: --model_args.pretrained=true); "
          "list them: cnnlab models 'timm:resnet*'")
    return 0


def cmd_datasets(args, extra: list[str]) -> int:
    from .data import dataset_info, list_datasets

    for name in list_datasets():
        info = dataset_info(name)
        print(f"{name:<14} {info.num_classes:>3} classes  {'x'.join(map(str, info.shape)):<8}  "
              f"{', '.join(info.class_names[:10])}")
    print(_folder_help())
    return 0


def _folder_help() -> str:
    """The ``folder:PATH`` entry of `cnnlab datasets`, its options from the folder parser's own table."""
    from .data import folder

    options = getattr(folder, "_OPTIONS", {})
    query = "&".join(f"{k}=" for k in options)
    lines = [f"{'folder:PATH':<14} image folders PATH/<class>/* or PATH/{{train,test|val}}/<class>/*"
             + (f"; options: folder:PATH?{query}" if options else "")]
    lines += [f"{'':<15}{k}: {hint}" for k, (_, _, hint) in options.items()]
    return "\n".join(lines)


def _warn(lines: list[str]) -> None:
    """Print each line as a one-line warning on stderr (damaged optional records a command did without)."""
    for line in lines:
        print(f"cnnlab: warning: {line}", file=sys.stderr)


def cmd_report(args, extra: list[str]) -> int:
    from .analysis import analyze, write_report

    if args.out:  # the default, RUN/report.html, is the report's own file
        _check_out(args, args.out, own=("report.html",))
    a = analyze(args.run_dir, args.split, data_dir=args.data_dir, require_data=False, checkpoint=args.checkpoint)
    _warn(a.warnings)
    if a.data_error:
        print(f"cnnlab: warning: no {args.split} metrics in the report: {a.data_error}", file=sys.stderr)
    else:
        m = a.metrics
        tops = "".join(f", top-{k} {v:.4f}" for k, v in m.top_k.items())
        print(f"{a.run_dir} step {a.trained.step}: {args.split} accuracy {m.accuracy:.4f}{tops}, loss {m.loss:.4f} "
              f"({m.n} images)")
        if m.most_confused:
            pairs = m.most_confused[:5]
            print("most confused: " + ", ".join(f"{p.actual} -> {p.predicted} ({p.count})" for p in pairs))
    print(f"report: {write_report(a, args.out)}")
    return 0


def cmd_plot(args, extra: list[str]) -> int:
    from .analysis import PLOT_KINDS, PlotOptions, analyze, describe_layers, save_figure
    from .analysis.analyze import DATA_FREE_KINDS

    if args.kind == "layers":  # a listing, not a picture: the indices --layer takes
        from .infer import load_trained

        rows = describe_layers(load_trained(args.run_dir).model)
        wn, wt = (max([len(head), *(len(r[key]) for r in rows)]) for key, head in (("name", "name"), ("type", "type")))
        print(f"{'module':>6}  {'conv':>4}  {'name':<{wn}}  {'type':<{wt}}  output (C, H, W)")
        for r in rows:
            conv = "" if r["conv"] is None else str(r["conv"])
            print(f"{r['index']:>6}  {conv:>4}  {r['name']:<{wn}}  {r['type']:<{wt}}  {r['shape']}")
        return 0
    if args.kind not in PLOT_KINDS:
        raise CnnlabError(f"unknown plot kind {args.kind!r}; choose from {', '.join(PLOT_KINDS)}, layers")
    if args.out:  # the default is RUN/plots/KIND.png
        from .analysis.plots import figure_format

        _check_out(args, args.out, reads=[Path(args.image)] if args.image else [])
        figure_format(args.out)  # a suffix of no image format fails before the split is evaluated
    needs_data = args.kind not in DATA_FREE_KINDS and args.image is None
    a = analyze(args.run_dir, args.split, data_dir=args.data_dir, require_data=needs_data,
                limit=None if args.kind in ("confusion", "misclassified") else max(args.n, args.index + 1))
    _warn(a.warnings)
    opts = PlotOptions(layer=args.layer, channel=args.channel, index=args.index, image=args.image, n=args.n)
    fig, lines = PLOT_KINDS[args.kind](a, opts)
    for line in lines:
        print(line)
    out = Path(args.out) if args.out else a.run_dir / "plots" / f"{args.kind}.png"
    try:
        print(f"wrote {save_figure(fig, out)}")
    except OSError as e:
        raise CnnlabError(f"cannot write {out}: {e.strerror or e}") from None
    return 0


def cmd_recipes(args, extra: list[str]) -> int:
    from .config import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<30} {r.description}")
    return 0


def cmd_bench(args, extra: list[str]) -> int:
    import torch

    from .bench import latency, peak_flops, train_throughput
    from .models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    r = train_throughput(args.model, batch_size=args.batch_size, steps=args.steps, precision=args.precision,
                         channels_last=args.channels_last, compile=args.compile)
    peak = peak_flops(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(f"{args.model}: train batch {args.batch_size} ({args.precision}, threads {torch.get_num_threads()}): "
          f"{r['samples_per_s']:.0f} samples/s, {r['step_ms']:.1f} ms/step, {r['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"= {r['flops_per_s'] / peak['flops']:.0%} of this CPU's {args.precision} peak "
          f"({peak['flops'] / 1e9:.0f} GFLOP/s, best probe: {peak['probe']})")
    m = create_model(args.model)
    lat = latency(m, m.meta.input_size, n=args.latency_n)
    print(f"{args.model}: single-image latency p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms "
          f"({lat['n']} calls)")
    return 0


def cmd_export(args, extra: list[str]) -> int:
    from .export import export_onnx

    run, out = args.run_dir, args.out
    if args.checkpoint != "auto":  # export that file, still to RUN_DIR/model.onnx by default
        from .checkpoint import choose_checkpoint

        run = choose_checkpoint(args.run_dir, args.checkpoint)
        out = out or (Path(args.run_dir) / "model.onnx" if Path(args.run_dir).is_dir() else None)
    res = export_onnx(run, out, tolerance=args.tolerance, opset=args.opset, data_dir=args.data_dir,
                      tta=not args.no_tta)
    graph = "single view" if res.tta == "none" else f"with test-time augmentation {res.tta}"
    print(f"wrote {res.path} ({res.path.stat().st_size:,} bytes, {res.seconds:.1f} s; opset {res.opset}, {graph}); "
          f"parity of onnxruntime with cnnlab predict on {res.n_samples} images, batch sizes "
          f"{'/'.join(map(str, res.batch_sizes))}: max abs diff {res.max_abs_diff:.2e} (tolerance {args.tolerance:g})")
    return 0


def cmd_serve(args, extra: list[str]) -> int:
    from .serve import require_serve

    require_serve()
    from .serve import create_app, is_loopback, serve_forever
    from .serve.limits import Limits
    from .serve.server import ConnectionLimits

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_images=args.max_batch_images,
                    max_request_pixels=args.max_request_pixels, max_inflight_pixels=args.max_inflight_pixels)
    from .infer import load_trained, select_device

    device = select_device(args.device)
    threads = _serve_worker_threads(args.workers, device)
    trained = load_trained(args.run_dir, device, checkpoint=args.checkpoint)
    app = create_app(args.run_dir, device=args.device, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     limits=limits, read_timeout=args.body_timeout, trained=trained,
                     workers=args.workers, forward_threads=threads)
    t = app.state.trained
    try:  # an address that does not resolve fails here, before the warning below would name it
        socket.getaddrinfo(args.host or None, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)  # '': all
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}") from None
    if not is_loopback(args.host):
        print(f"cnnlab serve: warning: listening on {args.host}, reachable from other machines", file=sys.stderr)
    workers = f", {args.workers} worker processes" if args.workers > 1 else ""
    print(f"cnnlab serve: {t.model.meta.name} step {t.step} ({t.path}) on http://{args.host}:{args.port}/{workers}",
          flush=True)
    connections = ConnectionLimits(max_connections=args.max_connections, head_timeout=args.header_timeout)
    return serve_forever(app, args.host, args.port, log_level=args.log_level, limits=connections, workers=args.workers)


def _serve_worker_threads(workers: int, device: torch.device) -> int | None:
    """The torch threads of each of ``workers`` serving processes (None: one process, the batcher's default).

    Several workers are forked from this process after it has loaded the model, so it must not have started
    torch's thread pool by then (a fork copies the pool's bookkeeping but not its threads): it runs the model's
    start-up check on one thread, and each worker sets its own share of the CPUs.
    """
    import torch

    from .runtime import available_cpus

    if workers <= 1:
        return None
    if not hasattr(os, "fork"):
        raise ConfigError("--workers above 1 needs a system with fork (Linux, macOS)")
    if device.type != "cpu":
        raise ConfigError(f"--workers above 1 serves on the CPU only (a {device.type} context does not survive "
                          "a fork); use --workers 1")
    torch.set_num_threads(1)
    return max(1, available_cpus() // workers)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", allow_abbrev=False,
                     description="Train, evaluate, inspect, export and serve CNN image classifiers.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", allow_abbrev=False, help="train (resumes from the newest checkpoint in --model-dir)",
                       description="Train a model. Any config key below can be set as --key=value on top of a "
                                   "recipe (see `cnnlab recipes`).",
                       epilog=_config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe name (see `cnnlab recipes`) or TOML file")
    p.add_argument("--model-dir", help="run directory (default runs/<recipe or model>)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write MODEL_DIR/report.html at the end")
    p.add_argument("--force", action="store_true",
                   help="train in --model-dir even if it holds files cnnlab did not write (they may be overwritten)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also log scalars for TensorBoard (default DIR: MODEL_DIR/tensorboard)")
    _add_common_data(p)
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("evaluate", allow_abbrev=False, help="accuracy and loss of a trained run")
    _add_run(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tta", default=None,  # checked by TrainedModel.tta_mode: config's modes, not imported here
                   help="test-time augmentation for this evaluation instead of the run's own (config tta), to see "
                        "what it adds: none, flip (the mirror), translate (1-pixel shifts) or flip-translate")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_checkpoint_choice(p)
    _add_common_data(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", allow_abbrev=False, help="classify image files (PNG/JPG) and folders of them")
    _add_run(p)
    p.add_argument("images", nargs="*", help="image files, or folders searched recursively (at least one)")
    p.add_argument("--format", choices=["text", "csv", "jsonl", "json"], default=None,
                   help="text (default; one line per file), csv (file,label,probability,top_k), jsonl (one JSON "
                        "object per line) or json (one JSON document, the same as --json)")
    p.add_argument("--out", help="write the output (any format, --json too) to this file instead of stdout, "
                                 "opened once the first prediction is ready; never a checkpoint, a run's records "
                                 "or one of the images")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images predicted at once")
    p.add_argument("--top-k", type=POSITIVE, default=3)
    p.add_argument("--invert", choices=["auto", "yes", "no"], default=None,
                   help="invert grayscale images (auto: when the border is light, e.g. a dark digit on paper; "
                        "default: as the run recorded, auto for MNIST-like runs, no for CIFAR-10 and folders)")
    p.add_argument("--centre", "--center", action="store_true",
                   help="grayscale: frame the digit as MNIST does (ink box scaled to 20x20, centre of mass "
                        "mid-image), for digits photographed or drawn small or off-centre")
    p.add_argument("--json", action="store_true", help="one JSON document (a list), the same as --format json")
    p.add_argument("--all-probs", action="store_true",
                   help="also every class probability, in class order, in any format: a probabilities list "
                        "(json, jsonl), a prob_CLASS column per class (csv), an 'all:' list (text)")
    _add_checkpoint_choice(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", allow_abbrev=False, help="training throughput and prediction latency of a model")
    p.add_argument("model")
    p.add_argument("--batch-size", type=POSITIVE, default=100)
    p.add_argument("--steps", type=POSITIVE, default=50)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--threads", type=NON_NEGATIVE, default=0, help="torch threads (0: default)")
    p.add_argument("--latency-n", type=POSITIVE, default=300, help="single-image calls to time")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", allow_abbrev=False, help="list models with parameter counts and input shapes")
    p.add_argument("pattern", nargs="?", default="*",
                   help="shell-style filter, e.g. 'tf-*' or 'timm:resnet*' (timm's names)")
    p.add_argument("--describe", metavar="NAME",
                   help="print layer output shapes and parameter counts of a model or 'spec:conv32k5-pool2-fc10'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", allow_abbrev=False, help="list datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("recipes", allow_abbrev=False, help="list recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("report", allow_abbrev=False, help="write a self-contained HTML report of a run",
                       description="Config, training curves, metrics, confusion matrix, mistakes, filters and "
                                   "activations of a run in one HTML file with embedded images.")
    _add_run(p)
    p.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    _add_checkpoint_choice(p)
    _add_common_data(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", allow_abbrev=False, help="write one plot of a run as PNG",
                       description="Write one plot of a run as a PNG (default RUN_DIR/plots/KIND.png). "
                                   "`layers` lists the indices --layer takes.")
    _add_run(p)
    p.add_argument("kind", help="samples, predictions, misclassified, confusion, curves, filters, activations, "
                                "augment, probs, or layers")
    p.add_argument("--out", help="output file: .png (default), .svg, .pdf or .jpg")
    p.add_argument("--layer", type=NON_NEGATIVE, default=0,
                   help="filters: conv layer index; activations: feature module index (see `layers`)")
    p.add_argument("--channel", type=NON_NEGATIVE, default=0, help="filters: input channel")
    p.add_argument("--index", type=NON_NEGATIVE, default=0, help="activations/augment/probs: example of the split")
    p.add_argument("--image", help="activations/augment/probs: an image file instead of --index")
    p.add_argument("-n", type=_number(int, 1, 25), default=16, help="images in a grid (at most 25)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    _add_common_data(p)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("export", allow_abbrev=False, help="export a trained run to ONNX (checked against onnxruntime)")
    _add_run(p, "run directory (its best checkpoint, else the newest) or checkpoint file")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default RUN_DIR/model.onnx)")
    p.add_argument("--tolerance", type=_number(float, 0), default=1e-4,
                   help="largest allowed max abs difference of logits between onnxruntime and cnnlab predict")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset of the graph, 15 to 25 (default 18, the exporter's own; 18 to 25 work for every "
                        "model, 15 to 17 only for some: otherwise a one-line error and nothing written)")
    p.add_argument("--no-tta", action="store_true",
                   help="export the single-view model; by default the graph averages the run's test-time "
                        "augmentation (config tta) as predict/evaluate/serve do")
    _add_checkpoint_choice(p)
    _add_common_data(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", allow_abbrev=False, help="serve a trained run: HTTP API and a web page to draw on")
    _add_run(p, "run directory (its best checkpoint, else the newest) or checkpoint file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--max-batch", type=POSITIVE, default=64, help="most images per forward pass")
    p.add_argument("--max-wait-ms", type=_number(float, 0), default=5.0,
                   help="how long a request waits to share a batch")
    p.add_argument("--max-upload-mb", type=_number(float, 0, above=True), default=5.0,
                   help="largest request body (413 above)")
    p.add_argument("--max-batch-images", type=POSITIVE, default=256,
                   help="most images in one JSON request (413 above)")
    p.add_argument("--max-request-pixels", type=POSITIVE, default=50_000_000,
                   help="most decoded pixels in one request, summed over its images, read from their headers "
                        "(413 above)")
    p.add_argument("--max-inflight-pixels", type=POSITIVE, default=100_000_000,
                   help="most decoded pixels (and body bytes) held by all requests at once (503 + Retry-After above)")
    p.add_argument("--max-connections", type=_number(int, 0), default=0,
                   help="open connections at most; the oldest idle one is dropped for a new one "
                        "(0: from the open-file limit)")
    p.add_argument("--header-timeout", type=_number(float, 0, above=True), default=10.0,
                   help="seconds a connection may take to send its request line and headers")
    p.add_argument("--body-timeout", type=_number(float, 0, above=True), default=30.0,
                   help="seconds a request may take to send its body (408 after)")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="server processes sharing the port, each with the model and its share of the CPUs "
                        "(CPU only); for small models, one per core serves the most requests")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_checkpoint_choice(p)
    p.set_defaults(func=cmd_serve)
    return parser


class _StderrLog(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _show_library_log() -> None:
    """Show the library's INFO messages (e.g. "downloading mnist into ...") on stderr, as ``cnnlab: ...`` lines.

    The library only logs (to the ``cnnlab`` logger); where that goes is the application's choice.
    """
    logger = logging.getLogger("cnnlab")
    if not any(isinstance(h, _StderrLog) for h in logger.handlers):  # main() may run many times in a process
        handler = _StderrLog()
        handler.setFormatter(logging.Formatter("cnnlab: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `cnnlab`: what it can do, not a usage error
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "run_dir"):
        _resolve_run(args, _subparser(parser, args.command))
    if args.command == "predict":
        _settle_predict(args, _subparser(parser, args.command))
    _show_library_log()
    # Pillow warns (three lines, with its own file path) above ~89 megapixels; cnnlab's own pixel limits are
    # lower and refuse such an image in one line, so the warning only adds noise.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 (Linux allows it) prints as its own bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    tune_allocator()  # reuse freed memory instead of page-faulting it back in each step (see runtime.py)
    try:
        return args.func(args, extra)
    except Preempted as e:  # SIGTERM (e.g. a preempted cloud machine) or Ctrl-C: the checkpoint is saved
        print(f"cnnlab: {e}", file=sys.stderr)
        return e.exit_code
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (silence the flush at exit)
        return 0
    except KeyboardInterrupt:
        print("cnnlab: interrupted (rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("CNNLAB_DEBUG"):
            raise
        print(f"cnnlab: internal error: {type(e).__name__}: {e} (set CNNLAB_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def run() -> None:
    """The console entry point (``cnnlab``, ``python -m cnnlab``): `main`, then a quick exit.

    Python's own shutdown then tears down every module torch imported, one by one, and frees their objects: about
    0.4 s after the work is done, on every command (docs/speed.md). Once no other non-daemon thread is running, the
    exit handlers have run (atexit: logging, multiprocessing, ...) and the output is flushed, nothing is left to do,
    so the process ends there with ``main``'s exit code. Otherwise Python exits as usual: while another thread
    runs, and under a profiler or tracer (``python -m cProfile -m cnnlab``, pdb, trace), which writes its results
    after the script returns.
    """
    code = main()
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if watched or any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                      for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what Python's own exit runs first (private, but in CPython since 3.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to write there
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
