"""A live local swarm (``python -m peer.swarm``) and a real headless browser looking at its dashboard.

Shared by ``tests/test_dashboard.py`` (the browser test) and ``docs/make_screenshot.py`` (the README's
picture). The browser is Debian's Chromium driven by selenium through Debian's chromedriver (selenium's
own driver download cannot work offline); ``.ci/run`` installs both packages.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from peer.app.swarm import free_port

ROOT = Path(__file__).resolve().parents[1]


def chromium_paths() -> tuple[str, str] | None:
    """``(chromium binary, chromedriver)`` if both are installed, else None."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


class LocalSwarm:
    """``python -m peer.swarm`` with ``flags`` as a child process; its stdout lines collect in :attr:`lines`."""

    def __init__(self, *flags: str, port: int | None = None):
        self.port = port or free_port(0)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen([sys.executable, "-m", "peer.swarm", "--dashboard-port", str(self.port), *flags],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def api(self, section: str) -> dict:
        with urllib.request.urlopen(f"{self.url}api/{section}", timeout=5) as reply:
            return json.load(reply)

    def wait_api(self, section: str, predicate, timeout: float) -> dict:
        """Poll ``/api/<section>`` until ``predicate(json)`` holds; AssertionError with the last value if not."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the swarm exited with {self.proc.returncode}:\n" + "\n".join(self.lines[-30:]))
            try:
                last = self.api(section)
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"/api/{section} never satisfied the check in {timeout:.0f} s; last: {str(last)[:800]}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: the launcher stops its peers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def browse(url: str, screenshot: Path, *, min_peers: int, timeout: float = 60.0) -> dict:
    """Load the dashboard in headless Chromium until it shows ``min_peers`` peers, hosted experts and a loss
    chart with points; save a PNG to ``screenshot``. Returns what the page showed (counts read from the DOM)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        deadline, seen = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            seen = {
                "title": driver.title,
                "peers": len(driver.find_elements(By.CSS_SELECTOR, "tr.peer")),
                "expert_cells": len(driver.find_elements(By.CSS_SELECTOR, "td.expert")),
                "hosted_cells": len(driver.find_elements(By.CSS_SELECTOR, "td.expert:not(.none)")),
                "loss_points": max([int(e.get_attribute("data-points") or 0) for e in
                                    driver.find_elements(By.CSS_SELECTOR, "#loss-chart polyline")] or [0]),
                "trainers": len(driver.find_elements(By.CSS_SELECTOR, "tr.trainer")),
                "leaderboard": len(driver.find_elements(By.CSS_SELECTOR, "tr.contributor")),
            }
            if seen["peers"] >= min_peers and seen["hosted_cells"] and seen["loss_points"] >= 2:
                break
            time.sleep(1.0)  # the page swaps its panel in every 2 s by itself: no reload here
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return seen
    finally:
        driver.quit()
