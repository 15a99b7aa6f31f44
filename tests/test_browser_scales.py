"""The Invariance tab's color scales, layer names and filter, URL state and exports, in Debian's Chromium
driven by playwright on a real TensorBoard serving logs written by the SDK (as tests/test_browser.py).

Runs logged here:

- baseline: the small CNN of test_browser, one conv channel dead (its ReLU never fires);
- peaking: the small CNN with its first convolution scaled by 100 at step 10 and by 1/10 at step 20, so
  tvi is 100x larger at step 10 than at step 0 and 10x larger than at the latest step (a per-step color
  scale jumps; the tab's must not, and must cover step 10 although it shows the latest step first);
- contrast: a probe of near-identical images with an asymmetric pattern, so rotations change the output
  more than the samples differ: nvi above its fixed range's 1.2;
- deep: a network with nested, long module names (features.stem_convolution_3x3, ...) and activation /
  normalization layers.

The "unit" tests at the end call the frontend's pure functions (scales, layer filter, URL state, CSV) in
the page, where the tab runs them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import struct
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from urllib.parse import quote, unquote

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from logs import floats, rows
from logwriter import write_run
from models import small_cnn
from tensorboard_process import TensorBoard
from test_browser import ARTIFACTS, BASE, STEPS, browser, open_tab, page, pytestmark, select_runs  # noqa: F401

RUNS = ("baseline", "peaking", "contrast", "deep")
MODULE = 'await import(new URL("static/{name}.js", document.baseURI).href)'
COLOR_TOLERANCE = 2
PRINT_RATIO = 300 / 96


def deep_model(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(OrderedDict(
            stem_convolution_3x3=nn.Conv2d(3, 6, 3, padding=1),
            stem_batch_normalization=nn.BatchNorm2d(6),
            stem_activation=nn.ReLU(),
            downsample=nn.MaxPool2d(2),
            residual_block_convolution=nn.Conv2d(6, 8, 3, padding=1),
            residual_block_activation=nn.GELU(),
        )),
        pooling=nn.AdaptiveAvgPool2d(2),
        flatten=nn.Flatten(),
        classifier=nn.Sequential(OrderedDict(
            dropout=nn.Dropout(0.2),
            hidden_projection=nn.Linear(32, 12),
            hidden_activation=nn.SiLU(),
            output_projection=nn.Linear(12, 5),
        )),
    ))


def write_custom(rundir, steps, model, images, before_step) -> dict[int, tm.MeasureResult]:
    """Logs the invariance measures of `model` on `images` at `steps`, calling before_step(model, i) first."""
    record = {}
    with tm.Monitor(model, images, tm.transforms.rotations(4), logdir=rundir, every=1, measures=("invariance",)) as monitor:
        for i, step in enumerate(steps):
            with torch.no_grad():
                before_step(model, i)
            record[step] = monitor.step(step)
    return record


def peak_first_conv(model, i):
    factor = {0: 1.0, 1: 100.0, 2: 0.1}[i]
    model[0].weight.mul_(factor)
    model[0].bias.mul_(factor)


@pytest.fixture(scope="module")
def scale_logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scales") / "logs"
    g = torch.Generator().manual_seed(7)
    pattern = torch.randn(1, 3, 8, 8, generator=g)
    near_identical = pattern + 0.02 * torch.randn(12, 3, 8, 8, generator=g)
    records = {
        "baseline": write_run(root / "baseline", STEPS, dead_channel=True),
        "peaking": write_custom(root / "peaking", STEPS, small_cnn(seed=4), torch.randn(12, 3, 8, 8, generator=g), peak_first_conv),
        "contrast": write_custom(root / "contrast", STEPS, small_cnn(seed=6), near_identical, lambda model, i: None),
        "deep": write_run(root / "deep", STEPS, seed=5, model=deep_model()),
    }
    # what the tests below rely on, so that they cannot pass vacuously
    tvi = {step: max(records["peaking"][step].layer_means("tvi").values()) for step in STEPS}
    assert tvi[10] > 50 * tvi[0] and tvi[10] > 5 * tvi[20], tvi
    assert any((r.get("nvi", layer) > 1.2).any() for r in records["contrast"].values() for layer in r.layers_of("nvi"))
    return root, records


@pytest.fixture(scope="module")
def scale_tb(scale_logs):
    root, _ = scale_logs
    with TensorBoard(root, "--reload_interval=0") as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {e["run"] for e in p["runs"]} == set(RUNS) and all(e["max_step"] == 20 for e in p["runs"]))
        yield tb


# -- helpers -------------------------------------------------------------------------------------------

def wait_for_units(frame, expected, measure):
    """Waits until exactly the heatmaps {run: step} of `measure` are drawn and up to date."""
    frame.wait_for_function(
        """([expected, measure]) => {
            const canvases = [...document.querySelectorAll("canvas.tm-heatmap")].filter((c) => !c.hidden);
            return canvases.length === Object.keys(expected).length
                && canvases.every((c) => c.dataset.run in expected && Number(c.dataset.step) === expected[c.dataset.run]
                                   && c.dataset.measure === measure && !c.closest(".tm-stale"));
        }""",
        arg=[expected, measure],
    )


def choose(frame, runs, measure):
    select_runs(frame, set(runs))
    frame.select_option("#tm-measure", measure)
    wait_for_units(frame, dict.fromkeys(runs, 20), measure)


def legend(frame, which="units"):
    return frame.locator(f"#tm-{which}-legend").evaluate("(e) => ({...e.dataset})")


def canvases(frame, selector):
    return frame.locator(selector).evaluate_all("(cs) => cs.map((c) => ({...c.dataset}))")


def route_units(tb, run, measure, step):
    return tb.json(f"{BASE}/units?run={quote(run, safe='')}&namespace=invariance&measure={measure}&step={step}")


def route_means(tb, run, measure):
    return tb.json(f"{BASE}/layer_means?run={quote(run, safe='')}&namespace=invariance&measure={measure}")


def nice_ceil(value):
    """colors.niceCeil: up to two significant digits."""
    unit = 10 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / unit - 1e-9) * unit:.12g}")


def expected_data_max(tb, runs, measure, steps_loaded):
    """The data range's maximum (scales.dataRange): the largest of every layer mean at every step and the
    99th percentile of each loaded unit snapshot's live units, rounded up."""
    highest = max(np.nanmax(rows(route_means(tb, run, measure))) for run in runs)
    for run in runs:
        for step in steps_loaded:
            values = []
            for layer in route_units(tb, run, measure, step)["layers"]:
                v = floats(layer["values"])
                live = np.ones(v.size, bool)
                live[layer["dead"]] = False
                values += [x for x in v[live] if math.isfinite(x)]
            highest = max(highest, float(np.quantile(np.sort(values), 0.99)))
    return nice_ceil(highest)


