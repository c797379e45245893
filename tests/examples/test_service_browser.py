"""The dashboard in a real headless browser (Playwright driving Debian's chromium).

Needs the ``playwright`` package and ``/usr/bin/chromium`` (scripts/test.sh installs it with apt
when it can); without them the test is skipped, saying which is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from service_helpers import AUTH, TOKEN, live_server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_dashboard_shows_live_curve_and_cancels(tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    with (
        live_server(tmp_path) as (url, _),
        httpx.Client(base_url=url, timeout=30) as client,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            spec = {"dataset": "digits", "hidden": 16, "epochs": 10_000}
            job_id = client.post("/jobs", json=spec, headers=AUTH).json()["id"]
            # The token travels in the fragment, which browsers never send to the server.
            page.goto(f"{url}/#token={TOKEN}")
            row = page.locator(f'tr[data-id="{job_id}"]')
            row.wait_for(timeout=15_000)
            # The dashboard follows the running job: its curve grows with each epoch's event.
            page.wait_for_function(
                "document.querySelector('#chart').dataset.points >= 3", timeout=15_000
            )
            points = page.locator("#train-line").get_attribute("points") or ""
            assert len(points.split()) >= 3
            page.wait_for_function(
                "(n) => document.querySelector('#chart').dataset.points > n",
                arg=len(points.split()),
                timeout=15_000,
            )
            row.locator("button.cancel").click()
            page.locator(f'tr[data-id="{job_id}"] td.state', has_text="cancelled").wait_for(
                timeout=15_000
            )
        finally:
            browser.close()
        status = client.get(f"/jobs/{job_id}", headers=AUTH).json()
    assert status["state"] == "cancelled"
    assert (tmp_path / f"{job_id}.pt").is_file()
