"""Regenerate docs/invariance-tab.png: the Invariance tab on the demo's three runs (a CNN trained on upright
glyphs, the same CNN trained on randomly rotated ones, and the p4 group-equivariant CNN).

    python docs/make_screenshot.py          # a few minutes on a 2-core CPU

Needs the test extras (playwright) and Debian's Chromium at /usr/bin/chromium (never `playwright install`).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from tm_tensorboard.demo import RUNS, write_demo_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tensorboard_process import TensorBoard  # noqa: E402

OUTPUT = ROOT / "docs" / "invariance-tab.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(logdir: Path) -> None:
    from playwright.sync_api import sync_playwright

    with TensorBoard(logdir) as tb, sync_playwright() as playwright:
        tb.wait_for("/data/plugin/tm_invariance/runs", lambda p: len(p["runs"]) == len(RUNS))
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(f"{tb.url}/#tm_invariance")
        page.wait_for_selector("iframe")
        frame = next(f for f in page.frames if "plugin_entry.html" in f.url)
        frame.wait_for_function(
            f"document.querySelectorAll('canvas.tm-heatmap[data-step]').length === {len(RUNS)}"
            f" && document.querySelectorAll('#tm-profile path.tm-line').length === {len(RUNS)}"
        )
        page.screenshot(path=str(OUTPUT), type="png")
        browser.close()


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "runs"
        write_demo_logs(logdir)
        screenshot(logdir)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