def sampled(frame, selector, cells):
    """[(pixel, expected)] for cells [layer, unit, value, dead] of the unit heatmap `selector`: the pixel at the
    cell's center and colorFor(value) on the scale the canvas says it was drawn with."""
    return frame.evaluate(
        """async ([selector, cells]) => {
            const {colorFor} = %s;
            const canvas = document.querySelector(selector);
            const context = canvas.getContext("2d");
            const rx = canvas.width / canvas.clientWidth;
            const ry = canvas.height / canvas.clientHeight;
            const scale = {min: Number(canvas.dataset.min), max: Number(canvas.dataset.max), log: canvas.dataset.log === "true"};
            return cells.map(([layer, unit, value, dead]) => {
                const {x, y} = canvas.cellCenter(layer, unit);
                const pixel = context.getImageData(Math.floor(x * rx), Math.floor(y * ry), 1, 1).data;
                return [[pixel[0], pixel[1], pixel[2]], colorFor(value, {...scale, dead})];
            });
        }""" % MODULE.format(name="colors"),
        [selector, cells],
    )


def check_cells(frame, tb, run, measure, step):
    """Every cell of the run's heatmap has colorFor(logged value) on the heatmap's scale; returns the cells."""
    layers = route_units(tb, run, measure, step)["layers"]
    cells = [[column, u, float(v), u in layer["dead"]] for column, layer in enumerate(layers) for u, v in enumerate(floats(layer["values"]))]
    for cell, (pixel, expected) in zip(cells, sampled(frame, f"canvas.tm-heatmap[data-run={run}]", cells)):
        assert all(abs(p - e) <= COLOR_TOLERANCE for p, e in zip(pixel, expected)), (run, step, cell, pixel, expected)
    return cells, [pixel for pixel, _ in sampled(frame, f"canvas.tm-heatmap[data-run={run}]", cells)]


def special_colors(frame):
    return frame.evaluate(f"async () => ({MODULE.format(name='colors')}).SPECIAL_COLORS")


def slide_to(frame, key):
    slider = frame.locator("#tm-step")
    slider.focus()
    slider.press(key)


def hash_params(page):
    """The tab's keys in TensorBoard's hash: {key: value}."""
    found = {}
    for part in page.evaluate("location.hash").lstrip("#").split("&"):
        key, _, value = part.partition("=")
        if key.startswith("p.tm_invariance."):
            found[unquote(key)[len("p.tm_invariance."):]] = unquote(value)
    return found


def download(page, frame, what):
    """Clicks the export button data-export=`what`; returns (file name, bytes)."""
    with page.expect_download() as info:
        frame.click(f"[data-export={what}]")
    result = info.value
    path = result.path()
    return result.suggested_filename, open(path, "rb").read()


# -- 1. color scales -----------------------------------------------------------------------------------

def test_ratio_measure_keeps_its_fixed_range_in_every_view_step_and_run(page, scale_tb, scale_logs):
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline", "contrast"], "nvi")
    for which in ("units", "training"):
        frame.wait_for_function(f"document.getElementById('tm-{which}-legend').dataset.kind === 'fixed'")
        assert {k: legend(frame, which)[k] for k in ("min", "max", "log", "kind")} == {"min": "0", "max": "1.2", "log": "false", "kind": "fixed"}
    frame.wait_for_function("document.querySelectorAll('canvas.tm-training-heatmap').length === 2")
    for selector in ("canvas.tm-heatmap", "canvas.tm-training-heatmap"):
        assert {(c["min"], c["max"], c["log"]) for c in canvases(frame, selector)} == {("0", "1.2", "false")}
    # the contrast run's nvi exceeds 1.2: over-range cells are orange, and the legend's "> 1.2" end says so
    colors = special_colors(frame)
    cells, pixels = check_cells(frame, scale_tb, "contrast", "nvi", 20)
    over = [pixel for (_, _, value, dead), pixel in zip(cells, pixels) if value > 1.2 and math.isfinite(value) and not dead]
    assert over and all(pixel == colors["over"] for pixel in over)
    assert legend(frame)["over"] == "true"
    assert frame.locator("#tm-units-legend .tm-legend-over.tm-active").inner_text() == "> 1.2"
    # another step, another run selection: the same range
    slide_to(frame, "Home")
    wait_for_units(frame, {"baseline": 0, "contrast": 0}, "nvi")
    check_cells(frame, scale_tb, "baseline", "nvi", 0)
    select_runs(frame, {"baseline"})
    wait_for_units(frame, {"baseline": 0}, "nvi")
    assert legend(frame)["max"] == "1.2" and canvases(frame, "canvas.tm-heatmap")[0]["max"] == "1.2"
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "scale-fixed-nvi.png"))


