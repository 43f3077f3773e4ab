"""The report in a real browser: headless Chromium renders every figure, with no console error.

The report carries a tiny script that, on load, writes each image's naturalWidth and any script
error into ``#render-status``; ``--dump-dom`` prints the DOM after that ran, and Chromium's log
(``--enable-logging=stderr``) shows console messages. Skipped where no Chromium is installed.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from initlab.lab.config import load_experiment, with_overrides
from initlab.lab.run import run_experiment

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium/Chrome browser installed")


def render(page: Path, profile: Path) -> tuple[dict, list[str]]:
    """Open ``page`` headless; return the status the page wrote and the console lines of the log."""
    proc = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=90)
    m = re.search(r'<pre id="render-status"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no DOM came back (rc {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    raw = html.unescape(m.group(1)).strip()
    assert raw, "the page's load handler did not run"
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return json.loads(raw), console


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    exp = with_overrides(load_experiment("smoke"), {"train.steps": 10, "train.log_every": 5})
    out = tmp_path_factory.mktemp("browser") / "run"
    summary = run_experiment(exp, out)
    assert summary.report is not None
    return summary.report


def test_report_renders_every_image_without_console_errors(report, tmp_path):
    status, console = render(report, tmp_path / "profile")
    assert status["loaded"] is True
    images = status["images"]
    assert len(images) == len(list((report.parent / "figures").glob("*.png"))) == 4
    for im in images:
        assert im["complete"] and im["naturalWidth"] > 0 and im["naturalHeight"] > 0, im
    assert status["errors"] == []
    assert console == []


def test_the_browser_check_catches_broken_pages(report, tmp_path):
    # negative control: a broken image and a throwing script must be seen
    bad = tmp_path / "bad.html"
    text = report.read_text(encoding="utf-8")
    text = text.replace("<h1>", '<img src="data:image/png;base64,AAAA" alt="broken">'
                                '<script>undefinedFunction();</script><h1>', 1)
    bad.write_text(text, encoding="utf-8")
    status, console = render(bad, tmp_path / "profile")
    assert any(im["naturalWidth"] == 0 for im in status["images"])
    assert status["errors"] and any("undefinedFunction" in line for line in console)
