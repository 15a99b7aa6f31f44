"""Render times of the Invariance tab on a large log, in headless Chromium against a real TensorBoard.

    python benchmarks/large_log.py benchmarks/.work/large_log      # once (see bench_plugin.py)
    python benchmarks/bench_frontend.py benchmarks/.work/large_log  # ~5 min after TensorBoard has loaded

    python benchmarks/large_log.py benchmarks/.work/resnet50_log --model resnet50 --runs 4 --steps 200
    python benchmarks/bench_frontend.py benchmarks/.work/resnet50_log --steps 200 --repeats 3 \
        --output benchmarks/results/frontend_resnet50.json   # the tab with ResNet-50's 158 layers

TensorBoard (default Rust data server) serves the log; Debian's Chromium opens the tab (4 runs selected, as
the tab does by default, then all of the log's runs when it has more). Recorded, each as the median of
``--repeats``:

- time to first heatmap: from the plugin iframe's navigation start to the moment every selected run's
  heatmap is drawn (``performance.now()`` in the iframe), and from ``page.goto`` of TensorBoard (wall
  clock, includes loading TensorBoard's own app);
- slider redraw, measured in the page from the slider's ``input`` event to the moment every heatmap shows
  the new step: to a step whose units are already cached (pure redraw), and to a new step (fetch + draw);
- with 4 runs: a unit click until its values over all 1,000 steps are drawn for every selected run (a new
  unit each time: fetched), and switching the difference view to each run as the reference (computed
  anew) and on again (cached), until the change handler returned (the tab redraws in it) and until the
  next frame.
Targets (issue 14): first heatmap < 1 s of the tab's own time, a cached slider move < 50 ms, a unit click
< 200 ms, the difference view < 100 ms. The layers (names, units) are read from the log (``/runs``), so
any log of ``large_log.py`` works, such as ``--model resnet50``'s (issue 18: the same targets hold with
a 150-layer run).
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


# Clicks unit `unit` of layer column `column` in run `run`'s heatmap and resolves with the milliseconds until the
# "Unit during training" chart shows that unit for every selected run (fetched over all steps, then drawn).
# (A column has more units than pixels: the unit under the cell's centre may be a neighbour of `unit`.)
CLICK_UNIT = """async ([run, column, unit, name, count]) => {
    const canvas = document.querySelector(`canvas.tm-heatmap[data-run="${run}"]`);
    const {x, y} = canvas.cellCenter(column, unit);
    const rect = canvas.getBoundingClientRect();
    const title = () => document.querySelector(".tm-unit-history-name");
    const before = title() ? title().textContent : "";
    const done = () => {
        const shown = title() ? title().textContent : "";
        return shown !== before && shown.startsWith(`layer ${name}, unit `)
            && document.querySelectorAll("#tm-unit-history-chart path.tm-unit-line").length === count;
    };
    const start = performance.now();
    canvas.dispatchEvent(new MouseEvent("click", {clientX: rect.left + x, clientY: rect.top + y, bubbles: true}));
    return new Promise((resolve) => {
        const check = () => (done() ? resolve(performance.now() - start) : requestAnimationFrame(check));
        check();
    });
}"""

# Sets the difference view's reference run (`key`, "" for none) and resolves with [ms until the change handler
# returned (the tab redraws in it), ms until the next frame was painted].
TOGGLE_DIFFERENCE = """async (key) => {
    const select = document.getElementById("tm-reference");
    const start = performance.now();
    select.value = key;
    select.dispatchEvent(new Event("change"));
    const drawn = performance.now() - start;
    await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
    return [drawn, performance.now() - start];
}"""


def linked_view_times(frame, count: int, clicks: int, layers: list[dict]) -> dict[str, list[float]]:
    """Unit clicks (a different unit each time: its values over every step fetched for each selected run)
    and difference-view switches (to each selected run as the reference: differences computed anew; off and
    on again: cached), timed in the page. ``layers``: the runs' layers in network order, as ``/runs`` lists
    them."""
    runs = frame.evaluate("() => [...document.querySelectorAll('canvas.tm-heatmap')].filter((c) => !c.hidden)"
                          ".map((c) => c.dataset.run)")
    times: dict[str, list[float]] = {"unit_click_ms": [], "difference_on_ms": [], "difference_again_ms": [],
                                     "difference_next_frame_ms": []}
    for i in range(clicks):
        column = 5 + 7 * i
        unit, name = (10 + 37 * i) % layers[column]["num_units"], layers[column]["name"]
        times["unit_click_ms"].append(frame.evaluate(CLICK_UNIT, [runs[i % len(runs)], column, unit, name, count]))
    keys = frame.evaluate("() => [...document.getElementById('tm-reference').options].map((o) => o.value)"
                          ".filter((v) => v)")
    for key in keys:
        drawn, painted = frame.evaluate(TOGGLE_DIFFERENCE, key)
        times["difference_on_ms"].append(drawn)
        times["difference_next_frame_ms"].append(painted)
        frame.evaluate(TOGGLE_DIFFERENCE, "")
        times["difference_again_ms"].append(frame.evaluate(TOGGLE_DIFFERENCE, key)[0])
        frame.evaluate(TOGGLE_DIFFERENCE, "")
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
    first = min(4, expected)  # the runs the tab selects when it opens
    figures: dict = {"commit": source_version(), "load_average_before": os.getloadavg()}
    with TensorBoard(args.logdir, "--reload_interval=0", timeout=600) as tb, sync_playwright() as playwright:
        tb.wait_for(f"{BASE}/runs", lambda p: len(p["runs"]) == expected
                    and all(r["max_step"] == args.steps - 1 for r in p["runs"]), timeout=3600)
        layers = tb.json(f"{BASE}/runs")["runs"][0]["layers"]
        figures["log"] = {"runs": expected, "steps": args.steps, "layers": len(layers),
                          "units": sum(layer["num_units"] for layer in layers)}
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        for count in sorted({first, expected}):
            first_iframe, first_wall, slider = [], [], {"new_step_ms": [], "cached_step_ms": []}
            linked: dict[str, list[float]] = {"unit_click_ms": [], "difference_on_ms": [], "difference_again_ms": [],
                                              "difference_next_frame_ms": []}
            for _ in range(args.repeats):
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                if count == first:
                    iframe_ms, wall_ms = open_tab(page, tb, count)
                else:
                    _, _ = open_tab(page, tb, first)
                    frame = next(f for f in page.frames if "plugin_entry.html" in f.url)
                    start = time.perf_counter()
                    select(frame, count)
                    iframe_ms, wall_ms = float("nan"), 1000 * (time.perf_counter() - start)
                first_iframe.append(iframe_ms)
                first_wall.append(wall_ms)
                frame = next(f for f in page.frames if "plugin_entry.html" in f.url)
                for key, values in slider_times(frame, count, moves=3).items():
                    slider[key] += values
                if count == first:
                    for key, values in linked_view_times(frame, count, clicks=3, layers=layers).items():
                        linked[key] += values
                page.close()
            figures[f"{count}_runs"] = {
                "first_heatmap_ms_from_iframe_start": statistics.median(first_iframe) if count == first else None,
                "first_heatmap_ms_wall" if count == first else "select_all_runs_ms_wall": statistics.median(first_wall),
                "slider_new_step_ms_median": statistics.median(slider["new_step_ms"]),
                "slider_new_step_ms_max": max(slider["new_step_ms"]),
                "slider_cached_step_ms_median": statistics.median(slider["cached_step_ms"]),
                "slider_cached_step_ms_max": max(slider["cached_step_ms"]),
                **{f"{key}_median": statistics.median(values) for key, values in linked.items() if values},
                **{f"{key}_max": max(values) for key, values in linked.items() if values},
                "raw": {"first_iframe": first_iframe, "first_wall": first_wall, **slider, **linked},
            }
        browser.close()
    figures["load_average_after"] = os.getloadavg()
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