def test_unbounded_measure_range_covers_all_steps_and_is_shared_by_the_views(page, scale_tb):
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline", "peaking"], "tvi")
    assert frame.locator("#tm-log").is_enabled()
    expected = expected_data_max(scale_tb, ["baseline", "peaking"], "tvi", steps_loaded=[20])
    # step 10, not shown yet, sets the range: through its layer means, above every unit of the latest step
    latest = max(max(floats(layer["values"])) for layer in route_units(scale_tb, "peaking", "tvi", 20)["layers"])
    assert expected >= max(np.nanmax(rows(route_means(scale_tb, "peaking", "tvi"))[1]), 2 * latest)
    frame.wait_for_function(f"Number(document.getElementById('tm-units-legend').dataset.max) === {expected}")
    assert legend(frame)["kind"] == "data" and legend(frame)["min"] == "0"
    assert legend(frame, "training")["max"] == legend(frame)["max"]
    frame.wait_for_function(f"[...document.querySelectorAll('canvas.tm-training-heatmap')].filter((c) => Number(c.dataset.max) === {expected}).length === 2")
    assert {float(c["max"]) for c in canvases(frame, "canvas.tm-heatmap")} == {expected}
    # the rule is in the legend's tooltip
    assert "every logged step" in frame.locator("#tm-units-legend").get_attribute("title")
    # step 0: peaking's tvi is 100x smaller there than at step 10, the scale stays (a per-step scale jumped)
    slide_to(frame, "Home")
    wait_for_units(frame, {"baseline": 0, "peaking": 0}, "tvi")
    step0 = max(max(floats(layer["values"])) for layer in route_units(scale_tb, "peaking", "tvi", 0)["layers"])
    assert step0 < expected / 20
    assert float(legend(frame)["max"]) == expected
    assert {float(c["max"]) for c in canvases(frame, "canvas.tm-heatmap")} == {expected}
    check_cells(frame, scale_tb, "peaking", "tvi", 0)
    check_cells(frame, scale_tb, "baseline", "tvi", 0)
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "scale-data-tvi-step0.png"))


def test_log_scale_and_lock(page, scale_tb):
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline", "peaking"], "nvi")
    assert frame.locator("#tm-log").is_disabled()  # nvi has a natural range
    frame.select_option("#tm-measure", "tvi")
    wait_for_units(frame, {"baseline": 20, "peaking": 20}, "tvi")
    frame.locator("#tm-log").check()
    frame.wait_for_function("document.getElementById('tm-units-legend').dataset.log === 'true'")
    scale = legend(frame)
    low = float(scale["min"])
    assert low > 0 and math.isclose(math.log10(low), round(math.log10(low)))  # a power of ten
    assert legend(frame, "training")["log"] == "true"
    assert frame.locator("#tm-units-legend .tm-legend-under").count() == 1  # "< min" end on log scales
    check_cells(frame, scale_tb, "peaking", "tvi", 20)
    frame.locator("#tm-log").uncheck()
    frame.wait_for_function("document.getElementById('tm-units-legend').dataset.log === 'false'")
    # lock: the range stays when the run that set it is deselected and the step changes
    frame.wait_for_function("document.querySelectorAll('canvas.tm-training-heatmap').length === 2")
    locked = legend(frame)
    frame.locator("#tm-lock").check()
    frame.wait_for_function("document.getElementById('tm-units-legend').dataset.kind === 'locked'")
    assert frame.locator("#tm-log").is_disabled()
    select_runs(frame, {"baseline"})
    slide_to(frame, "Home")
    wait_for_units(frame, {"baseline": 0}, "tvi")
    assert (legend(frame)["min"], legend(frame)["max"]) == (locked["min"], locked["max"])
    assert canvases(frame, "canvas.tm-heatmap")[0]["max"] == locked["max"]
    check_cells(frame, scale_tb, "baseline", "tvi", 0)
    # unlocked, the range is baseline's own again: much smaller than peaking's
    frame.locator("#tm-lock").uncheck()
    frame.wait_for_function("document.getElementById('tm-units-legend').dataset.kind === 'data'")
    frame.wait_for_function(f"Number(document.getElementById('tm-units-legend').dataset.max) < {float(locked['max']) / 10}")


def test_dead_units_have_a_color_of_their_own_in_light_and_dark_mode(page, scale_tb):
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline"], "nvi")
    colors = special_colors(frame)
    dead_color = colors["dead"]
    ramp = frame.evaluate(f"""async () => {{
        const {{colorFor}} = {MODULE.format(name='colors')};
        return Array.from({{length: 201}}, (_, i) => colorFor(i / 200, {{min: 0, max: 1}}));
    }}""")

    def distance(a, b):
        return math.dist(a, b)

    # far from every colormap color (0 = invariant is near black), from the other special colors, and from
    # both backgrounds
    assert min(distance(dead_color, c) for c in ramp) > 100
    assert min(distance(dead_color, colors[k]) for k in ("nan", "inf", "over", "under")) > 100
    for background in ([255, 255, 255], [48, 48, 48], [0, 0, 0]):
        assert distance(dead_color, background) > 150
    for mode in ("light", "dark"):
        if mode == "dark":
            page.click("button[aria-label='Menu for changing light or dark theme']")
            page.click("[title='Force dark TensorBoard theme.']")
            frame.wait_for_function("document.body.classList.contains('tm-dark')")
            page.keyboard.press("Escape")
        cells, pixels = check_cells(frame, scale_tb, "baseline", "nvi", 20)
        dead = [pixel for cell, pixel in zip(cells, pixels) if cell[3]]
        assert dead and all(pixel == dead_color for pixel in dead)
        swatch = frame.locator("#tm-units-legend .tm-legend-item", has_text="dead unit").locator(".tm-legend-swatch")
        assert swatch.evaluate("(e) => getComputedStyle(e).backgroundColor") == "rgb({}, {}, {})".format(*dead_color)
        frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / f"dead-units-{mode}.png"))


