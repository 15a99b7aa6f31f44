"""The Invariance tab's error views in a real browser: the error per transformation (against the rotation in
degrees, one line per layer, and the layer x transformation heatmap), the 2-D grid of a product set, and
the ±1 standard error bands of runs logged with error bars (a probe of 64 samples: 4 shards)."""
from __future__ import annotations

import pytest
import torch

import tm_tensorboard as tm
from models import small_cnn
from tensorboard_process import TensorBoard
from test_browser import ARTIFACTS, BASE, browser, open_tab, page, select_runs  # noqa: F401 (fixtures)

MEASURES = ("invariance", "equivariance_error", "per_transformation")
STEPS = [0, 5]
PROBE = 64


def write(rundir, transformations, seed):
    model = small_cnn(seed=seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(PROBE, 3, 8, 8, generator=g)
    with tm.Monitor(model, images, transformations, logdir=rundir, every=1, measures=MEASURES,
                    error_bars=True) as monitor:
        for step in STEPS:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.add_(0.05 * torch.randn_like(p))
            monitor.step(step)
    return model


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_errors") / "logs"
    write(root / "rot", tm.transforms.rotations(4), 0)
    write(root / "rot2", tm.transforms.rotations(4), 1)
    write(root / "product", tm.transforms.product(tm.transforms.rotations([0, 90, 180]), tm.transforms.scalings([1, 1.25]),
                                                       padding="zeros"), 2)
    return root


@pytest.fixture(scope="module")
def tensorboard(logs):
    with TensorBoard(logs, "--reload_interval=1") as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {e["run"] for e in p["runs"]} == {"rot", "rot2", "product"}
                    and all(e["max_step"] == STEPS[-1] for e in p["runs"]))
        yield tb


def test_error_per_rotation_in_degrees_with_bands_and_named_rows(page, tensorboard):
    payload = tensorboard.json(f"{BASE}/per_transformation?run=rot&namespace=invariance&measure=ie_t")
    assert payload["stderr"] is not None  # 64 samples: error bars
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"rot"})
    chart = frame.locator("#tm-pt svg.tm-pt-lines[data-run=rot]")
    chart.wait_for()
    labels = chart.locator("text.tm-axis-label").all_text_contents()
    assert "rotation (\u00b0)" in labels
    ticks = chart.locator("text.tm-tick").all_text_contents()
    assert all(tick in ticks for tick in ("0", "90", "180", "270"))
    assert chart.locator("path.tm-line").count() == len(payload["layers"])
    assert int(chart.get_attribute("data-bands")) > 0
    # the depth colors' legend names the first and last layers; hovering a line names its layer
    legend = frame.locator("#tm-pt figure[data-run=rot] .tm-pt-legend").text_content()
    assert legend.startswith(f"layer {payload['layers'][0]}") and legend.endswith(f"layer {payload['layers'][-1]}")
    chart.locator("circle.tm-dot").last.hover()
    assert chart.locator("text.tm-curve-label").text_content() == f"layer {payload['layers'][-1]}"
    page.mouse.move(0, 0)
    assert chart.locator("text.tm-curve-label").text_content() == ""
    rows = frame.locator("#tm-pt svg.tm-pt-heatmap[data-run=rot] g.tm-pt-row")
    assert rows.evaluate_all("(rows) => rows.map((r) => r.querySelector('text').textContent)") == payload["layers"]
    columns = frame.locator("#tm-pt svg.tm-pt-heatmap[data-run=rot] text.tm-pt-column").all_text_contents()
    assert columns == [t["label"] for t in payload["transformations"]]
    # ee_t through the selector
    frame.locator("#tm-pt-measure").select_option("ee_t")
    frame.wait_for_selector("#tm-pt-section .tm-heading-note:text-is('ee_t')")
    chart.wait_for()
    # the layer profile's ±1 standard error band, and the layer-mean curves' bands
    frame.wait_for_function("Number((document.querySelector('#tm-profile svg') || {dataset: {}}).dataset.seBands) === 1")
    assert frame.locator("#tm-profile path.tm-se-band[data-run=rot]").count() == 1
    frame.wait_for_function("Number((document.querySelector('#tm-curves canvas.tm-curves-canvas') || {dataset: {}}).dataset.bands) > 0")
    frame.locator("#tm-pt-section").screenshot(path=str(ARTIFACTS / "error-per-transformation.png"))


