"""The Invariance tab's comparison and linked views in a real browser (Debian's Chromium driven by playwright,
a real TensorBoard serving logs written by the SDK): the layer profile's spread and dead units, the
difference view, a unit during training, steps chosen by clicking charts, layers highlighted across views,
TensorBoard's smoothing, log axis and run colors, and accuracy during training. The modules' functions are
also checked on their own, imported into the tab's page."""
from __future__ import annotations

import base64
import json
import re
import zipfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import tensorboard

from logwriter import write_run
from models import rot90_equivariant_cnn
from tensorboard_process import TensorBoard
from test_browser import ARTIFACTS, BASE, XSS, browser, open_tab, page, pytestmark, select_runs  # noqa: F401 (fixtures)
from tm_tensorboard import measures

STEPS = [0, 10, 20]
COLOR_TOLERANCE = 2
TENSORBOARD_BUNDLE = Path(tensorboard.__file__).parent / "webfiles.zip"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("views") / "logs"
    records = {
        "baseline": write_run(root / "baseline", STEPS, dead_channel=True),
        "augmented": write_run(root / "augmented", STEPS, seed=1),
        "equivariant": write_run(root / "equivariant", STEPS, seed=2, model=rot90_equivariant_cnn(), measures=("invariance",)),  # other layers
        XSS: write_run(root / XSS, [0, 10], seed=3, measures=("invariance",)),
    }
    return root, records


@pytest.fixture(scope="module")
def tensorboard_views(logs):
    root, _ = logs
    with TensorBoard(root) as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {e["run"]: e["max_step"] for e in p["runs"]}
                    == {"baseline": 20, "augmented": 20, "equivariant": 20, XSS: 10})
        yield tb


def floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def units(tb, run: str, step: int, measure: str = "nvi") -> dict:
    return tb.json(f"{BASE}/units?run={quote(run, safe='')}&namespace=invariance&measure={measure}&step={step}")


def run_key(run: str) -> str:
    return json.dumps([run, "invariance"], separators=(",", ":"))


def module(frame, name: str, expression: str, arg=None):
    """Evaluates `expression` (a function body using `m`, the tab's module `name`, and `arg`) in the page."""
    return frame.evaluate(
        f"""async (arg) => {{
            const m = await import(new URL("static/{name}", document.baseURI).href);
            {expression}
        }}""",
        arg,
    )


def wait_for_runs(frame, expected: dict, measure: str = "nvi") -> None:
    """Waits until the heatmaps of exactly the runs {run: step} are drawn and up to date; a run with step
    None: it shows a message instead of a heatmap (the difference view's reference, another architecture)."""
    frame.wait_for_function(
        """([expected, measure]) => {
            const figures = [...document.querySelectorAll("#tm-heatmaps figure")];
            if (figures.length !== Object.keys(expected).length) return false;
            return figures.every((figure) => {
                const canvas = figure.querySelector("canvas.tm-heatmap");
                const name = figure.querySelector(".tm-run-name").textContent;
                if (!(name in expected)) return false;
                if (expected[name] === null) return canvas.hidden && figure.querySelector(".tm-message").textContent !== "";
                return !canvas.hidden && Number(canvas.dataset.step) === expected[name] && canvas.dataset.measure.startsWith(measure)
                    && !figure.classList.contains("tm-stale");
            });
        }""",
        arg=[expected, measure],
    )


def set_reference(frame, run: str | None) -> None:
    frame.locator("#tm-reference").select_option(value=run_key(run) if run else "")


def tick_scale(frame, selector: str):
    """The linear value -> pixel map of a chart's y axis, read from its tick labels: (value -> y)."""
    ticks = frame.evaluate(
        """(selector) => [...document.querySelector(selector).querySelectorAll("text.tm-tick[text-anchor=end]")]
            .filter((t) => t.getAttribute("y") !== null).map((t) => [t.textContent, Number(t.getAttribute("y"))])""",
        selector,
    )
    values = np.array([float(label) for label, _ in ticks])
    pixels = np.array([y for _, y in ticks])
    slope, intercept = np.polyfit(values, pixels, 1)
    return lambda v: slope * v + intercept


def tooltip_of(frame, locator) -> str:
    locator.hover(force=True)
    tooltip = frame.locator("#tm-tooltip")
    tooltip.wait_for(state="visible")
    return tooltip.inner_text()


# -- the modules on their own ----------------------------------------------------------------------------------