def test_opening_the_tab_fetches_no_step_it_does_not_show(page, scale_tb):
    """The all-steps range comes from data the tab fetches anyway: one /units (latest step) and one
    /layer_means per selected run and measure, nothing per step."""
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    frame = open_tab(page, scale_tb)
    wait_for_units(frame, dict.fromkeys(RUNS, 20), "nvi")
    frame.wait_for_function("document.querySelectorAll('canvas.tm-training-heatmap').length === 4")
    frame.wait_for_timeout(500)
    units = [url for url in requests if f"{BASE}/units?" in url]
    means = [url for url in requests if f"{BASE}/layer_means?" in url]
    assert len(units) == 4 and all("step=" not in url for url in units), units
    assert len(means) == 4, means


# -- 2. layer names and filter -------------------------------------------------------------------------

def test_full_layer_names_with_module_types_and_the_layer_filter(page, scale_tb, scale_logs):
    _, records = scale_logs
    layers = next(e for e in scale_tb.json(f"{BASE}/runs")["runs"] if e["run"] == "deep")["layers"]
    assert any(len(layer["name"]) > 25 for layer in layers)
    frame = open_tab(page, scale_tb)
    choose(frame, ["deep"], "nvi")
    frame.wait_for_selector("canvas.tm-training-heatmap")

    def axis_labels(selector):
        """The labels' text as drawn (without their hover titles)."""
        return frame.locator(selector).evaluate_all(
            "(ts) => ts.map((t) => [...t.childNodes].filter((n) => n.nodeName !== 'title').map((n) => n.textContent).join(''))")

    full = [f"{layer['name']} {layer['module_type']}" for layer in layers]
    assert axis_labels("#tm-heatmaps text.tm-layer-label") == full
    assert axis_labels("#tm-training text.tm-layer-label") == full
    assert not any("\u2026" in text for text in axis_labels("#tm-units text, #tm-training text"))
    # every label lies inside its axis (the axis is as tall as the longest name) and inside the page
    inside = frame.evaluate("""() => [...document.querySelectorAll("#tm-heatmaps svg.tm-heatmap-axis")].every((axis) => {
        const box = axis.getBoundingClientRect();
        return [...axis.querySelectorAll("text")].every((t) => {
            const r = t.getBoundingClientRect();
            return r.top >= box.top - 1 && r.bottom <= box.bottom + 1 && r.left >= 0;
        });
    })""")
    assert inside
    assert frame.evaluate("""() => [...document.querySelectorAll("#tm-training text.tm-layer-label")].every(
        (t) => t.getBoundingClientRect().left >= t.closest("figure").getBoundingClientRect().left - 1)""")
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "layer-names.png"))

    def shown_everywhere():
        """The layers each view shows: heatmap columns, training heatmap rows, profile points."""
        return {
            "units": axis_labels("#tm-heatmaps text.tm-layer-label"),
            "training": axis_labels("#tm-training text.tm-layer-label"),
            "profile": frame.locator("#tm-profile path.tm-line").get_attribute("d").count("L") + 1,
        }

    # a regular expression
    frame.fill("#tm-layer-filter", r"/^features\..*convolution/")
    convolutions = [text for text in full if "convolution" in text]
    assert len(convolutions) == 2
    frame.wait_for_function("document.querySelectorAll('#tm-heatmaps text.tm-layer-label').length === 2")
    frame.wait_for_function("document.querySelectorAll('#tm-training text.tm-layer-label').length === 2")
    frame.wait_for_function("document.querySelector('#tm-profile path.tm-line').getAttribute('d').split('L').length === 2")
    assert shown_everywhere() == {"units": convolutions, "training": convolutions, "profile": 2}
    assert frame.locator("#tm-layer-count").inner_text() == f"2 of {len(layers)} layers"
    # the curves get the same layers: the layer means they were drawn from, exported
    _, body = download(page, frame, "curves-json")
    assert [layer["name"] for layer in json.loads(body)["runs"][0]["layers"]] == [text.split(" ")[0] for text in convolutions]
    # a substring (any case), here of module types too
    frame.fill("#tm-layer-filter", "LINEAR")
    frame.wait_for_function("[...document.querySelectorAll('#tm-heatmaps text.tm-layer-label')].map((t) => t.dataset.layer).join() "
                            "=== 'classifier.hidden_projection,classifier.output_projection'")
    assert all(text.endswith(" Linear") for text in axis_labels("#tm-heatmaps text.tm-layer-label"))
    # an invalid regular expression is matched as text and marked, nothing breaks
    frame.fill("#tm-layer-filter", "/conv(/")
    frame.wait_for_selector("#tm-layer-filter.tm-invalid")
    frame.wait_for_function("document.getElementById('tm-layer-count').textContent.startsWith('0 of')")
    # hide activation / normalization layers: every view loses them
    frame.fill("#tm-layer-filter", "")
    frame.wait_for_selector("#tm-layer-filter:not(.tm-invalid)")
    frame.locator("#tm-hide-activations").check()
    kept = [f"{layer['name']} {layer['module_type']}" for layer in layers
            if layer["module_type"] not in {"ReLU", "GELU", "SiLU", "BatchNorm2d", "Dropout"}]
    assert 0 < len(kept) < len(full)
    frame.wait_for_function(f"document.querySelectorAll('#tm-training text.tm-layer-label').length === {len(kept)}")
    frame.wait_for_function(f"document.querySelector('#tm-profile path.tm-line').getAttribute('d').split('L').length === {len(kept)}")
    assert shown_everywhere() == {"units": kept, "training": kept, "profile": len(kept)}
    frame.locator("#tm-training-section").screenshot(path=str(ARTIFACTS / "layers-hidden.png"))


# -- 3. URL state --------------------------------------------------------------------------------------

