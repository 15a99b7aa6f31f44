"""End to end: a real TensorBoard process (Rust data server and Python reader) serves the SDK's logs."""
from __future__ import annotations

import time
from urllib.parse import quote

import numpy as np
import pytest

from logs import floats, rows
from logwriter import write_run
from tensorboard_process import TensorBoard

STEPS = list(range(0, 160))
BASE = "/data/plugin/tm_invariance"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "logs"
    records = write_run(root / "long", STEPS)
    write_run(root / XSS, [0, 1], seed=1, measures=("invariance",))
    (root / "broken").mkdir()
    (root / "broken" / "events.out.tfevents.1.broken").write_bytes(b"\x00\x01garbage" * 100)
    (root / "empty").mkdir()
    (root / "empty" / "events.out.tfevents.1.empty").write_bytes(b"")
    return root, records


def q(text: str) -> str:
    return quote(text, safe="")


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_real_tensorboard_serves_every_step_and_live_updates(logdir, load_fast):
    root, records = logdir
    with TensorBoard(root, f"--load_fast={load_fast}", "--reload_interval=1") as tb:
        listing = tb.wait_for("/data/plugins_listing", lambda p: p.get("tm_invariance", {}).get("enabled"))
        assert listing["tm_invariance"]["tab_name"] == "Invariance"
        # every written step comes back (TensorBoard's default sampling would keep 10 or 100)
        means = tb.wait_for(
            f"{BASE}/layer_means?run=long&namespace=invariance&measure=nvi", lambda p: set(STEPS) <= set(p["steps"])
        )
        assert means["steps"][: len(STEPS)] == STEPS
        # the two routes agree once the reader has loaded every file (the Python reader loads them in turn, and
        # the load_fast=true case left a second file, step 1000, in the run)
        for _ in range(120):
            runs = tb.wait_for(f"{BASE}/runs", lambda p: {e["run"] for e in p["runs"]} >= {"long", XSS})["runs"]
            long = next(e for e in runs if e["run"] == "long")
            means = tb.json(f"{BASE}/layer_means?run=long&namespace=invariance&measure=nvi")
            if long["max_step"] == means["steps"][-1]:
                break
            time.sleep(0.5)
        assert long["max_step"] == means["steps"][-1] and long["measures"][:3] == ["tvi", "svi", "nvi"]
        np.testing.assert_allclose(rows(means)[means["steps"].index(57)], list(records[57].layer_means("nvi").values()), rtol=1e-6)
        units = tb.json(f"{BASE}/units?run=long&namespace=invariance&measure=nvse&step=57")
        assert units["steps"] == means["steps"] and units["step"] == 57
        for layer in units["layers"]:
            np.testing.assert_allclose(floats(layer["values"]), records[57].get("nvse", layer["name"]), rtol=1e-6)
        accuracy = tb.json(f"{BASE}/accuracy?run=long&namespace=invariance")
        assert accuracy["steps"] == means["steps"]
        assert tb.json(f"{BASE}/units?run={q(XSS)}&namespace=invariance&measure=nvi")["run"] == XSS
        assert tb.get(f"{BASE}/units?run=long&namespace=invariance&measure=nvi&step=999")[0] == 404
        assert tb.get(f"{BASE}/units?run=long&namespace=invariance&measure=nvi&step=abc")[0] == 400
        assert tb.get(f"{BASE}/static/..%2F..%2Fsetup.py")[0] == 404
        status, script = tb.get(f"{BASE}/index.js")
        assert status == 200 and b"render" in script

        # live: a new measurement written while TensorBoard runs is picked up on reload
        extra = 1000 + (0 if load_fast == "true" else 1)
        write_run(root / "long", [extra])
        tb.wait_for(f"{BASE}/layer_means?run=long&namespace=invariance&measure=nvi", lambda p: extra in p["steps"])
        tb.wait_for(f"{BASE}/units?run=long&namespace=invariance&measure=nvi", lambda p: p["step"] == extra)
        assert tb.get("/data/plugins_listing")[0] == 200  # still serving


def test_behind_path_prefix(logdir):
    root, _ = logdir
    with TensorBoard(root, "--path_prefix=/tb/sub", "--load_fast=true") as tb:
        assert tb.url.endswith("/tb/sub")
        tb.wait_for("/data/plugins_listing", lambda p: p.get("tm_invariance", {}).get("enabled"))
        runs = tb.wait_for(f"{BASE}/runs", lambda p: any(e["run"] == "long" for e in p["runs"]))
        assert runs["runs"]
        status, script = tb.get(f"{BASE}/index.js")
        assert status == 200
        # the frontend uses relative URLs only, so it works under any prefix
        assert b'"/data' not in script and b"'/data" not in script