def test_product_set_is_a_grid_with_both_parameters(page, tensorboard):
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"product"})
    grids = frame.locator("#tm-pt svg.tm-pt-grid")
    grids.first.wait_for()
    layers = tensorboard.json(f"{BASE}/per_transformation?run=product&namespace=invariance&measure=ie_t")["layers"]
    assert grids.count() == len(layers)
    labels = grids.first.locator("text.tm-axis-label").all_text_contents()
    assert labels == ["rotation (\u00b0)", "scale (\u00d7)"]
    assert grids.first.locator("rect").count() == 6
    frame.locator("#tm-pt-layer").select_option(layers[-1])
    frame.wait_for_function("document.querySelectorAll('#tm-pt svg.tm-pt-grid').length === 1")
    assert grids.first.get_attribute("data-layer") == layers[-1]


def test_difference_marks_differences_beyond_two_standard_errors(page, tensorboard):
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"rot", "rot2"})
    frame.wait_for_function("document.querySelectorAll('#tm-profile path.tm-se-band').length === 2")
    frame.locator("#tm-reference").select_option(label="rot")
    frame.wait_for_function("document.querySelectorAll('#tm-profile circle.tm-dot[data-significant]').length > 0")
    marks = frame.locator("#tm-profile circle.tm-dot[data-significant]").evaluate_all(
        "(dots) => dots.map((d) => d.dataset.significant)")
    assert set(marks) <= {"true", "false"}
    assert frame.locator("#tm-profile text.tm-chart-note").first.text_content().startswith("filled:")


def test_error_per_transformation_exports(page, tensorboard):
    import csv
    import io
    import json
    import math
    import struct
    import xml.etree.ElementTree as ElementTree

    import numpy as np
    from logs import floats

    payload = tensorboard.json(f"{BASE}/per_transformation?run=rot&namespace=invariance&measure=ie_t")
    shape = (len(payload["layers"]), len(payload["transformations"]))

    def matrix(values):
        return (floats(values) if isinstance(values, str) else np.array(values, dtype=float)).reshape(shape)

    expected = matrix(payload["values"])
    stderr = matrix(payload["stderr"]["values"] if isinstance(payload["stderr"], dict) else payload["stderr"])
    frame = open_tab(page, tensorboard)
    select_runs(frame, {"rot"})
    frame.locator("#tm-pt svg.tm-pt-lines[data-run=rot]").wait_for()

    def download(what):
        with page.expect_download() as info:
            frame.click(f"[data-export={what}]")
        return info.value.suggested_filename, open(info.value.path(), "rb").read()

    def close(a, b):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)

    name, body = download("per-transformation-csv")
    assert name == "invariance-per-transformation-ie_t.csv"
    table = list(csv.DictReader(io.StringIO(body.decode("utf-8"))))
    assert len(table) == expected.size
    for row in table:
        assert row["run"] == "rot" and row["measure"] == "ie_t" and int(row["step"]) == payload["step"]
        l, t = payload["layers"].index(row["layer"]), int(row["transformation_index"])
        assert row["transformation"] == payload["transformations"][t]["label"]
        assert close(row["value"], expected[l, t]) and close(row["stderr"], stderr[l, t])
    _, body = download("per-transformation-json")
    document = json.loads(body)
    run = document["runs"][0]
    assert document["measure"] == "ie_t" and run["run"] == "rot" and [layer["name"] for layer in run["layers"]] == payload["layers"]
    assert all(close(v, w) for v, w in zip(np.array(run["values"], dtype=float).ravel(), expected.ravel()))
    _, body = download("per-transformation-svg")
    root = ElementTree.fromstring(body)
    text = " ".join(t.strip() for t in root.itertext() if t.strip())
    assert "Error per transformation" in text and "rotation (\u00b0)" in text
    width, height = float(root.get("width")), float(root.get("height"))
    _, body = download("per-transformation-png")
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", body[16:24]) == (math.floor(width * 300 / 96 + 0.5), math.floor(height * 300 / 96 + 0.5))
    (ARTIFACTS / "export-per-transformation.png").write_bytes(body)