def check_restored(frame, locked):
    wait_for_units(frame, {"baseline": 10, "peaking": 10}, "tvi")
    assert frame.locator("#tm-measure").input_value() == "tvi"
    assert frame.locator("#tm-step-value").inner_text() == "step 10"
    assert frame.locator("input[name=tm-x-axis][value=depth]").is_checked()
    assert {t.get_attribute("data-run") for t in frame.locator("input.tm-run-toggle").all() if t.is_checked()} == {"baseline", "peaking"}
    assert frame.locator("#tm-lock").is_checked() and frame.locator("#tm-log").is_checked()
    assert frame.locator("#tm-layer-filter").input_value() == "/^[0-9]+$/"
    assert frame.locator("#tm-hide-activations").is_checked()
    scale = legend(frame)
    assert (scale["kind"], scale["min"], scale["max"], scale["log"]) == ("locked", locked["min"], locked["max"], "true")
    frame.wait_for_selector("#tm-profile text:text-is('100%')")


def test_state_survives_a_reload_and_a_shared_link(page, browser, scale_tb):  # noqa: F811
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline", "peaking"], "tvi")
    frame.locator("#tm-log").check()
    slide_to(frame, "Home")
    slide_to(frame, "ArrowRight")
    wait_for_units(frame, {"baseline": 10, "peaking": 10}, "tvi")
    frame.locator("input[name=tm-x-axis][value=depth]").check()
    frame.fill("#tm-layer-filter", "/^[0-9]+$/")
    frame.locator("#tm-hide-activations").check()
    frame.wait_for_function("document.getElementById('tm-units-legend').dataset.log === 'true'")
    frame.locator("#tm-lock").check()
    locked = legend(frame)
    page.wait_for_function("['lock', 'hide', 'filter'].every((key) => location.hash.includes(`p.tm_invariance.${key}=`))")
    params = hash_params(page)
    assert params == {
        "measure": "tvi", "runs": '["baseline","peaking"]', "step": "10", "axis": "depth", "lock": f"{locked['min']},{locked['max']}",
        "log": "1", "filter": "/^[0-9]+$/", "hide": "1",
    }
    assert page.evaluate("location.hash").startswith("#tm_invariance&")  # TensorBoard's own tab token kept
    link = page.url
    page.reload()
    frame = page.wait_for_selector("iframe").content_frame()
    check_restored(frame, locked)
    assert page.url == link
    # a shared link, in a new browser context
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        other = context.new_page()
        other.goto(link)
        check_restored(other.wait_for_selector("iframe").content_frame(), locked)
    finally:
        context.close()


def test_reference_run_and_unknown_values_in_the_url(page, scale_tb):
    """`reference` (the run the difference view compares with) is read from and written back to the URL;
    unknown runs and measures fall back to the defaults."""
    page.goto(f"{scale_tb.url}/#tm_invariance&p.tm_invariance.reference=%22peaking%22&p.tm_invariance.measure=nvi"
              f"&p.tm_invariance.runs=%5B%22deep%22%2C%22gone%22%5D")
    frame = page.wait_for_selector("iframe").content_frame()
    wait_for_units(frame, {"deep": 20}, "nvi")
    frame.select_option("#tm-measure", "svi")
    page.wait_for_function("location.hash.includes('p.tm_invariance.measure=svi')")
    assert hash_params(page)["reference"] == '"peaking"'
    assert hash_params(page)["runs"] == '["deep"]'
    page.goto("about:blank")  # a new document: a change of the hash alone would not reload TensorBoard
    page.goto(f"{scale_tb.url}/#tm_invariance&p.tm_invariance.measure=nope&p.tm_invariance.runs=%5B%22gone%22%5D&p.tm_invariance.step=x")
    frame = page.wait_for_selector("iframe").content_frame()
    wait_for_units(frame, dict.fromkeys(RUNS, 20), "nvi")
    assert frame.locator("#tm-step-value").inner_text() == "step 20 (latest)"


def test_state_in_the_iframe_url_outside_tensorboard(page, scale_tb):
    """The tab opened on its own (no TensorBoard page around it) keeps the same keys in its own hash."""
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204))  # asked for by a top-level page only
    page.goto(f"{scale_tb.url}/data/plugin_entry.html?name=tm_invariance#p.tm_invariance.measure=svi&p.tm_invariance.runs=%5B%22baseline%22%5D")
    wait_for_units(page.main_frame, {"baseline": 20}, "svi")
    page.main_frame.locator("input[name=tm-x-axis][value=depth]").check()
    page.wait_for_function("location.hash.includes('p.tm_invariance.axis=depth')")
    page.reload()
    wait_for_units(page.main_frame, {"baseline": 20}, "svi")
    assert page.main_frame.locator("input[name=tm-x-axis][value=depth]").is_checked()


# -- 4. exports ----------------------------------------------------------------------------------------

def parse_csv(body):
    return list(csv.DictReader(io.StringIO(body.decode("utf-8"))))


