"""Digits drawn by hand on the served page: how many of them a run reads, per hand and per digit.

    python benchmarks/draw_digits.py                 # trains mnist-fast once (bench-out/draw), draws on its page
    python benchmarks/draw_digits.py --run runs/mnist-fast --repeats 5 --json
    python benchmarks/draw_digits.py --via predict   # no browser: the same strokes rendered, then predicted

Every hand of `cnnlab.data.hand_digits` writes the ten digits ``--repeats`` times, each time with its own seeded
jitter (a wobble along the strokes, a few degrees of rotation, a few percent of size). ``--via page`` (the
default) serves the run with `cnnlab serve`, opens its page in headless Chromium and draws every digit on the
canvas with mouse strokes (press, moves, release; the canvas cleared in between), presses Predict and reads
the label the page shows, with the page's default framing ("centre like MNIST"). ``--via predict`` renders
the same mouse paths with the page's pen (`hand_digits.render`) and predicts the images as
``cnnlab predict --centre`` does, which needs no browser. Read counts only; no time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_trained_run, hardware_line, host_info, print_table

from cnnlab.data.hand_digits import CANVAS, HANDS, canvas_paths, digit_strokes, render

Paths = list[list[tuple[int, int]]]


def drawings(repeats: int, seed: int, fill: float = 0.75) -> list[tuple[str, int, int, Paths]]:
    """(hand, repeat, digit, mouse paths) for every hand, repeat and digit, deterministic from ``seed``; each digit
    ``fill`` of the canvas high, in its middle."""
    rng = np.random.default_rng(seed)
    return [(h.name, r, d, canvas_paths(digit_strokes(d, h, rng), fill=fill))
            for h in HANDS for r in range(repeats) for d in range(10)]


def read_via_predict(run: Path, items: list[tuple[str, int, int, Paths]]) -> list[str]:
    """The labels ``cnnlab predict --centre`` gives the paths rendered with the page's pen."""
    from PIL import Image

    from cnnlab import Classifier

    images = [Image.fromarray(render(paths)) for *_, paths in items]
    return [p["label"] for p in Classifier(model_dir=run).predict(images, centre=True)]


def read_via_page(run: Path, items: list[tuple[str, int, int, Paths]]) -> list[str]:
    """The labels the served page shows after each drawing is drawn on its canvas with the mouse."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise SystemExit("draw_digits: --via page needs selenium (the 'test' extra); or use --via predict") from None
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        raise SystemExit("draw_digits: --via page needs chromium and chromedriver (make browser); "
                         "or use --via predict")
    from cnnlab.serve.server import serve_subprocess

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=options)
    try:
        with serve_subprocess(run) as url:
            driver.get(url + "/")
            return [page_read(driver, paths, count) for count, (*_, paths) in enumerate(items, start=1)]
    finally:
        driver.quit()


def page_read(driver, paths: Paths, count: int) -> str:
    """Clear, draw ``paths`` (canvas pixels from the top-left), press Predict, return the ``count``-th answer."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    auto = driver.find_element(By.ID, "auto")
    if auto.is_selected():
        auto.click()  # one answer per drawing, once every stroke is down
    driver.find_element(By.ID, "clear").click()
    canvas = driver.find_element(By.ID, "canvas")
    for path in paths:  # WebDriver offsets are from the element's centre
        actions = ActionChains(driver, duration=10)
        actions.move_to_element_with_offset(canvas, path[0][0] - CANVAS // 2, path[0][1] - CANVAS // 2)
        actions.click_and_hold()
        for x, y in path[1:]:
            actions.move_to_element_with_offset(canvas, x - CANVAS // 2, y - CANVAS // 2)
        actions.release().perform()
    driver.find_element(By.ID, "predict").click()

    def answered(d) -> bool:
        result = d.find_element(By.ID, "result")
        if result.get_attribute("data-state") == "error":
            raise SystemExit(f"draw_digits: the page answered {d.find_element(By.ID, 'status').text}")
        return result.get_attribute("data-count") == str(count)

    WebDriverWait(driver, 60, poll_frequency=0.05).until(answered)
    return driver.find_element(By.ID, "prediction").text


def tally(items: list[tuple[str, int, int, Paths]], labels: list[str]) -> dict:
    """Reads per hand and digit, misreads and the total (JSON-able)."""
    per = {h.name: [0] * 10 for h in HANDS}
    misread = []
    for (hand_name, rep, digit, _), label in zip(items, labels):
        if label == str(digit):
            per[hand_name][digit] += 1
        else:
            misread.append({"hand": hand_name, "repeat": rep, "digit": digit, "read": label})
    return {"per_hand": per, "misread": misread, "read": len(items) - len(misread), "drawn": len(items)}


def table(result: dict, repeats: int) -> list[list]:
    """One row per hand (reads of each digit out of ``repeats``, total), then the column totals."""
    rows = [[hand_name, *counts, f"{sum(counts)}/{10 * repeats}"] for hand_name, counts in result["per_hand"].items()]
    col = [sum(c[d] for c in result["per_hand"].values()) for d in range(10)]
    rows.append(["all", *col, f"{result['read']}/{result['drawn']}"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run directory (default: train --recipe under --out)")
    ap.add_argument("--recipe", default="mnist-fast", help="recipe trained when no --run is given")
    ap.add_argument("--via", choices=["page", "predict"], default="page",
                    help="draw on the served page in Chromium, or render the strokes and predict them")
    ap.add_argument("--repeats", type=int, default=1, help="jittered drawings of each digit per hand")
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    ap.add_argument("--fill", type=float, default=0.75,
                    help="height of the drawn digits as a fraction of the canvas (the pen stays 22 px wide)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/draw"))
    ap.add_argument("--data-dir", help="dataset root for training (else CNNLAB_DATA)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"draw_digits: --repeats must be >= 1, got {args.repeats}")
    if not 0.1 <= args.fill <= 1.0:
        raise SystemExit(f"draw_digits: --fill must be in [0.1, 1], got {args.fill}")
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    run = ensure_trained_run(args.run, args.out, args.recipe, ["--no-report"], recipe=args.recipe, log=sys.stderr)
    items = drawings(args.repeats, args.seed, args.fill)
    labels = (read_via_page if args.via == "page" else read_via_predict)(run, items)
    result = tally(items, labels)
    if args.json:
        print(json.dumps({"run": str(run), "via": args.via, "repeats": args.repeats, "seed": args.seed,
                          "fill": args.fill, "host": host_info(), **result}))
        return 0
    print(hardware_line())
    print(f"run {run}; drawn via {args.via}; {args.repeats} drawing(s) of each digit per hand, {args.fill:.0%} of "
          f"the canvas high, jitter seed {args.seed}")
    print_table(["hand", *map(str, range(10)), "read"], table(result, args.repeats))
    for m in result["misread"]:
        print(f"misread: {m['hand']} #{m['repeat']} digit {m['digit']} read as {m['read']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