def test_measures_are_never_negative_so_value_axes_start_at_0(page, tensorboard_views):
    """Every measure the SDK defines is built from components that cannot be negative (stds, mean squares,
    variances, firing rates, F statistics, rejections), so the tab's value axes start at 0. A new component
    or measure must be classified: a signed one belongs in axes.js's SIGNED_MEASURES."""
    non_negative = {"tv", "sv", "mse", "mse_t", "var2", "lsq", "local", "global", "f", "reject"}
    components = {c for spec in measures.SPECS.values() for c in spec.components}
    assert components <= non_negative, components - non_negative
    frame = open_tab(page, tensorboard_views)
    signed = module(frame, "axes.js", "return arg.filter((name) => m.canBeNegative(name));", sorted(measures.SPECS))
    assert signed == []
    axes = module(frame, "axes.js", """
        const axis = (arrays, options) => {
            const {scale, ticks, kind} = m.valueAxis(arrays, {measure: "nvi", bottom: 200, top: 0, ...options});
            return {domain: scale.domain, ticks: ticks.map(([v]) => v), kind};
        };
        return {
            flat: axis([[0.42, 0.42, 0.42]]), low: axis([[0.001, 0.002]]), zero: axis([[0, 0]]),
            difference: axis([[-0.3, 0.1]], {difference: true}), log: axis([[0.002, 0.5, 0, NaN]], {log: true}),
        };
    """)
    for name in ("flat", "low", "zero"):  # today's axis could start at -0.5 for a flat line
        assert axes[name]["domain"][0] == 0 and axes[name]["kind"] == "zero" and min(axes[name]["ticks"]) == 0, axes[name]
    assert axes["flat"]["domain"][1] >= 0.42 and axes["low"]["domain"][1] >= 0.002
    low, high = axes["difference"]["domain"]
    assert low == -high and high >= 0.3 and axes["difference"]["kind"] == "difference"
    assert axes["log"]["kind"] == "log" and axes["log"]["domain"] == [0.001, 1]
    assert all(np.isclose(t / 10 ** np.floor(np.log10(t) + 1e-9), [1, 2, 5]).any() for t in axes["log"]["ticks"]), axes["log"]["ticks"]


def tensorboard_source(pattern: str) -> re.Match:
    """A match of `pattern` in TensorBoard's own frontend bundle (webfiles.zip's index.js)."""
    with zipfile.ZipFile(TENSORBOARD_BUNDLE) as bundle:
        source = bundle.read("index.js").decode("utf-8")
    match = re.search(pattern, source, re.S)
    assert match, f"not found in TensorBoard {tensorboard.__version__}'s bundle: {pattern}"
    return match


def test_smoothing_is_tensorboards_own(page, tensorboard_views):
    """The curves' smoothing gives what TensorBoard's own smoothing code, taken from its bundle, gives, on
    series with non-finite points and constant ones, for weights from 0 to 1; and the slider has TensorBoard's
    range and default."""
    body = tensorboard_source(
        r"(Number\.isFinite\(e\)\|\|\(e=0\),e=Math\.max\(0,Math\.min\(e,1\)\);let n=\[\];for\(let i of t\)\{.*?return n)\}\)\}"
    ).group(1)
    assert "yield" not in body
    default = float(tensorboard_source(r"scalarSmoothing:(\.\d+)[,}]").group(1))
    highest = float(tensorboard_source(r"this\.MAX_SMOOTHING_VALUE=(\.\d+)").group(1))  # the time series dashboard's
    rng = np.random.default_rng(0)
    series = [rng.normal(0.5, 0.2, 40).tolist(), [0.3] * 7, [1.0, "NaN", 2.0, "Infinity", 3.0, "-Infinity", 0.5], [2.5], [],
              np.cumsum(rng.normal(0, 1, 200)).tolist()]
    frame = open_tab(page, tensorboard_views)
    compared = module(frame, "smoothing.js", """
        const tensorboard = new Function("t", "e", arg.body);
        const decode = (v) => (typeof v === "string" ? Number(v) : v);
        const out = [];
        for (const weight of [0, 0.1, 0.6, 0.95, 0.999, 1]) {
            for (const values of arg.series.map((s) => s.map(decode))) {
                const theirs = tensorboard([{id: "x", points: values.map((y, x) => ({x, y}))}], weight)[0].points.map((p) => p.y);
                const ours = Array.from(m.smooth(values, weight));
                out.push([weight, theirs.map(String), ours.map(String)]);
            }
        }
        // the curves smooth every layer's column of a [steps, layers] matrix at once: the same as smooth()
        const columns = [arg.series[0], arg.series[2].map(decode).concat(arg.series[0].slice(7)), arg.series[0].map(() => 0.3)];
        const rows = columns[0].map((_, s) => Float32Array.from(columns, (column) => column[s]));
        const together = m.smoothColumns(rows, 0.6);
        const apart = columns.map((column) => Array.from(m.smooth(Float32Array.from(column), 0.6)));
        const columnsAgree = apart.every((column, c) => column.every((v, s) => (Number.isFinite(v)
            ? Math.abs(together[s][c] - v) <= 1e-6 * Math.max(1, Math.abs(v)) : Object.is(together[s][c], v))));
        return {out, columnsAgree, cached: m.smoothColumns(rows, 0.6) === together && m.smoothColumns(rows, 0) === rows,
                max: m.MAX_SMOOTHING, preset: m.DEFAULT_SMOOTHING,
                slider: ["step", "min", "max"].map((a) => document.getElementById("tm-smoothing").getAttribute(a)),
                shown: document.getElementById("tm-smoothing").value};
    """, {"body": body, "series": series})
    for weight, theirs, ours in compared["out"]:
        assert len(theirs) == len(ours)
        for a, b in zip(theirs, ours):
            assert a == b or np.isclose(float(a), float(b), rtol=1e-12), (weight, theirs, ours)
    assert compared["columnsAgree"] and compared["cached"]
    assert compared["max"] == highest and compared["slider"] == ["0.001", "0", str(highest)]
    assert compared["preset"] == default and float(compared["shown"]) == default


