"""The Invariance tab in a real browser: Debian's Chromium, driven by playwright, on a real TensorBoard serving
logs written by the SDK. Screenshots of the main views go to test-artifacts/ (git-ignored)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from logwriter import write_run
from tensorboard_process import TensorBoard

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BASE = "/data/plugin/tm_invariance"
XSS = "<img src=x onerror=alert(1)>"
STEPS = [0, 10, 20]
TIMEOUT_MS = 60000
COLOR_TOLERANCE = 2
TENSORBOARD_FONTS = "/font-roboto/"

# Outside CI a machine without Chromium skips these tests; in CI (.ci/run installs it) they must run.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="needs Debian's Chromium: apt-get install -y chromium"
)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "logs"
    records = {
        "baseline": write_run(root / "baseline", STEPS, dead_channel=True),
        "augmented": write_run(root / "augmented", STEPS, seed=1),
        XSS: write_run(root / XSS, [0, 10], seed=2, measures=("invariance",)),
    }
    write_run(root / "live", [0], seed=3)
    return root, records


@pytest.fixture(scope="module")
def tensorboard(logs):
    root, _ = logs
    with TensorBoard(root, "--reload_interval=1") as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {e["run"] for e in p["runs"]} == {"baseline", "augmented", XSS, "live"}
                    and all(e["max_step"] is not None for e in p["runs"]))
        yield tb


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page whose console errors, page errors (iframe included) and dialogs fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems = []

    def on_console(message):
        # TensorBoard 2.21 itself fetches its fonts from the server root, which 404s under --path_prefix
        if message.type == "error" and TENSORBOARD_FONTS not in message.location.get("url", ""):
            problems.append(f"console: {message.text} ({message.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_dialog(dialog):
        problems.append(f"dialog: {dialog.type} {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    yield page
    context.close()
    assert not problems, problems


def open_tab(page, tb):
    """Opens TensorBoard on the Invariance tab; returns the plugin's iframe once it lists the runs (or shows
    the empty state)."""
    page.goto(f"{tb.url}/#tm_invariance")
    frame = page.wait_for_selector("iframe").content_frame()
    frame.wait_for_selector("#tm-runs input, #tm-empty", state="attached")
    assert "plugin_entry.html?name=tm_invariance" in frame.url
    return frame


def select_runs(frame, runs):
    """Checks exactly the given runs in the tab's run selector."""
    for toggle in frame.locator("input.tm-run-toggle").all():
        want = toggle.get_attribute("data-run") in runs
        if toggle.is_checked() != want:
            toggle.click()


def wait_for_heatmaps(frame, expected):
    """Waits until exactly the nvi heatmaps {run: step} are drawn and up to date (step None: any step)."""
    frame.wait_for_function(
        """(expected) => {
            const canvases = [...document.querySelectorAll("canvas.tm-heatmap")].filter((c) => !c.hidden);
            return canvases.length === Object.keys(expected).length
                && canvases.every((c) => c.dataset.run in expected && c.dataset.step !== undefined
                                   && [null, Number(c.dataset.step)].includes(expected[c.dataset.run])
                                   && c.dataset.measure === "nvi" && !c.closest(".tm-stale"));
        }""",
        arg=expected,
    )


def units(tb, run, step):
    return tb.json(f"{BASE}/units?run={quote(run, safe='')}&namespace=invariance&measure=nvi&step={step}")


def sampled_colors(frame, run, cells):
    """[(pixel, expected)] for cells [layer, unit, value, dead] of the run's heatmap: the pixel at the cell's
    center and colorFor(value) on the heatmap's scale, both computed in the page."""
    return frame.evaluate(
        """async ({run, cells}) => {
            const {colorFor} = await import(new URL("static/colors.js", document.baseURI).href);
            const canvas = [...document.querySelectorAll("canvas.tm-heatmap")].find((c) => c.dataset.run === run);
            const context = canvas.getContext("2d");
            const rx = canvas.width / canvas.clientWidth;
            const ry = canvas.height / canvas.clientHeight;
            const scale = {min: Number(canvas.dataset.min), max: Number(canvas.dataset.max)};
            return cells.map(([layer, unit, value, dead]) => {
                const {x, y} = canvas.cellCenter(layer, unit);
                const pixel = context.getImageData(Math.floor(x * rx), Math.floor(y * ry), 1, 1).data;
                return [[pixel[0], pixel[1], pixel[2]], colorFor(value, {...scale, dead})];
            });
        }""",
        {"run": run, "cells": cells},
    )


