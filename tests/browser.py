"""A headless Chromium for the console's tests: Debian's ``chromium`` driven by
``selenium`` through Debian's ``chromedriver`` (both installed by ``make setup``).

    with Browser.start(tmp_path) as browser:        # fails the test without chromium
        browser.get(server.url + "/dicomsync/ui/")
        browser.wait_for_charts(2)                  # Chart objects drawn by console.js
        assert browser.chart_has_pixels("throughput-hour")
        browser.screenshot("console-overview")      # tmp_path/console-overview.png

``screenshot(name)`` always writes ``<artefacts>/<name>.png`` (the test's tmp folder:
kept by pytest as a test artefact) and, when ``DICOMSYNC_SCREENSHOTS`` names a folder
(``DICOMSYNC_SCREENSHOTS=docs``, relative to the repository), also ``<folder>/<name>.png``:
the README's screenshots are made by the test run. The shot is of the whole page: the
window is resized to the page's height first.

``CHROMIUM`` and ``CHROMEDRIVER`` override the binaries' paths.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTH = 1280


def screenshot_folder() -> Path | None:
    value = os.environ.get("DICOMSYNC_SCREENSHOTS")
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


class Browser:
    def __init__(self, driver: Any, artefacts: Path) -> None:
        self.driver = driver
        self.artefacts = artefacts
        self.shots: list[Path] = []

    @classmethod
    @contextmanager
    def start(cls, artefacts: Path) -> Iterator[Browser]:
        """A headless Chromium; the test fails (never skips) when Chromium or selenium is missing."""
        for binary in (CHROMIUM, CHROMEDRIVER):
            if not (Path(binary).is_file() or shutil.which(binary)):
                pytest.fail(f"{binary} is not installed (make setup installs chromium)")
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            pytest.fail("selenium is not installed (pip install -e .[test])")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--force-device-scale-factor=1",
            f"--window-size={WIDTH},900",
            f"--user-data-dir={artefacts / 'chromium-profile'}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        try:
            yield cls(driver, artefacts)
        finally:
            driver.quit()

    # --- pages ---------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.js("return document.readyState") == "complete", "page load")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; console: {self.console()}")
            time.sleep(0.1)

    def console(self) -> list[str]:
        """The browser's console messages so far (errors of the page's scripts)."""
        try:
            return [e["message"] for e in self.driver.get_log("browser")]
        except Exception:
            return []

    def text(self, css: str) -> str:
        return str(
            self.js(
                "var e = document.querySelector(arguments[0]); return e ? e.innerText : null", css
            )
            or ""
        )

    def texts(self, css: str) -> list[str]:
        return list(
            self.js(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText)",
                css,
            )
        )

    def table(self, css: str = "table.grid") -> list[dict[str, str]]:
        """The rows of the first table matching ``css``, as header -> cell text."""
        rows = self.js(
            """var t = document.querySelector(arguments[0]); if (!t) return null;
            var heads = Array.from(t.querySelectorAll('thead th')).map(h => h.innerText.trim());
            return Array.from(t.querySelectorAll('tbody tr')).map(r => {
              var out = {}; Array.from(r.children).forEach((c, i) => out[heads[i]] = c.innerText.trim());
              return out; });""",
            css,
        )
        assert rows is not None, f"no table {css}"
        return list(rows)

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()

    # --- charts --------------------------------------------------------------------------
    def wait_for_charts(self, n: int, timeout: float = 30.0) -> int:
        """Wait until console.js has drawn ``n`` Chart.js charts; returns how many."""
        return int(
            self.wait(
                lambda: (
                    int(self.js("return Object.keys(window.dicomsyncCharts || {}).length")) >= n
                    and self.js("return Object.keys(window.dicomsyncCharts).length")
                ),
                f"{n} chart(s) drawn",
                timeout,
            )
        )

    def chart_has_pixels(self, canvas_id: str) -> bool:
        """A Chart instance exists on the canvas and the canvas has non-blank pixels."""
        return bool(
            self.js(
                """var c = document.getElementById(arguments[0]);
                if (!c || typeof Chart === 'undefined' || !Chart.getChart(c)) return false;
                var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                for (var i = 3; i < d.length; i += 4) { if (d[i] !== 0) return true; }
                return false;""",
                canvas_id,
            )
        )

    def chart_data(self, canvas_id: str) -> dict[str, Any]:
        """``{"labels": [...], "datasets": [{"label", "data"}...]}`` of a drawn chart."""
        return dict(
            self.js(
                """var ch = Chart.getChart(document.getElementById(arguments[0]));
                return {labels: ch.data.labels, datasets: ch.data.datasets.map(
                  d => ({label: d.label, data: d.data}))};""",
                canvas_id,
            )
        )

    # --- screenshots ---------------------------------------------------------------------
    def screenshot(self, name: str) -> Path:
        """The whole page as ``<artefacts>/<name>.png`` (and in ``DICOMSYNC_SCREENSHOTS``)."""
        height = int(self.js("return Math.ceil(document.documentElement.scrollHeight)"))
        metrics = {"width": WIDTH, "deviceScaleFactor": 1, "mobile": False}
        # the viewport itself, not the window: a headless window's resize is not awaited
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {**metrics, "height": min(height, 6000)}
        )
        time.sleep(0.5)  # Chart.js redraws on resize (no animation)
        path = self.artefacts / f"{name}.png"
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        self.shots.append(path)
        folder = screenshot_folder()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / f"{name}.png")
        return path


# --- the acceptance set-up: `make run`'s Orthanc, and the studies the issue uploads ----------
ACCEPTANCE_FILES = (
    ("study_petct_siemens", "NM-CT-RDSR-Siemens.dcm"),
    ("study_petct_siemens", "NM-RRDSR-Siemens.dcm"),
    ("study_petct_siemens", "NM-PetIm-Siemens.dcm"),
    ("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"),
    ("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm"),
)


def make_run_orthanc(workdir: Path, **sync: Any) -> Any:
    """An ``OrthancProcess`` configured by the repository's ``orthanc.json`` (what
    ``make run`` starts: the ``zips`` destination, the ``index`` sink), in ``workdir``
    playing the repository root (``var/...`` inside it), on free ports, ``StableAge`` 1
    and ``MetricsInterval`` 0.5 s so a test need not wait. ``sync`` entries are merged
    into the ``DicomSync`` section (``Places`` and ``Routes`` are added to, not replaced).
    Call ``.start()`` and, at the end, ``.stop()``."""
    import json

    from orthanc_server import OrthancProcess, free_port

    config = json.loads((REPO_ROOT / "orthanc.json").read_text())
    config["HttpPort"], config["DicomPort"] = free_port(), free_port()
    config["PythonScript"] = str(REPO_ROOT / config["PythonScript"])
    config["StableAge"] = 1
    section = config["DicomSync"]
    section["MetricsInterval"] = 0.5
    section["Places"].update(sync.pop("Places", {}))
    section["Routes"] += sync.pop("Routes", [])
    section.update(sync)
    server = OrthancProcess(
        workdir, "orthanc", http_port=config["HttpPort"], dicom_port=config["DicomPort"]
    )
    server.full_config = lambda: config  # type: ignore[method-assign]
    (workdir / "var" / "zips").mkdir(parents=True, exist_ok=True)
    return server


def upload_acceptance_set(server: Any) -> list[Path]:
    """The PET/CT study (3 instances) and two CT RDSRs (TAP-SS, Toshiba): 3 studies."""
    from dicomdata import data

    paths = [data(*parts) for parts in ACCEPTANCE_FILES]
    server.upload_files(paths)
    return paths