def test_run_colors_are_tensorboards(page, tensorboard_views):
    """The tab's run colors are TensorBoard's palette (from its bundle), given in the order of TensorBoard's
    run list: each run has the color it has in TensorBoard's own runs table, light and dark."""
    palette = tensorboard_source(r'colorPalette:\{id:"default",name:"[^"]*",colors:\[(.*?)\],inactive').group(1)
    expected = [(light, dark) for light, dark in re.findall(r'lightHex:"(#[0-9a-f]{6})",darkHex:"(#[0-9a-f]{6})"', palette)]
    assert len(expected) == 7
    frame = open_tab(page, tensorboard_views)
    ours = module(frame, "colors.js", "return m.RUN_PALETTE.map((c) => [c.light, c.dark]);")
    assert [tuple(c) for c in ours] == expected

    def tab_colors():
        frame.wait_for_selector("#tm-runs .tm-swatch")
        return dict(frame.evaluate("""() => [...document.querySelectorAll("#tm-runs .tm-run")].map((label) =>
            [label.querySelector(".tm-run-name").textContent, getComputedStyle(label.querySelector(".tm-swatch")).backgroundColor])"""))

    def hex_to_rgb(color):
        return f"rgb({int(color[1:3], 16)}, {int(color[3:5], 16)}, {int(color[5:7], 16)})"

    order = tensorboard_views.json("/data/runs")
    light = tab_colors()
    assert light == {run: hex_to_rgb(expected[order.index(run) % 7][0]) for run in order}
    page.goto(f"{tensorboard_views.url}/#timeseries")
    page.wait_for_selector("tb-data-table-content-row .run-color-swatch")
    theirs = dict(page.evaluate("""() => [...document.querySelectorAll(".run-color-swatch")].map((swatch) =>
        [swatch.closest("tb-data-table-content-row").textContent.trim(), getComputedStyle(swatch).backgroundColor])"""))
    assert theirs == light
    frame = open_tab(page, tensorboard_views)
    page.click("button[aria-label='Menu for changing light or dark theme']")
    page.click("[title='Force dark TensorBoard theme.']")
    frame.wait_for_function("document.body.classList.contains('tm-dark')")
    page.keyboard.press("Escape")
    frame.wait_for_function("""(slate) => [...document.querySelectorAll("#tm-runs .tm-swatch")]
        .some((s) => getComputedStyle(s).backgroundColor === slate)""", arg=hex_to_rgb(expected[0][1]))
    dark = tab_colors()
    assert dark == {run: hex_to_rgb(expected[order.index(run) % 7][1]) for run in order}