def check_heatmap_matches_log(frame, tb, records, run, step):
    """Every cell of the run's heatmap has the color of the value the SDK logged for that unit."""
    layers = units(tb, run, step)["layers"]
    result = records[run][step]
    cells = []
    for column, layer in enumerate(layers):
        logged = result.get("nvi", layer["name"])
        cells += [[column, u, float(v), u in layer["dead"]] for u, v in enumerate(logged)]
    colors = sampled_colors(frame, run, cells)
    for (column, unit, value, dead), (pixel, expected) in zip(cells, colors):
        assert all(abs(p - e) <= COLOR_TOLERANCE for p, e in zip(pixel, expected)), (
            run, step, layers[column]["name"], unit, value, dead, pixel, expected)
    return cells, colors


def test_tab_loads_without_console_errors(page, tensorboard):
    frame = open_tab(page, tensorboard)
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20, XSS: 10, "live": None})
    # the stylesheet was loaded from static/ under TensorBoard's CSP
    assert frame.evaluate("getComputedStyle(document.getElementById('tm-toolbar')).position") == "sticky"
    assert frame.locator("#tm-measure").input_value() == "nvi"
    assert frame.locator("#tm-step-value").inner_text() == "step 20 (latest)"
    assert frame.locator("#tm-units-legend .tm-legend-swatch").count() == 3  # +inf, NaN, dead
    special = frame.evaluate("""async () => {
        const {colorFor} = await import(new URL("static/colors.js", document.baseURI).href);
        const scale = {min: 0, max: 1};
        const ramp = Array.from({length: 101}, (_, i) => colorFor(i / 100, scale).join());
        const special = [colorFor(Infinity, scale), colorFor(NaN, scale), colorFor(0.5, {...scale, dead: true})].map(String);
        return {distinct: new Set(special).size === 3, offRamp: special.every((c) => !ramp.includes(c))};
    }""")
    assert special == {"distinct": True, "offRamp": True}
    frame.wait_for_selector("#tm-config dl")
    page.screenshot(path=str(ARTIFACTS / "overview.png"))


def test_two_runs_side_by_side_with_the_logged_colors(page, tensorboard, logs):
    _, records = logs
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
    first, second = sorted((frame.locator(f"canvas.tm-heatmap[data-run={run}]").bounding_box() for run in ("baseline", "augmented")),
                           key=lambda box: box["x"])
    assert abs(first["y"] - second["y"]) < 1 and second["x"] >= first["x"] + first["width"]  # side by side
    sampled = {run: check_heatmap_matches_log(frame, tensorboard, records, run, 20) for run in ("baseline", "augmented")}
    for cells, colors in sampled.values():
        assert len({tuple(pixel) for pixel, _ in colors}) > 5  # real variation, not a flat fill
    cells, colors = sampled["baseline"]
    dead = [pixel for cell, (pixel, _) in zip(cells, colors) if cell[3]]
    dead_color = frame.evaluate("""async () => (await import(new URL("static/colors.js", document.baseURI).href)).SPECIAL_COLORS.dead""")
    assert dead and all(pixel == dead_color for pixel in dead)  # the dead ReLU channel has the dead color
    page.screenshot(path=str(ARTIFACTS / "two-runs.png"))


