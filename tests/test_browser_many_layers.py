"""The Invariance tab with a 158-layer run (issue 18): ResNet-50's real layer names, logged by the SDK's Monitor
(``dedupe_batchnorm=False``: its 53 BatchNorms too), stay readable in a real browser (Debian's Chromium driven
by playwright, a real TensorBoard): the labels drawn are full names with their module types, none cut off,
none overlapping, and the layer filter narrows the heatmaps until every name of a stage is drawn. (Timings
of the tab on such a run: ``benchmarks/bench_frontend.py`` on ``large_log.py --model resnet50``.)"""
from __future__ import annotations

import pytest
import torch

import tm_tensorboard as tm
from tensorboard_process import TensorBoard
from test_browser import ARTIFACTS, BASE, browser, open_tab, page, pytestmark, wait_for_heatmaps  # noqa: F401 (fixtures)
from tm_tensorboard.examples.models import ResNet50

RUN = "resnet50"
STEPS = [0, 1]


@pytest.fixture(scope="module")
def many_layers_tb(tmp_path_factory):
    """A TensorBoard on one run of ResNet-50 (narrow, 32 px: the layers of the ImageNet model, small)."""
    root = tmp_path_factory.mktemp("many_layers") / "logs"
    torch.manual_seed(0)
    model = ResNet50(3, 10, width=0.125)
    probe = torch.rand(6, 3, 32, 32)
    with tm.Monitor(model, probe, tm.transforms.rot90(), logdir=root / RUN, every=1, measures=("invariance",),
                    compile=False, dedupe_batchnorm=False) as monitor:
        for step in STEPS:
            monitor.step(step)
    with TensorBoard(root) as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: [(e["run"], e["max_step"]) for e in p["runs"]] == [(RUN, STEPS[-1])])
        yield tb


def drawn_labels(frame, selector: str) -> list[dict]:
    """The layer labels drawn under `selector`: their text as drawn (without the hover title), the layer, the
    hover title and their box, in order."""
    return frame.locator(selector).evaluate_all(
        """(labels) => labels.map((t) => {
            const r = t.getBoundingClientRect();
            return {text: [...t.childNodes].filter((n) => n.nodeName !== "title").map((n) => n.textContent).join(""),
                    layer: t.dataset.layer, title: t.querySelector("title").textContent,
                    left: r.left, right: r.right, top: r.top, bottom: r.bottom};
        })""")


def check_readable(labels: list[dict], full: dict[str, str], axis: str) -> None:
    """Every label drawn is the layer's full name and module type, in network order, without overlapping."""
    assert labels, axis
    order = list(full)
    for label in labels:
        assert label["text"] == full[label["layer"]] and "\u2026" not in label["text"], label
        assert label["title"].startswith(label["layer"] + " ("), label
    assert [order.index(label["layer"]) for label in labels] == sorted(order.index(label["layer"]) for label in labels)
    key = ("left", "right") if axis == "columns" else ("top", "bottom")  # rotated under columns, stacked by rows
    for before, after in zip(labels, labels[1:]):
        assert before[key[1]] <= after[key[0]] + 0.5, (before, after)


def test_158_layer_names_stay_readable_and_the_filter_narrows_them(page, many_layers_tb):
    layers = many_layers_tb.json(f"{BASE}/runs")["runs"][0]["layers"]
    full = {layer["name"]: f"{layer['name']} {layer['module_type']}" for layer in layers}
    assert len(full) == 158 and list(full)[-3:] == ["stages.3.2.relu3", "pool", "classifier.1"]
    assert sum(layer["module_type"] == "BatchNorm2d" for layer in layers) == 53
    frame = open_tab(page, many_layers_tb)
    wait_for_heatmaps(frame, {RUN: STEPS[-1]})
    frame.wait_for_selector("#tm-training text.tm-layer-label")
    assert frame.locator("#tm-layer-count").inner_text() == "158 of 158 layers"

    # all 158 columns: as many full names as fit without overlapping (every n-th), each inside its axis
    columns = drawn_labels(frame, "#tm-heatmaps text.tm-layer-label")
    check_readable(columns, full, "columns")
    assert len(columns) >= 158 // 2 and columns[0]["layer"] == "stem.0"
    assert frame.evaluate("""() => [...document.querySelectorAll("#tm-heatmaps svg.tm-heatmap-axis")].every((axis) => {
        const box = axis.getBoundingClientRect();
        return [...axis.querySelectorAll("text")].every((t) => {
            const r = t.getBoundingClientRect();
            return r.top >= box.top - 1 && r.bottom <= box.bottom + 1 && r.left >= 0 && r.right <= innerWidth;
        });
    })""")
    assert frame.locator("canvas.tm-heatmap").evaluate("(c) => c.getBoundingClientRect().right <= innerWidth")
    check_readable(drawn_labels(frame, "#tm-training text.tm-layer-label"), full, "rows")
    frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "many-layers.png"))

    # the filter narrows the heatmaps to a stage, and then every one of its names is drawn in full
    stages = {"stem": [name for name in full if name.startswith("stem.")],
              "stages.3.": [name for name in full if name.startswith("stages.3.")],
              "/^stages\\.0\\.[12]\\./": [name for name in full if name.startswith(("stages.0.1.", "stages.0.2."))],
              "/^(pool|classifier)/": ["pool", "classifier.1"]}
    wide = frame.locator("canvas.tm-heatmap").evaluate("(c) => c.getBoundingClientRect().width")
    for pattern, names in stages.items():
        frame.fill("#tm-layer-filter", pattern)
        frame.wait_for_function("(names) => [...document.querySelectorAll('#tm-heatmaps text.tm-layer-label')]"
                                ".map((t) => t.dataset.layer).join() === names.join()", arg=names)
        assert frame.locator("#tm-layer-count").inner_text() == f"{len(names)} of 158 layers"
        check_readable(drawn_labels(frame, "#tm-heatmaps text.tm-layer-label"), full, "columns")
        assert [label["text"] for label in drawn_labels(frame, "#tm-heatmaps text.tm-layer-label")] == \
            [full[name] for name in names]
        narrowed = frame.locator("canvas.tm-heatmap").evaluate("(c) => c.getBoundingClientRect().width")
        assert narrowed < wide, pattern
        frame.wait_for_function("(n) => document.querySelectorAll('#tm-training text.tm-layer-label').length <= n",
                                arg=len(names))
        check_readable(drawn_labels(frame, "#tm-training text.tm-layer-label"), full, "rows")
        if pattern == "stages.3.":  # the last stage, its last bottleneck's names included
            assert "stages.3.2.relu3 ReLU" in [full[name] for name in names]
            frame.locator("#tm-units").screenshot(path=str(ARTIFACTS / "many-layers-filtered.png"))