def test_spread_quantiles_and_differences_by_depth_on_their_own(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    rng = np.random.default_rng(1)
    values = rng.normal(0.5, 0.3, 50)
    values[[3, 7]] = [np.inf, np.nan]
    dead = [0, 1, 9]
    stats = module(frame, "layer_stats.js", """
        const layer = {values: Float32Array.from(arg.values.map(Number)), dead: new Set(arg.dead)};
        return [m.layerStats(layer), m.deadUnitsText(layer), m.deadUnitsText(layer, true), m.nonFiniteText(layer)];
    """, {"values": [str(v) for v in values], "dead": dead})
    live = np.delete(values.astype(np.float32).astype(np.float64), dead)
    live = live[np.isfinite(live)]
    assert stats[0]["live"] == len(live) == 45 and stats[0]["dead"] == 3 and stats[0]["nonFinite"] == 2
    assert np.isclose(stats[0]["low"], np.quantile(live, 0.1)) and np.isclose(stats[0]["high"], np.quantile(live, 0.9))
    assert stats[1:] == ["3 of 50 units dead, left out of the mean", "3 of 50 units dead, counted in the mean",
                         "2 units +inf or NaN, left out of the mean"]
    depths = module(frame, "difference.js", """
        const points = [{depth: 0, value: 1}, {depth: 0.5, value: NaN}, {depth: 0.6, value: 3}, {depth: 1, value: 5}];
        const means = {layers: ["a", "b", "c"], steps: [5, 10, 20], values: [[1, 2, 3], [4, 5, 6], [7, 8, 9]].map((r) => Float32Array.from(r))};
        const reference = {layers: ["x", "y"], steps: [10, 15], values: [[0, 10], [1, 11]].map((r) => Float32Array.from(r))};
        const depth = {a: 0, b: 0.5, c: 1, x: 0, y: 1};
        const difference = m.differenceMeans(means, reference, {same: false, depthOf: (n) => depth[n], referenceDepthOf: (n) => depth[n]});
        const same = m.differenceMeans({...means, layers: ["x", "y", "z"]}, reference, {same: true, depthOf: () => 0, referenceDepthOf: () => 0});
        return {at: [0, 0.3, 0.55, 0.8, 1, 1.2].map((d) => m.interpolateAtDepth(points, d)),
                difference: difference.values.map((r) => Array.from(r).map(String)), same: same.values.map((r) => Array.from(r).map(String)),
                cached: m.differenceMeans(means, reference, {same: false}) === difference};
    """)
    np.testing.assert_allclose(depths["at"], [1, 1 + 0.3 / 0.6 * 2, 1 + 0.55 / 0.6 * 2, 4, 5, 5])
    # step 5: before the reference's first step; 10: its step 10; 20: its last step at or before, 15
    assert depths["difference"] == [["NaN"] * 3, ["4", "0", "-4"], ["6", "2", "-2"]]
    assert depths["same"] == [["NaN"] * 3, ["4", "-5", "NaN"], ["6", "-3", "NaN"]] and depths["cached"]


# -- the views -----------------------------------------------------------------------------------------------


def test_profile_shows_each_layers_spread_and_dead_units(page, tensorboard_views, logs):
    _, records = logs
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    frame.wait_for_function("document.querySelectorAll('#tm-profile path.tm-band').length === 2")
    y = tick_scale(frame, "#tm-profile svg")
    assert frame.evaluate("document.querySelector('#tm-profile svg').dataset.axis") == "zero"
    for run in ("baseline", "augmented"):
        payload = units(tensorboard_views, run, 20)
        band = frame.evaluate(f"document.querySelector('#tm-profile path.tm-band[data-run={run}]').getAttribute('d')")
        vertices = [tuple(map(float, pair.split(","))) for pair in re.findall(r"[-\d.]+,[-\d.]+", band)]
        upper, lower = vertices[: len(payload["layers"])], vertices[len(payload["layers"]):][::-1]
        for layer, (_, top), (_, bottom) in zip(payload["layers"], upper, lower):
            values = floats(layer["values"])
            live = np.delete(values, layer["dead"])
            live = live[np.isfinite(live)]
            assert abs(top - y(np.quantile(live, 0.9))) < 1 and abs(bottom - y(np.quantile(live, 0.1))) < 1, (run, layer["name"])
    # layer "1" (ReLU) of baseline: channel 0 never fires: dead, left out of the mean
    text = tooltip_of(frame, frame.locator("#tm-profile path.tm-line[data-run=baseline] + g circle.tm-dot[data-layer='1']"))
    layer = next(item for item in units(tensorboard_views, "baseline", 20)["layers"] if item["name"] == "1")
    assert len(layer["dead"]) >= 1
    assert f"{len(layer['dead'])} of 6 units dead, left out of the mean" in text and "10\u201390 % of the" in text
    assert "baseline" in text and "step 20" in text
    canvas = frame.locator("canvas.tm-heatmap[data-run=baseline]")
    canvas.hover(position=canvas.evaluate("(c) => c.cellCenter(1, 3)"))
    frame.wait_for_function("document.getElementById('tm-tooltip').textContent.includes('units dead')")
    assert f"{len(layer['dead'])} of 6 units dead, left out of the mean" in frame.locator("#tm-tooltip").inner_text()
    frame.locator("#tm-profile-section").screenshot(path=str(ARTIFACTS / "profile-spread.png"))


def heatmap_pixels(frame, run: str, cells):
    """[(pixel, expected)] of cells [layer, unit, value, dead] of a difference heatmap: the pixel at the
    cell's center and the diverging color of the value on the canvas' scale."""
    return frame.evaluate(
        """async ({run, cells}) => {
            const {colorFor} = await import(new URL("static/colors.js", document.baseURI).href);
            const {divergingColor} = await import(new URL("static/difference.js", document.baseURI).href);
            const canvas = [...document.querySelectorAll("canvas.tm-heatmap")].find((c) => c.dataset.run === run);
            const context = canvas.getContext("2d");
            const rx = canvas.width / canvas.clientWidth;
            const ry = canvas.height / canvas.clientHeight;
            const scale = {min: Number(canvas.dataset.min), max: Number(canvas.dataset.max), colormap: divergingColor};
            return cells.map(([layer, unit, value, dead]) => {
                const {x, y} = canvas.cellCenter(layer, unit);
                const pixel = context.getImageData(Math.floor(x * rx), Math.floor(y * ry), 1, 1).data;
                return [[pixel[0], pixel[1], pixel[2]], colorFor(value === null ? NaN : value, {...scale, dead})];
            });
        }""",
        {"run": run, "cells": cells},
    )


def test_difference_view_of_the_same_architecture(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 2")
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    set_reference(frame, "baseline")
    wait_for_runs(frame, {"baseline": None, "augmented": 20}, measure="nvi \u2212 baseline")
    # unit heatmap: augmented - baseline, unit by unit, on a diverging scale symmetric about 0
    own, reference = units(tensorboard_views, "augmented", 20), units(tensorboard_views, "baseline", 20)
    cells, largest = [], 0.0
    for column, (a, b) in enumerate(zip(own["layers"], reference["layers"])):
        dead = set(a["dead"]) | set(b["dead"])
        for unit, (x, r) in enumerate(zip(floats(a["values"]), floats(b["values"]))):
            difference = float(np.float32(x) - np.float32(r)) if np.isfinite(x) and np.isfinite(r) else None
            cells.append([column, unit, difference, unit in dead])
            if difference is not None and unit not in dead:
                largest = max(largest, abs(difference))
    scale = frame.evaluate("(({dataset}) => [Number(dataset.min), Number(dataset.max)])(document.querySelector('canvas.tm-heatmap[data-run=augmented]'))")
    assert scale[0] == -scale[1] and largest <= scale[1] <= largest * 1.1
    for (column, unit, value, dead), (pixel, expected) in zip(cells, heatmap_pixels(frame, "augmented", cells)):
        assert all(abs(p - e) <= COLOR_TOLERANCE for p, e in zip(pixel, expected)), (column, unit, value, dead, pixel, expected)
    assert "reference" in frame.locator("#tm-heatmaps figure:has(canvas[data-run=baseline]) .tm-message").inner_text()
    assert frame.locator("#tm-units-legend").get_attribute("data-kind") == "difference"
    # profile: one line (augmented), its points the difference of the layer means
    frame.wait_for_function("document.querySelectorAll('#tm-profile path.tm-line').length === 1")
    assert frame.evaluate("document.querySelector('#tm-profile svg').dataset.axis") == "difference"
    assert frame.locator("#tm-profile path.tm-band").count() == 0
    y = tick_scale(frame, "#tm-profile svg")
    d = frame.evaluate("document.querySelector('#tm-profile path.tm-line').getAttribute('d')")
    ys = [float(pair.split(",")[1]) for pair in re.findall(r"[-\d.]+,[-\d.]+", d)]
    expected = [float(a["mean"]) - float(b["mean"]) for a, b in zip(own["layers"], reference["layers"])]
    assert len(ys) == len(expected) and all(abs(py - y(v)) < 1 for py, v in zip(ys, expected)), (ys, expected)
    text = tooltip_of(frame, frame.locator("#tm-profile circle.tm-dot[data-layer='3']"))
    assert "nvi \u2212 baseline" in text and "augmented" in text
    # curves: the reference says so, augmented's chart is signed and symmetric about 0
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 1")
    assert frame.evaluate("document.getElementById('tm-curves').dataset.axis") == "difference"
    assert "reference" in frame.locator("#tm-curves .tm-message").inner_text()
    labels = [float(t) for t in frame.locator("#tm-curves svg text.tm-tick[text-anchor=end]").all_text_contents()]
    assert min(labels) == -max(labels) < 0
    # its lines are stroked: at once on screen, once the main thread is idle below the fold (issue 14)
    frame.wait_for_function("""() => {
        const canvas = document.querySelector('#tm-curves canvas.tm-curves-canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        return data.some((v, i) => i % 4 === 3 && v > 0);
    }""")
    assert frame.locator("#tm-log-y").is_disabled()
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "difference-units.png"))
    frame.locator("#tm-profile-section").screenshot(path=str(ARTIFACTS / "difference-profile.png"))
    # back to values; no request was made by switching twice
    set_reference(frame, None)
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 2")
    assert frame.evaluate("document.querySelector('#tm-profile svg').dataset.axis") == "zero"
    assert [url for url in requests if BASE in url] == []


