"""The ``cnnlab`` command line. Thin: parses arguments, calls the library, prints results.

Every expected failure (bad input, missing data, bad config) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CnnlabError


def _add_common_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="first place to look for dataset files (then $CNNLAB_DATA, ~/.cache/cnnlab)")


def cmd_train(args, extra: list[str]) -> int:
    from .config import parse_overrides, resolve_config
    from .train.loop import fit

    config = resolve_config(args.recipe, parse_overrides(extra))
    model_dir = Path(args.model_dir or Path("runs") / (args.recipe or config.model))
    print(f"cnnlab train: {args.recipe or 'no recipe'} -> {model_dir}")
    print(config.to_json())
    result = fit(config, model_dir, data_dir=args.data_dir, progress=args.progress)
    print(f"done: step {result.step}, test accuracy {result.test.accuracy:.4f}, loss {result.test.loss:.4f}, "
          f"{result.seconds:.1f} s; model in {model_dir}")
    return 0


def cmd_evaluate(args, extra: list[str]) -> int:
    from .train.classifier import Classifier

    clf = Classifier(model_dir=args.run_dir, data_dir=args.data_dir)
    res = clf.evaluate(args.split)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.run_dir} step {res['step']}: {args.split} accuracy {res['accuracy']:.4f}  "
              f"loss {res['loss']:.4f}  ({res['n']} images)")
    return 0


def cmd_predict(args, extra: list[str]) -> int:
    from .train.classifier import Classifier

    clf = Classifier(model_dir=args.run_dir)
    preds = clf.predict(args.images, top_k=args.top_k, invert=args.invert)
    for path, p in zip(args.images, preds):
        p["file"] = str(path)
    if args.json:
        print(json.dumps([{k: v for k, v in p.items() if k != "probabilities" or args.all_probs} for p in preds], indent=2))
    else:
        for p in preds:
            top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top_k"])
            print(f"{p['file']}: {p['label']} ({p['probability']:.3f})   top-{len(p['top_k'])}: {top}")
    return 0


def cmd_models(args, extra: list[str]) -> int:
    from .models import count_params, create_model, list_models, model_entry

    names = list_models(args.pattern)
    if not names:
        raise CnnlabError(f"no model matches {args.pattern!r}")
    rows = []
    for n in names:
        m = create_model(n)
        rows.append((n, f"{count_params(m):,}", "x".join(map(str, m.meta.input_size)), model_entry(n).description))
    w = [max(len(r[i]) for r in rows + [("model", "params", "input", "")]) for i in range(3)]
    print(f"{'model':<{w[0]}}  {'params':>{w[1]}}  {'input':<{w[2]}}  layers")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    return 0


def cmd_datasets(args, extra: list[str]) -> int:
    from .data import dataset_info, list_datasets

    for name in list_datasets():
        info = dataset_info(name)
        print(f"{name:<14} {info.num_classes:>3} classes  {'x'.join(map(str, info.shape)):<8}  "
              f"{', '.join(info.class_names[:10])}")
    return 0


def cmd_recipes(args, extra: list[str]) -> int:
    from .config import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<30} {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnlab", allow_abbrev=False,
                                     description="Train, evaluate, inspect, export and serve CNN image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", allow_abbrev=False, help="train (resumes from the newest checkpoint in --model-dir)",
                       description="Train a model. Any config key can be set as --key=value (see `cnnlab recipes`).")
    p.add_argument("--recipe", help="recipe name (see `cnnlab recipes`) or TOML file")
    p.add_argument("--model-dir", help="run directory (default runs/<recipe or model>)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    _add_common_data(p)
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("evaluate", allow_abbrev=False, help="accuracy and loss of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common_data(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", allow_abbrev=False, help="classify image files (PNG/JPG)")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert grayscale images (auto: when the border is light, e.g. a dark digit on paper)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all-probs", action="store_true", help="with --json: include every class probability")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", allow_abbrev=False, help="list models with parameter counts and input shapes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'tf-*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", allow_abbrev=False, help="list datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("recipes", allow_abbrev=False, help="list recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnlab: interrupted (rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("CNNLAB_DEBUG"):
            raise
        print(f"cnnlab: internal error: {type(e).__name__}: {e} (set CNNLAB_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