def test_layer_profile_has_one_line_per_selected_run(page, tensorboard, logs):
    _, records = logs
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
    lines = frame.locator("#tm-profile path.tm-line")
    lines.nth(1).wait_for()
    assert sorted(lines.evaluate_all("(paths) => paths.map((p) => p.dataset.run)")) == ["augmented", "baseline"]
    layers = len(records["baseline"][20].layer_means("nvi"))
    for d in lines.evaluate_all("(paths) => paths.map((p) => p.getAttribute('d'))"):
        assert d.count("M") + d.count("L") == layers
    select_runs(frame, {"baseline", "augmented", XSS})
    frame.wait_for_function("document.querySelectorAll('#tm-profile path.tm-line').length === 3")
    frame.locator("input[name=tm-x-axis][value=depth]").check()
    frame.wait_for_selector("#tm-profile text:text-is('100%')")
    assert frame.locator("#tm-profile path.tm-line").count() == 3
    frame.locator("#tm-profile-section").screenshot(path=str(ARTIFACTS / "layer-profile.png"))


def test_step_slider_shows_that_steps_units(page, tensorboard, logs):
    _, records = logs
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
    slider = frame.locator("#tm-step")
    slider.focus()
    slider.press("Home")
    wait_for_heatmaps(frame, {"baseline": 0, "augmented": 0})
    assert frame.locator("#tm-step-value").inner_text() == "step 0"
    for run in ("baseline", "augmented"):
        check_heatmap_matches_log(frame, tensorboard, records, run, 0)
    slider.press("ArrowRight")
    wait_for_heatmaps(frame, {"baseline": 10, "augmented": 10})
    check_heatmap_matches_log(frame, tensorboard, records, "augmented", 10)
    frame.wait_for_selector("#tm-profile-section .tm-heading-note:text-is('mean nvi per layer \u00b7 step 10')")
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "step-10.png"))
    slider.press("End")
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
    assert frame.locator("#tm-step-value").inner_text() == "step 20 (latest)"


def test_hovering_a_cell_shows_layer_unit_and_value(page, tensorboard, logs):
    _, records = logs
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
    layers = units(tensorboard, "augmented", 20)["layers"]
    column, unit = 3, 5
    name = layers[column]["name"]
    logged = float(records["augmented"][20].get("nvi", name)[unit])
    canvas = frame.locator("canvas.tm-heatmap[data-run=augmented]")
    center = canvas.evaluate(f"(c) => c.cellCenter({column}, {unit})")
    canvas.hover(position=center)
    tooltip = frame.locator("#tm-tooltip")
    tooltip.wait_for(state="visible")
    text = tooltip.inner_text()
    assert "augmented" in text and f"layer {name} ({layers[column]['module_type']})" in text
    assert f"unit {unit} of {layers[column]['num_units']}" in text and "step 20" in text
    assert tooltip.get_attribute("data-layer") == name and tooltip.get_attribute("data-unit") == str(unit)
    assert math.isclose(float(tooltip.get_attribute("data-value")), logged, rel_tol=1e-6)
    page.screenshot(path=str(ARTIFACTS / "tooltip.png"))
    frame.locator("#tm-units h3").hover()
    tooltip.wait_for(state="hidden")


def test_hostile_run_name_is_shown_as_text(page, tensorboard):
    frame = open_tab(page, tensorboard)
    select_runs(frame, {XSS})
    wait_for_heatmaps(frame, {XSS: 10})
    assert frame.locator("#tm-runs .tm-run-name").filter(has_text=XSS).count() == 1
    assert frame.locator("#tm-heatmaps .tm-run-name").inner_text() == XSS
    canvas = frame.locator("canvas.tm-heatmap").first
    canvas.hover(position=canvas.evaluate("(c) => c.cellCenter(0, 0)"))
    assert frame.locator("#tm-tooltip .tm-tooltip-title").inner_text() == XSS
    frame.wait_for_selector("#tm-config dl")
    # nothing anywhere in the tab was parsed from the name as HTML
    assert frame.evaluate("document.querySelectorAll('img, [onerror]').length") == 0
    assert XSS in frame.evaluate("document.body.textContent")
    page.screenshot(path=str(ARTIFACTS / "hostile-run-name.png"))