def test_difference_view_of_another_architecture_compares_by_depth(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "equivariant"})
    wait_for_runs(frame, {"baseline": 20, "equivariant": 20})
    set_reference(frame, "baseline")
    wait_for_runs(frame, {"baseline": None, "equivariant": None})
    message = frame.locator("#tm-heatmaps figure").filter(has_text="equivariant").locator(".tm-message").inner_text()
    assert "cannot be matched one to one" in message and "by depth %" in message
    frame.wait_for_function("document.querySelectorAll('#tm-profile path.tm-line').length === 1")
    runs = {entry["run"]: entry for entry in tensorboard_views.json(f"{BASE}/runs")["runs"]}
    own, reference = units(tensorboard_views, "equivariant", 20), units(tensorboard_views, "baseline", 20)
    depth = lambda run, layer: layer["index"] / (len(runs[run]["layers"]) - 1)  # noqa: E731
    ref_depths = [depth("baseline", layer) for layer in reference["layers"]]
    ref_means = [float(layer["mean"]) for layer in reference["layers"]]
    expected = [float(layer["mean"]) - np.interp(depth("equivariant", layer), ref_depths, ref_means) for layer in own["layers"]]
    y = tick_scale(frame, "#tm-profile svg")
    d = frame.evaluate("document.querySelector('#tm-profile path.tm-line').getAttribute('d')")
    ys = [float(pair.split(",")[1]) for pair in re.findall(r"[-\d.]+,[-\d.]+", d)]
    assert len(ys) == len(expected) and all(abs(py - y(v)) < 1 for py, v in zip(ys, expected)), (ys, expected)
    text = tooltip_of(frame, frame.locator("#tm-profile circle.tm-dot").nth(2))
    assert "another architecture" in text and "% depth" in text
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 1")
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "difference-other-architecture.png"))