def close(a, b):
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def test_data_exports_hold_what_the_sdk_logged(page, scale_tb, scale_logs):
    _, records = scale_logs
    runs = ["baseline", "deep"]
    frame = open_tab(page, scale_tb)
    choose(frame, runs, "nvi")
    slide_to(frame, "Home")
    slide_to(frame, "ArrowRight")
    wait_for_units(frame, dict.fromkeys(runs, 10), "nvi")
    frame.wait_for_function("document.querySelectorAll('canvas.tm-training-heatmap').length === 2")

    # units of the step shown: every run, layer, unit, value and dead flag
    name, body = download(page, frame, "units-csv")
    assert name == "invariance-units-nvi-step10.csv"
    table = parse_csv(body)
    _, body = download(page, frame, "units-json")
    document = json.loads(body)
    assert document["measure"] == "nvi" and [r["run"] for r in document["runs"]] == runs
    expected_rows = 0
    for run in runs:
        result = records[run][10]
        dead = {layer["name"]: set(layer["dead"]) for layer in route_units(scale_tb, run, "nvi", 10)["layers"]}
        got = [row for row in table if row["run"] == run]
        from_json = next(r for r in document["runs"] if r["run"] == run)
        assert from_json["step"] == 10 and [layer["name"] for layer in from_json["layers"]] == result.layers_of("nvi")
        for layer in from_json["layers"]:
            logged = result.get("nvi", layer["name"])
            assert all(close(v, w) for v, w in zip(layer["values"], logged)) and len(layer["values"]) == logged.size
            assert set(layer["dead"]) == dead[layer["name"]]
            expected_rows += logged.size
            for row in (row for row in got if row["layer"] == layer["name"]):
                u = int(row["unit"])
                assert row["step"] == "10" and row["measure"] == "nvi" and row["module_type"] == layer["module_type"]
                assert close(row["value"], logged[u]) and row["dead"] == str(int(u in dead[layer["name"]]))
    assert len(table) == expected_rows
    assert any(row["dead"] == "1" for row in table)

    # the layer profile at the step: layer means over live units
    _, body = download(page, frame, "profile-csv")
    table = parse_csv(body)
    _, body = download(page, frame, "profile-json")
    document = json.loads(body)
    for run in runs:
        means = records[run][10].layer_means("nvi")
        assert {row["layer"]: float(row["mean"]) for row in table if row["run"] == run}.keys() == means.keys()
        assert all(close(row["mean"], means[row["layer"]]) for row in table if row["run"] == run)
        layers = next(r for r in document["runs"] if r["run"] == run)["layers"]
        assert [layer["name"] for layer in layers] == list(means) and all(close(layer["mean"], means[layer["name"]]) for layer in layers)

    # the layer means over steps
    _, body = download(page, frame, "curves-csv")
    table = parse_csv(body)
    assert len(table) == sum(len(STEPS) * len(records[run][0].layers_of("nvi")) for run in runs)
    for row in table:
        assert close(row["mean"], records[row["run"]][int(row["step"])].layer_means("nvi")[row["layer"]])
    _, body = download(page, frame, "curves-json")
    for run in json.loads(body)["runs"]:
        assert run["steps"] == STEPS
        for s, step in enumerate(STEPS):
            means = records[run["run"]][step].layer_means("nvi")
            assert all(close(value, means[layer["name"]]) for value, layer in zip(run["values"][s], run["layers"]))


def png_size(body):
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", body[16:24])
    chunk = body.index(b"pHYs")
    x, y, unit = struct.unpack(">IIB", body[chunk + 4:chunk + 13])
    assert unit == 1 and x == y == round(300 / 0.0254)  # 300 dpi
    return width, height


def svg_texts(body):
    root = ElementTree.fromstring(body)
    return root, " ".join(t.strip() for t in root.itertext() if t.strip())


@pytest.mark.parametrize("chart, title, legend_text", [
    ("units", "Units", "dead unit (no variance at all)"),
    ("profile", "Layer profile", "baseline"),
    ("accuracy", "Accuracy per transformation", "baseline"),
    ("curves", "Layer means during training", "first layer"),
    ("training", "Invariance during training", "mean nvi"),
])
def test_chart_images_at_print_resolution_with_title_and_legend(page, scale_tb, chart, title, legend_text):
    frame = open_tab(page, scale_tb)
    choose(frame, ["baseline", "deep"], "nvi")
    frame.wait_for_function("document.querySelectorAll('canvas.tm-training-heatmap').length === 2")
    frame.wait_for_selector("#tm-accuracy path.tm-line")
    name, body = download(page, frame, f"{chart}-svg")
    assert name.endswith(".svg")
    root, text = svg_texts(body)
    assert title in text and legend_text in text
    width, height = float(root.get("width")), float(root.get("height"))
    if chart in ("units", "training"):
        assert "1.2" in text and "> 1.2" in text  # the color scale's ends
        assert root.find(".//{http://www.w3.org/2000/svg}image") is not None
    _, body = download(page, frame, f"{chart}-png")
    assert png_size(body) == (math.floor(width * PRINT_RATIO + 0.5), math.floor(height * PRINT_RATIO + 0.5))  # JS Math.round
    (ARTIFACTS / f"export-{chart}.png").write_bytes(body)


# -- unit tests of the pure functions, in the page -----------------------------------------------------

def test_scale_rules(page, scale_tb):
    frame = open_tab(page, scale_tb)
    result = frame.evaluate("""async () => {
        const {dataRange, measureScale, fixedRange, logAllowed} = %s;
        const {valueSummary, colorFor, pixelColors, SPECIAL_COLORS} = %s;
        const summary = (values) => valueSummary([Float64Array.from(values)]);
        const units = summary(Array.from({length: 101}, (_, i) => i / 100 * 3));  // 0..3, P99 = 2.97
        const means = summary([0.5, 4.4, 1]);
        const pixel = pixelColors({min: 0, max: 1.2});
        const unpack = (p) => [p & 255, (p >> 8) & 255, (p >> 16) & 255];
        return {
            fixed: ["nvi", "nvse", "ee", "ie_t", "ee_t", "lie_rotation", "gf", "anova", "accuracy", "tvi", "anova_f"].map((m) => fixedRange(m)),
            log: ["tvi", "svi", "anova_f", "nvi", "anova"].map(logAllowed),
            unitsOnly: dataRange({units: [units]}),
            withMeans: dataRange({units: [units], means: [means]}),
            logRange: dataRange({units: [summary([0.0042, 0.1, 5])]}, true),
            empty: dataRange({}),
            locked: measureScale({measure: "tvi", lock: {measure: "tvi", min: 0, max: 7}, summaries: {means: [means], units: [units]}}),
            otherLock: measureScale({measure: "svi", lock: {measure: "tvi", min: 0, max: 7}, summaries: {means: [means], units: []}}).max,
            fixedScale: measureScale({measure: "nvi", log: true, summaries: {means: [], units: [summary([0.2, 1.5])]}}),
            colors: [colorFor(1.3, {min: 0, max: 1.2}), colorFor(-0.1, {min: 0, max: 1.2}), colorFor(0, {min: 0.01, max: 1, log: true}),
                     unpack(pixel(1.3)), unpack(pixel(1, true)), unpack(pixel(Infinity))],
            special: SPECIAL_COLORS,
        };
    }""" % (MODULE.format(name="scales"), MODULE.format(name="colors")))
    assert result["fixed"] == [[0, 1.2]] * 6 + [[0, 2], [0, 1], [0, 1], None, None]
    assert result["log"] == [True, True, True, False, False]
    assert result["unitsOnly"] == {"min": 0, "max": 3}  # 2.97 rounded up to two significant digits
    assert result["withMeans"] == {"min": 0, "max": 4.4}  # a layer mean above the units' percentile
    assert result["logRange"] == {"min": 0.001, "max": 5}  # P01 0.0059 down to a power of ten, P99 4.902 up
    assert result["empty"] == {"min": 0, "max": 1}
    locked = result["locked"]
    assert (locked["min"], locked["max"], locked["kind"], locked["over"]) == (0, 7, "locked", False)
    assert result["otherLock"] == 4.4
    fixed = result["fixedScale"]
    assert (fixed["min"], fixed["max"], fixed["log"], fixed["kind"], fixed["over"]) == (0, 1.2, False, "fixed", True)
    special = result["special"]
    assert result["colors"] == [special["over"], special["under"], special["under"], special["over"], special["dead"], special["inf"]]


