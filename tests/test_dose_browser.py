"""The dose page and the dose report in a real browser (issue 14): headless Chromium
(tests/browser.py).

- ``/dicomsync/ui/dose`` from a real Orthanc with the plugin, configured like ``make run``
  (the ``index`` sink), after an upload of the PET/CT study and two CT RDSRs: CTDIvol and
  DLP by protocol shown (the same numbers as a reader of the plugin's index file), the
  charts drawn with their reference lines, 724.52 for TAP-SS; the screenshot
  ``console-dose`` (docs/console-dose.png with ``DICOMSYNC_SCREENSHOTS=docs``).
- ``dicomsync dose report``'s file opened from disk with the browser's network switched
  off: its charts are drawn from the inlined Chart.js.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomsync.cli.main import cli
from dicomsync.console.dose_levels import Levels
from dicomsync.console.dose_query import DoseReader
from dicomsync.console.dose_view import DoseFilter, rows, summarize
from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import events_from_bytes

from browser import Browser, make_run_orthanc, upload_acceptance_set
from dicomdata import data
from orthanc_server import OrthancProcess
from plugin_helpers import status, wait_for

CHARTS = ("dose-days", "dose-ctdivol", "dose-dlp", "dose-scanners")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser.start(tmp_path_factory.mktemp("dose-screenshots")) as b:
        yield b


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancProcess, Path]]:
    root = tmp_path_factory.mktemp("make-run-dose")
    server = make_run_orthanc(root).start()
    try:
        upload_acceptance_set(server)

        def indexed() -> bool:
            sink = status(server)["Sinks"]["index"]
            return bool(sink["Done"] == 5 and sink["Queued"] == 0)

        wait_for(indexed, 90, "the index sink has the 5 instances")
        yield server, root / "var" / "dicomsync" / "index.sqlite"
    finally:
        server.stop()


def load_dose_page(browser: Browser, url: str) -> None:
    """The first request starts the index's first read; the page says so until done."""
    for _ in range(100):
        browser.get(url)
        if browser.js("return document.querySelectorAll('canvas[data-chart]').length"):
            return
        assert "reading the dose events" in browser.text("main"), browser.text("main")
        browser.js("return new Promise(r => setTimeout(r, 200))")
    raise AssertionError("the dose page never showed its charts")


@pytest.mark.orthanc
def test_the_dose_page_shows_ctdivol_and_dlp_by_protocol_and_tap_ss_724_52(
    run: tuple[OrthancProcess, Path], browser: Browser
) -> None:
    server, index_path = run
    load_dose_page(browser, server.url + "/dicomsync/ui/dose")
    assert browser.wait_for_charts(len(CHARTS)) == len(CHARTS)
    for chart in CHARTS:
        assert browser.chart_has_pixels(chart), chart
    # the numbers are the index's: a reader of the plugin's own index file agrees
    reader = DoseReader.sqlite(index_path)
    summary = summarize(reader.snapshot(), DoseFilter(), Levels())
    reader.close()
    header, expected = rows(summary, "protocols")
    shown = browser.table("#dose-protocols table.grid")
    assert [[r[h] for h in header] for r in shown] == expected
    assert {r["Protocol"] for r in shown} >= {"TAP", "Topogram"}  # TAP-SS and the PET/CT's CT
    assert all(r["CTDIvol median (mGy)"] and r["DLP median (mGy·cm)"] for r in shown)
    studies = {r["Accession"]: r for r in browser.table("#dose-studies table.grid")}
    assert studies["ACC12345601"]["Total DLP (mGy·cm)"] == "724.52"
    assert studies["ACC12345601"]["Description"] == "Thorax^TAP (Adult)"
    ctdi = browser.chart_data("dose-ctdivol")
    labels = [d["label"] for d in ctdi["datasets"]]
    assert labels == ["median CTDIvol", "75th percentile CTDIvol", "reference level", "alert level"]
    assert ctdi["labels"] == [r["Protocol"] for r in shown]
    days = browser.chart_data("dose-days")
    assert "1997-01-01" in days["labels"]
    assert {d["label"] for d in days["datasets"]} >= {"SR", "PT"}
    assert not [m for m in browser.console() if "SEVERE" in m]
    browser.screenshot("console-dose")
    # the date-range filter: the form's GET keeps one day
    browser.js(
        "document.querySelector('input[name=since]').value = '1997-01-01';"
        "document.querySelector('input[name=until]').value = '1997-01-01';"
        "document.querySelector('form.filters').submit();"
    )
    browser.wait(lambda: "since=1997-01-01" in browser.driver.current_url, "the filtered page")
    browser.wait_for_charts(len(CHARTS))
    one_day = browser.table("#dose-studies table.grid")
    assert [r["Total DLP (mGy·cm)"] for r in one_day] == ["724.52"]
    assert "1997-01-01 to 1997-01-01" in browser.text("#dose-facts")


def test_the_report_opens_offline_with_its_charts(
    tmp_path: Path, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = SqliteIndex("ix", tmp_path / "index.sqlite")
    for parts in (
        ("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"),
        ("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm"),
        ("study_petct_siemens", "NM-CT-RDSR-Siemens.dcm"),
        ("study_petct_siemens", "NM-PetIm-Siemens.dcm"),
    ):
        index.send(events_from_bytes(data(*parts).read_bytes()))
    index.close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DICOMSYNC_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    added = runner.invoke(cli, ["sink", "add", "sqlite_index", "ix", "index.sqlite"])
    assert added.exit_code == 0
    out = tmp_path / "report.html"
    result = runner.invoke(cli, ["dose", "report", "--sink", "ix", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    browser.driver.execute_cdp_cmd("Network.enable", {})
    browser.driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
    )
    try:
        browser.get(out.as_uri())
        assert browser.wait_for_charts(len(CHARTS)) == len(CHARTS)
        for chart in CHARTS:
            assert browser.chart_has_pixels(chart), chart
        studies = {r["Accession"]: r for r in browser.table("#dose-studies table.grid")}
        assert studies["ACC12345601"]["Total DLP (mGy·cm)"] == "724.52"
        links = browser.js("return Array.from(document.links).map(a => a.protocol)")
        assert set(links) == {"data:"}  # the CSV exports, inside the file
        browser.screenshot("dose-report")
    finally:
        browser.driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