def test_clicking_a_unit_shows_it_during_training(page, tensorboard_views, logs):
    _, records = logs
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented", "equivariant"})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20, "equivariant": 20})
    assert frame.locator("#tm-unit-history-chart").count() == 0  # nothing fetched before a click
    slider = frame.locator("#tm-smoothing")
    slider.evaluate("(s) => { s.value = '0'; s.dispatchEvent(new Event('input')); }")
    canvas = frame.locator("canvas.tm-heatmap[data-run=augmented]")
    layers = [layer["name"] for layer in units(tensorboard_views, "augmented", 20)["layers"]]
    column = layers.index("9")  # Linear(32, 12): the equivariant CNN has no layer "9"
    canvas.click(position=canvas.evaluate(f"(c) => c.cellCenter({column}, 4)"))
    frame.wait_for_function("document.querySelectorAll('#tm-unit-history-chart path.tm-unit-line').length === 2")
    assert frame.locator(".tm-unit-history-name").inner_text() == "layer 9, unit 4"
    notes = frame.locator(".tm-unit-history-note").all_inner_texts()
    assert any("equivariant" in note and "has no layer 9 with a unit 4 (nvi)" in note for note in notes), notes
    y = tick_scale(frame, "#tm-unit-history-chart")
    for run in ("baseline", "augmented"):
        d = frame.evaluate(f"document.querySelector('#tm-unit-history-chart path.tm-unit-line[data-run={run}]').getAttribute('d')")
        ys = [float(pair.split(",")[1]) for pair in re.findall(r"[-\d.]+,[-\d.]+", d)]
        expected = [float(records[run][step].get("nvi", "9")[4]) for step in STEPS]
        assert len(ys) == 3 and all(abs(py - y(v)) < 1 for py, v in zip(ys, expected)), (run, ys, expected)
    assert frame.evaluate("document.getElementById('tm-unit-history-chart').dataset.axis") == "zero"
    frame.locator("#tm-unit-history-section").screenshot(path=str(ARTIFACTS / "unit-history.png"))
    # the dead channel of baseline's ReLU: dead at every step, a gap; augmented's unit is drawn
    canvas = frame.locator("canvas.tm-heatmap[data-run=baseline]")
    canvas.click(position=canvas.evaluate(f"(c) => c.cellCenter({layers.index('1')}, 0)"))
    frame.wait_for_selector(".tm-unit-history-name:text-is('layer 1, unit 0')")
    frame.wait_for_function("document.querySelectorAll('#tm-unit-history-chart path.tm-unit-line').length === 3")
    assert any("baseline" in note and "dead at 3 of them" in note for note in frame.locator(".tm-unit-history-note").all_inner_texts())
    assert frame.evaluate("document.querySelector('#tm-unit-history-chart path.tm-unit-line[data-run=baseline]').getAttribute('d')") == ""
    # a click on the chart moves the step slider; clear hides it again
    chart = frame.locator("#tm-unit-history-chart rect.tm-hover-area")
    box = chart.bounding_box()
    chart.click(position={"x": 2, "y": box["height"] / 2})
    frame.wait_for_selector("#tm-step-value:text-is('step 0')")
    frame.locator(".tm-unit-history-close").click()
    frame.wait_for_selector(".tm-unit-history-hint")