def test_dark_mode_follows_tensorboard(page, tensorboard):
    frame = open_tab(page, tensorboard)
    wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20, XSS: 10, "live": None})
    light = frame.evaluate("getComputedStyle(document.body).color")
    assert frame.evaluate("getComputedStyle(document.body).backgroundColor") == "rgba(0, 0, 0, 0)"
    page.click("button[aria-label='Menu for changing light or dark theme']")
    page.click("[title='Force dark TensorBoard theme.']")
    frame.wait_for_function("document.body.classList.contains('tm-dark')")
    page.keyboard.press("Escape")
    assert frame.evaluate("getComputedStyle(document.body).color") != light
    # TensorBoard keeps a white container behind plugin iframes, so the tab paints its own dark background
    assert frame.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(48, 48, 48)"
    page.screenshot(path=str(ARTIFACTS / "dark-mode.png"))


def test_tensorboard_reload_brings_new_steps(page, tensorboard, logs):
    root, _ = logs
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"live"})
    wait_for_heatmaps(frame, {"live": 0})
    write_run(root / "live", [7], seed=3)
    tensorboard.wait_for(f"{BASE}/runs", lambda p: any(e["run"] == "live" and e["max_step"] == 7 for e in p["runs"]))
    page.click("button.reload-button")
    wait_for_heatmaps(frame, {"live": 7})
    assert frame.locator("#tm-step-value").inner_text() == "step 7 (latest)"


def test_works_behind_a_path_prefix(page, logs):
    root, _ = logs
    with TensorBoard(root, "--path_prefix=/tb/sub") as tb:
        assert tb.url.endswith("/tb/sub")
        tb.wait_for(f"{BASE}/runs", lambda p: len(p["runs"]) == 4)
        frame = open_tab(page, tb)
        select_runs(frame, {"baseline", "augmented"})
        wait_for_heatmaps(frame, {"baseline": 20, "augmented": 20})
        frame.wait_for_selector("#tm-accuracy path.tm-line")


def test_empty_logdir_shows_how_to_start(page, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with TensorBoard(empty) as tb:
        frame = open_tab(page, tb)
        box = frame.locator("#tm-empty")
        box.wait_for()
        text = box.inner_text()
        assert 'monitor = tm_tensorboard.Monitor(model, probe, tm_tensorboard.transforms.rotations(16), logdir="runs/rotated")' in text
        assert "monitor.step(global_step)" in text
        assert frame.locator("#tm-heatmaps").is_hidden()
        page.screenshot(path=str(ARTIFACTS / "empty-state.png"))


def test_toggling_a_run_keeps_the_other_runs_charts(page, tmp_path):
    """Selecting or deselecting a run draws only that run's curves and layer x step heatmap: the other runs'
    canvases stay the same elements (redrawing every run at every toggle froze the tab with 20 runs). The
    runs hold identical values, so the shared axes and color scale cannot change; 3 and 4 charts per row
    have the same width at this viewport."""
    names = ["a", "b", "c", "d"]
    for name in names:
        write_run(tmp_path / name, STEPS, seed=5)
    with TensorBoard(tmp_path) as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: len(p["runs"]) == 4 and all(e["max_step"] == 20 for e in p["runs"]))
        frame = open_tab(page, tb)
        charts = "#tm-curves canvas, #tm-training canvas"

        def mark_and_count():
            return frame.evaluate(f"""() => {{
                const canvases = [...document.querySelectorAll("{charts}")];
                const kept = canvases.filter((c) => c.tmMarked).length;
                canvases.forEach((c) => {{ c.tmMarked = true; }});
                return [canvases.length, kept];
            }}""")

        select_runs(frame, set(names))
        wait_for_heatmaps(frame, dict.fromkeys(names, 20))
        frame.wait_for_function(f"document.querySelectorAll('{charts}').length === 8")
        assert mark_and_count() == [8, 0]
        select_runs(frame, {"a", "b", "c"})
        wait_for_heatmaps(frame, dict.fromkeys("abc", 20))
        frame.wait_for_function(f"document.querySelectorAll('{charts}').length === 6")
        assert mark_and_count() == [6, 6]  # a, b, c were not redrawn
        select_runs(frame, set(names))
        wait_for_heatmaps(frame, dict.fromkeys(names, 20))
        frame.wait_for_function(f"document.querySelectorAll('{charts}').length === 8")
        assert mark_and_count() == [8, 6]  # only d was drawn