def test_layer_filter_and_url_state_functions(page, scale_tb):
    frame = open_tab(page, scale_tb)
    result = frame.evaluate("""async () => {
        const {parseLayerFilter, isActivationOrNormalization, layerSelection, selectMeans} = %s;
        const state = %s;
        const {toCsv, exportNumber} = %s;
        const test = (text, name, type) => parseLayerFilter(text).test(name, type);
        const s = state.createState();
        state.applyParams(s, {measure: "tvi", runs: '["a", ["b", "ns"]]', step: "30", axis: "depth", reference: '"a"',
                              lock: "0,2.5", log: "0", filter: "/x/", hide: "1"});
        const params = state.stateToParams(s);
        const bad = state.createState();
        state.applyParams(bad, {runs: "{", step: "1e3", axis: "sideways", lock: "3,1", log: "1", reference: "[1]"});
        const logLock = state.createState();
        state.applyParams(logLock, {measure: "tvi", lock: "0,5", log: "1"});
        const means = {layers: ["conv", "relu", "fc"], steps: [0, 1], values: [Float32Array.of(1, 2, 3), Float32Array.of(4, 5, 6)]};
        const entry = {layers: [{name: "conv", moduleType: "Conv2d"}, {name: "relu", moduleType: "ReLU"}, {name: "fc", moduleType: "Linear"}]};
        const selection = layerSelection({layerFilter: "", hideActivations: true});
        const picked = selectMeans(means, entry, selection);
        return {
            regex: [test("/conv\\\\d/", "features.conv1", "Conv2d"), test("/conv\\\\d/", "features.conv", "Conv2d"),
                    test("/CONV/i", "conv", ""), test("/^fc$/", "x", "fc")],
            substring: [test("Conv", "features.conv1", ""), test("linear", "head", "Linear"), test("/conv(/", "a/conv(/b", "")],
            invalid: parseLayerFilter("/conv(/").error !== "",
            types: ["ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "BatchNorm2d", "LayerNorm", "GroupNorm", "Dropout", "Identity",
                    "Conv2d", "Linear", "MaxPool2d", "MultiheadAttention"].map(isActivationOrNormalization),
            params, selected: [...s.selected], reference: s.reference,
            bad: {selected: [...bad.selected], step: bad.step, axis: bad.xAxis, lock: bad.lock, reference: bad.reference},
            logLock: logLock.lock,
            hash: ((h) => ({tab: h.tab, params: Object.fromEntries(h.params)}))(state.parseHash("#tm_invariance&p.tm_invariance.filter=a%%26b%%3Dc&other=1")),
            formatted: state.formatHash({tab: "tm_invariance", params: new Map([["p.tm_invariance.filter", "a&b=c"], ["x", "1"]])}),
            picked: {layers: picked.layers, values: picked.values.map((row) => Array.from(row)), same: picked === selectMeans(means, entry, selection)},
            csv: toCsv(["a", "b"], [["x,y", 'say "hi"'], [" pad", exportNumber(0.1 + 0.2)], ["=1+1", exportNumber(NaN)]]),
            numbers: [exportNumber(Math.fround(0.1)), exportNumber(Infinity), exportNumber(-Infinity)],
        };
    }""" % (MODULE.format(name="layers"), MODULE.format(name="state"), MODULE.format(name="export")))
    assert result["regex"] == [True, False, True, True]
    assert result["substring"] == [True, True, True] and result["invalid"]
    assert result["types"] == [True] * 10 + [False] * 4
    assert result["params"] == {"measure": "tvi", "runs": '["a",["b","ns"]]', "step": "30", "axis": "depth",
                                "reference": '"a"', "lock": "0,2.5", "filter": "/x/", "hide": "1"}
    assert result["selected"] == ['["a","invariance"]', '["b","ns"]'] and result["reference"] == '["a","invariance"]'
    assert result["bad"] == {"selected": [], "step": None, "axis": "layer", "lock": None, "reference": None}
    assert result["logLock"] is None  # a log scale cannot start at 0
    assert result["hash"] == {"tab": "tm_invariance", "params": {"p.tm_invariance.filter": "a&b=c", "other": "1"}}
    assert result["formatted"] == "tm_invariance&p.tm_invariance.filter=a%26b%3Dc&x=1"
    assert result["picked"] == {"layers": ["conv", "fc"], "values": [[1, 3], [4, 6]], "same": True}
    assert result["csv"] == 'a,b\r\n"x,y","say ""hi"""\r\n" pad",0.3\r\n=1+1,NaN\r\n'
    assert result["numbers"] == [0.100000001, "Infinity", "-Infinity"]


# -- 5. layer names on the profile's axes, module types in tooltips, the remaining exports ----------------