def test_clicking_charts_moves_the_step_slider(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    # a column of the layer x step heatmap: step 0
    heatmap = frame.locator("#tm-training canvas").first
    heatmap.click(position={"x": 3, "y": 5})
    wait_for_runs(frame, {"baseline": 0, "augmented": 0})
    assert frame.locator("#tm-step-value").inner_text() == "step 0"
    # a point of a curve: step 10, in the middle of the x axis
    frame.wait_for_selector("#tm-curves svg")
    overlay = frame.locator("#tm-curves svg").first
    x10 = frame.evaluate("""() => {
        const ticks = [...document.querySelector("#tm-curves svg").querySelectorAll("text.tm-tick[text-anchor=middle]")];
        return Number(ticks.find((t) => t.textContent === "10").getAttribute("x"));
    }""")
    overlay.click(position={"x": x10 + 1, "y": 60})
    wait_for_runs(frame, {"baseline": 10, "augmented": 10})
    assert frame.locator("#tm-step-value").inner_text() == "step 10"
    # the last column of the accuracy heatmap: the latest step
    accuracy = frame.locator("#tm-accuracy-training canvas").first
    box = accuracy.bounding_box()
    accuracy.click(position={"x": box["width"] - 2, "y": 5})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    assert frame.locator("#tm-step-value").inner_text() == "step 20 (latest)"


def test_hovering_a_layer_highlights_it_in_every_view(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented"})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20})
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 2")
    layers = [layer["name"] for layer in units(tensorboard_views, "augmented", 20)["layers"]]
    column = layers.index("5")
    canvas = frame.locator("canvas.tm-heatmap[data-run=augmented]")
    canvas.hover(position=canvas.evaluate(f"(c) => c.cellCenter({column}, 1)"))

    def highlighted():
        return frame.evaluate("""() => ({
            dots: [...document.querySelectorAll("#tm-profile circle.tm-highlight")].map((c) => c.dataset.layer),
            curves: [...document.querySelectorAll("#tm-curves svg.tm-curves-overlay")].map((s) => s.dataset.highlight),
            labels: [...document.querySelectorAll("#tm-curves text.tm-curve-label")].map((t) => t.textContent),
            outlines: [...document.querySelectorAll("#tm-heatmaps .tm-column-highlight")].filter((o) => !o.hidden).map((o) => {
                const box = o.getBoundingClientRect();
                return {run: o.parentElement.querySelector("canvas").dataset.run, left: box.left, right: box.right};
            }),
        })""")

    frame.wait_for_function("document.querySelectorAll('#tm-profile circle.tm-highlight').length === 2")
    shown = highlighted()
    assert shown["dots"] == ["5", "5"] and shown["curves"] == ["5", "5"] and shown["labels"] == ["layer 5", "layer 5"]
    assert len(shown["outlines"]) == 2
    for outline in shown["outlines"]:
        center = frame.evaluate(f"""() => {{
            const canvas = document.querySelector("canvas.tm-heatmap[data-run={outline['run']}]");
            return canvas.getBoundingClientRect().left + canvas.cellCenter({column}, 0).x;
        }}""")
        assert outline["left"] < center < outline["right"]
    # hovering a curve names its layer and highlights it everywhere
    overlay = frame.locator("#tm-curves svg.tm-curves-overlay[data-run=baseline]")
    box = overlay.bounding_box()
    overlay.hover(position={"x": box["width"] * 0.6, "y": box["height"] * 0.3})
    for y in range(20, int(box["height"]) - 40, 6):  # move down until the pointer is near a line
        if frame.evaluate("document.querySelector('#tm-curves svg.tm-curves-overlay[data-run=baseline]').dataset.highlight"):
            break
        overlay.hover(position={"x": box["width"] * 0.6, "y": y})
    name = overlay.get_attribute("data-highlight")
    assert name, "no line near the pointer"
    assert frame.locator("#tm-tooltip").get_attribute("data-layer") == name
    frame.wait_for_function("(name) => [...document.querySelectorAll('#tm-profile circle.tm-highlight')].every((c) => c.dataset.layer === name)"
                            " && document.querySelectorAll('#tm-profile circle.tm-highlight').length > 0", arg=name)
    assert frame.locator("#tm-curves svg.tm-curves-overlay[data-run=baseline] text.tm-curve-label").text_content() == f"layer {name}"
    assert frame.evaluate("document.querySelector('#tm-curves svg.tm-curves-overlay[data-run=baseline] path.tm-curve-highlight').getAttribute('d')")
    frame.locator("#tm-curves-section").screenshot(path=str(ARTIFACTS / "curve-highlight.png"))
    frame.locator("#tm-units h3").hover()
    frame.wait_for_function("document.querySelectorAll('#tm-profile circle.tm-highlight').length === 0")


def test_curves_smoothing_and_log_axis(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"augmented"})
    wait_for_runs(frame, {"augmented": 20})
    frame.wait_for_function("document.querySelectorAll('#tm-curves canvas').length === 1")
    assert frame.evaluate("document.getElementById('tm-curves').dataset.axis") == "zero"
    labels = [float(t) for t in frame.locator("#tm-curves svg text.tm-tick[text-anchor=end]").all_text_contents()]
    assert min(labels) == 0
    overlay = frame.locator("#tm-curves svg.tm-curves-overlay")
    box = overlay.bounding_box()

    def tooltip_at(y):
        overlay.hover(position={"x": box["width"] - 14, "y": y})
        return frame.locator("#tm-tooltip").inner_text() if frame.locator("#tm-tooltip").is_visible() else ""

    text = next(filter(None, (tooltip_at(y) for y in range(20, int(box["height"]) - 40, 4))))
    assert "(smoothed 0.6)" in text and "value " in text  # TensorBoard's default smoothing, the raw value too
    frame.locator("#tm-log-y").check()
    frame.wait_for_function("document.getElementById('tm-curves').dataset.axis === 'log'")
    ticks = [float(t) for t in frame.locator("#tm-curves svg text.tm-tick[text-anchor=end]").all_text_contents()]
    assert all(t > 0 for t in ticks) and max(ticks) / min(ticks) >= 10
    frame.locator("#tm-curves-section").screenshot(path=str(ARTIFACTS / "curves-log.png"))
    frame.locator("#tm-log-y").uncheck()
    frame.wait_for_function("document.getElementById('tm-curves').dataset.axis === 'zero'")


def test_accuracy_during_training(page, tensorboard_views, logs):
    _, records = logs
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {"baseline", "augmented", XSS})
    wait_for_runs(frame, {"baseline": 20, "augmented": 20, XSS: 10})
    frame.wait_for_function("document.querySelectorAll('#tm-accuracy-training canvas').length === 2")  # XSS logs no accuracy
    assert frame.locator("#tm-accuracy-training text.tm-tick").filter(has_text="rotation 90\u00b0").count() == 2
    for run in ("baseline", "augmented"):
        pixels = frame.evaluate("""async (run) => {
            const {colorFor} = await import(new URL("static/colors.js", document.baseURI).href);
            const canvas = document.querySelector(`#tm-accuracy-training canvas[data-run=${run}]`);
            const context = canvas.getContext("2d");
            const ratio = canvas.width / canvas.clientWidth;
            const rows = 4;
            const out = [];
            for (const step of [0, 10, 20]) {
                for (let r = 0; r < rows; r++) {
                    const x = canvas.stepCenter(step);
                    const y = ((r + 0.5) / rows) * canvas.clientHeight;
                    out.push([step, r, Array.from(context.getImageData(Math.floor(x * ratio), Math.floor(y * ratio), 1, 1).data.slice(0, 3))]);
                }
            }
            return out;
        }""", run)
        expected = frame.evaluate("""async (values) => {
            const {colorFor} = await import(new URL("static/colors.js", document.baseURI).href);
            return values.map((v) => colorFor(v, {min: 0, max: 1}));
        }""", [float(records[run][step].accuracy[r]) for step, r, _ in pixels])
        for (step, r, pixel), color in zip(pixels, expected):
            assert all(abs(p - e) <= COLOR_TOLERANCE for p, e in zip(pixel, color)), (run, step, r, pixel, color)
    canvas = frame.locator("#tm-accuracy-training canvas[data-run=augmented]")
    x = canvas.evaluate("(c) => c.stepCenter(10)")
    canvas.hover(position={"x": x, "y": 3})
    text = frame.locator("#tm-tooltip").inner_text()
    assert "rotation 0\u00b0" in text and "step 10" in text and "accuracy = " in text
    canvas.click(position={"x": x, "y": 3})
    wait_for_runs(frame, {"baseline": 10, "augmented": 10, XSS: 10})
    assert frame.locator("#tm-step-value").inner_text() == "step 10"
    frame.locator("#tm-accuracy-section").screenshot(path=str(ARTIFACTS / "accuracy-training.png"))


def test_hostile_run_name_in_the_new_views_is_text(page, tensorboard_views):
    frame = open_tab(page, tensorboard_views)
    select_runs(frame, {XSS, "augmented"})
    wait_for_runs(frame, {XSS: 10, "augmented": 20})
    set_reference(frame, XSS)
    wait_for_runs(frame, {XSS: None, "augmented": 20}, measure=f"nvi \u2212 {XSS}")
    canvas = frame.locator("canvas.tm-heatmap[data-run=augmented]")
    canvas.click(position=canvas.evaluate("(c) => c.cellCenter(0, 0)"))
    frame.wait_for_function("document.querySelectorAll('#tm-unit-history-chart path.tm-unit-line').length === 2")
    assert XSS in frame.locator("#tm-reference").text_content() and XSS in frame.locator("#tm-unit-history").inner_text()
    assert XSS in frame.locator("#tm-units-legend").inner_text()
    assert frame.evaluate("document.querySelectorAll('img, [onerror]').length") == 0
