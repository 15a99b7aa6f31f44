"""Render times of the Invariance tab on a large log, in headless Chromium against a real TensorBoard.

    python benchmarks/large_log.py benchmarks/.work/large_log      # once (see bench_plugin.py)
    python benchmarks/bench_frontend.py benchmarks/.work/large_log  # ~5 min after TensorBoard has loaded

TensorBoard (default Rust data server) serves the log; Debian's Chromium opens the tab (4 runs selected, as
the tab does by default, then all 20). Recorded, each as the median of ``--repeats``:

- time to first heatmap: from the plugin iframe's navigation start to the moment every selected run's
  heatmap is drawn (``performance.now()`` in the iframe), and from ``page.goto`` of TensorBoard (wall
  clock, includes loading TensorBoard's own app);
- slider redraw, measured in the page from the slider's ``input`` event to the moment every heatmap shows
  the new step: to a step whose units are already cached (pure redraw), and to a new step (fetch + draw).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from provenance import save_results, source_version  # noqa: E402
from tensorboard_process import TensorBoard  # noqa: E402

BASE = "/data/plugin/tm_invariance"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

ALL_DRAWN = """(count) => {
    const canvases = [...document.querySelectorAll("canvas.tm-heatmap")].filter((c) => !c.hidden);
    return canvases.length === count && canvases.every((c) => c.dataset.step && !c.closest(".tm-stale"))
        ? performance.now() : false;
}"""

# Moves the slider to index `target` and resolves with the milliseconds until every heatmap shows `step`.
MOVE_SLIDER = """async ([target, step, count]) => {
    const slider = document.getElementById("tm-step");
    const done = () => {
        const canvases = [...document.querySelectorAll("canvas.tm-heatmap")].filter((c) => !c.hidden);
        return canvases.length === count && canvases.every((c) => c.dataset.step === String(step)
                                                                   && !c.closest(".tm-stale"));
    };
    const start = performance.now();
    const finished = new Promise((resolve) => {
        const observer = new MutationObserver(() => {
            if (done()) { observer.disconnect(); resolve(performance.now() - start); }
        });
        observer.observe(document.body, {attributes: true, subtree: true, childList: true});
    });
    slider.value = String(target);
    slider.dispatchEvent(new Event("input", {bubbles: true}));
    return finished;
}"""


def open_tab(page, tb, count: int) -> tuple[float, float]:
    """(ms from the iframe's navigation start, ms of wall clock from goto) until `count` heatmaps are drawn."""
    start = time.perf_counter()
    page.goto(f"{tb.url}/#tm_invariance")
    frame = page.wait_for_selector("iframe", timeout=120000).content_frame()
    drawn = frame.wait_for_function(ALL_DRAWN, arg=count, timeout=120000, polling="raf").json_value()
    return drawn, 1000 * (time.perf_counter() - start)


def select(frame, count: int) -> None:
    toggles = frame.locator("input.tm-run-toggle").all()
    for i, toggle in enumerate(toggles):
        if toggle.is_checked() != (i < count):
            toggle.click()
    frame.wait_for_function(ALL_DRAWN, arg=count, timeout=300000, polling="raf")


def slider_times(frame, count: int, moves: int) -> dict[str, list[float]]:
    """Slider moves timed in the page. The large log has a snapshot at every step 0..max, so the slider's
    index is the step. Each round moves to a step not shown before (units fetched), then back and forth
    between two shown steps (units cached)."""
    maximum = int(frame.evaluate("() => document.getElementById('tm-step').max"))
    times: dict[str, list[float]] = {"new_step_ms": [], "cached_step_ms": []}
    last = maximum
    for i in range(moves):
        target = maximum - 1 - 7 * i
        times["new_step_ms"].append(frame.evaluate(MOVE_SLIDER, [target, target, count]))
        times["cached_step_ms"].append(frame.evaluate(MOVE_SLIDER, [last, last, count]))
        times["cached_step_ms"].append(frame.evaluate(MOVE_SLIDER, [target, target, count]))
        last = target
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--steps", type=int, default=1000, help="steps per run in the log")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "frontend.json"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    expected = len(list(args.logdir.iterdir()))
    figures: dict = {"commit": source_version(), "load_average_before": os.getloadavg()}
    with TensorBoard(args.logdir, "--reload_interval=0", timeout=600) as tb, sync_playwright() as playwright:
        tb.wait_for(f"{BASE}/runs", lambda p: len(p["runs"]) == expected
                    and all(r["max_step"] == args.steps - 1 for r in p["runs"]), timeout=3600)
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        for count in (4, expected):
            first_iframe, first_wall, slider = [], [], {"new_step_ms": [], "cached_step_ms": []}
            for _ in range(args.repeats):
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                if count == 4:
                    iframe_ms, wall_ms = open_tab(page, tb, count)
                else:
                    _, _ = open_tab(page, tb, 4)
                    frame = next(f for f in page.frames if "plugin_entry.html" in f.url)
                    start = time.perf_counter()
                    select(frame, count)
                    iframe_ms, wall_ms = float("nan"), 1000 * (time.perf_counter() - start)
                first_iframe.append(iframe_ms)
                first_wall.append(wall_ms)
                frame = next(f for f in page.frames if "plugin_entry.html" in f.url)
                for key, values in slider_times(frame, count, moves=3).items():
                    slider[key] += values
                page.close()
            figures[f"{count}_runs"] = {
                "first_heatmap_ms_from_iframe_start": statistics.median(first_iframe) if count == 4 else None,
                "first_heatmap_ms_wall" if count == 4 else "select_all_runs_ms_wall": statistics.median(first_wall),
                "slider_new_step_ms_median": statistics.median(slider["new_step_ms"]),
                "slider_new_step_ms_max": max(slider["new_step_ms"]),
                "slider_cached_step_ms_median": statistics.median(slider["cached_step_ms"]),
                "slider_cached_step_ms_max": max(slider["cached_step_ms"]),
                "raw": {"first_iframe": first_iframe, "first_wall": first_wall, **slider},
            }
        browser.close()
    figures["load_average_after"] = os.getloadavg()
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