def test_profile_depth_axis_names_layers_and_tooltips_give_module_types(page, scale_tb, scale_logs):
    _, records = scale_logs
    frame = open_tab(page, scale_tb)
    choose(frame, ["deep"], "nvi")
    layers = records["deep"][20].layers_of("nvi")
    for axis in ("depth", "layer"):
        frame.locator(f"input[name=tm-x-axis][value={axis}]").check()
        frame.wait_for_function("document.querySelectorAll('#tm-profile text.tm-layer-tick').length > 0")
        ticks = frame.evaluate("""() => [...document.querySelectorAll('#tm-profile text.tm-layer-tick')].map((t) => {
            const box = t.getBoundingClientRect();
            return {name: t.firstChild.data, layer: t.dataset.layer, x: Number(/translate\\(([-\\d.]+)/.exec(t.getAttribute('transform'))[1]),
                    bottom: box.bottom, svgBottom: t.ownerSVGElement.getBoundingClientRect().bottom};
        })""")
        names = [t["name"] for t in ticks]
        assert names == [t["layer"] for t in ticks]
        assert len(names) >= 2 and all(name in layers for name in names), names  # full names, in network order
        assert names == [name for name in layers if name in names]
        assert all(b["x"] - a["x"] >= 21 for a, b in zip(ticks, ticks[1:]))  # thinned: never overlapping
        assert all(t["bottom"] <= t["svgBottom"] + 0.5 for t in ticks)  # not cut off
        if axis == "depth":
            assert "50%" in frame.locator("#tm-profile text.tm-tick").all_text_contents()
    # the module type next to the layer name in the tooltips of the profile and the curves
    dot = frame.locator("#tm-profile .tm-dot").first
    name = dot.get_attribute("data-layer")
    dot.hover(force=True)
    tooltip = frame.locator("#tm-tooltip")
    tooltip.wait_for(state="visible")
    assert f"layer {name} (" in tooltip.inner_text()
    frame.wait_for_selector("#tm-curves canvas")
    overlay = frame.locator("#tm-curves svg").first
    box = overlay.bounding_box()
    overlay.hover(force=True, position={"x": box["width"] * 0.6, "y": box["height"] * 0.4})
    frame.wait_for_function("/layer .+ \\(\\w+\\)/.test(document.getElementById('tm-tooltip').innerText)")


def test_accuracy_training_exports(page, scale_tb):
    runs = ["baseline", "deep"]
    frame = open_tab(page, scale_tb)
    choose(frame, runs, "nvi")
    frame.wait_for_function("document.querySelectorAll('canvas.tm-accuracy-heatmap').length === 2")
    name, body = download(page, frame, "accuracy-training-csv")
    assert name == "invariance-accuracy-training.csv"
    table = parse_csv(body)
    _, body = download(page, frame, "accuracy-training-json")
    document = json.loads(body)
    assert [r["run"] for r in document["runs"]] == runs
    for run in document["runs"]:
        payload = scale_tb.json(f"{BASE}/accuracy?run={run['run']}&namespace=invariance")
        expected = rows(payload)
        assert run["steps"] == payload["steps"] and np.array(run["values"], dtype=float).shape == expected.shape
        assert all(close(v, w) for v, w in zip(np.array(run["values"], dtype=float).ravel(), expected.ravel()))
        got = [row for row in table if row["run"] == run["run"]]
        assert len(got) == expected.size
        for row in got:
            assert close(row["accuracy"], expected[payload["steps"].index(int(row["step"])), int(row["transformation_index"])])
            assert row["transformation"] == run["transformations"][int(row["transformation_index"])]
    name, body = download(page, frame, "accuracy-training-svg")
    root, text = svg_texts(body)
    assert "Accuracy during training" in text and "baseline" in text and "deep" in text
    assert root.find(".//{http://www.w3.org/2000/svg}image") is not None
    width, height = float(root.get("width")), float(root.get("height"))
    _, body = download(page, frame, "accuracy-training-png")
    assert png_size(body) == (math.floor(width * PRINT_RATIO + 0.5), math.floor(height * PRINT_RATIO + 0.5))


def test_unit_history_exports(page, scale_tb, scale_logs):
    _, records = scale_logs
    runs = ["baseline", "peaking"]
    frame = open_tab(page, scale_tb)
    choose(frame, runs, "nvi")
    layers = records["baseline"][0].layers_of("nvi")
    canvas = frame.locator("canvas.tm-heatmap[data-run=baseline]")
    canvas.click(position=canvas.evaluate("(c) => c.cellCenter(0, 1)"))
    frame.wait_for_function("document.querySelectorAll('#tm-unit-history-chart path.tm-unit-line').length === 2")
    layer = frame.locator(".tm-unit-history-name").inner_text().split(",")[0].removeprefix("layer ")
    assert layer in layers
    name, body = download(page, frame, "unit-history-csv")
    assert name.endswith(".csv") and "unit" in name
    table = parse_csv(body)
    assert len(table) == len(runs) * len(STEPS)
    for row in table:
        assert row["layer"] == layer and row["unit"] == "1" and row["measure"] == "nvi"
        assert close(row["value"], records[row["run"]][int(row["step"])].get("nvi", layer)[1])
    _, body = download(page, frame, "unit-history-json")
    document = json.loads(body)
    assert document["layer"] == layer and document["unit"] == 1 and [r["run"] for r in document["runs"]] == runs
    for run in document["runs"]:
        assert run["steps"] == STEPS
        assert all(close(v, records[run["run"]][step].get("nvi", layer)[1]) for v, step in zip(run["values"], STEPS))
    _, body = download(page, frame, "unit-history-svg")
    root, text = svg_texts(body)
    assert "Unit during training" in text and f"layer {layer}, unit 1" in text and "baseline" in text
    width, height = float(root.get("width")), float(root.get("height"))
    _, body = download(page, frame, "unit-history-png")
    assert png_size(body) == (math.floor(width * PRINT_RATIO + 0.5), math.floor(height * PRINT_RATIO + 0.5))
