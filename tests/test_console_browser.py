"""The console in a real browser: headless Chromium (tests/browser.py) on a real Orthanc
with the plugin, configured like ``make run`` (``zips`` + the ``index`` sink), after an
upload of a PET/CT study and two CT RDSRs. Saves docs/console-overview.png and
docs/console-jobs.png when ``DICOMSYNC_SCREENSHOTS=docs`` is set (always as artefacts in
the test's tmp folder).

A second destination, whose key and error carry a script tag, has no folder yet: its
jobs fail at once (``NotFound``), are shown with their error and attempts, and are
retried from the page once the folder exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from browser import Browser, make_run_orthanc, upload_acceptance_set
from orthanc_server import OrthancProcess
from plugin_helpers import jobs, status, wait_for

pytestmark = pytest.mark.orthanc

HOSTILE = '<script>window.hacked=1</script>&"late"'


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancProcess, Path]]:
    root = tmp_path_factory.mktemp("make-run")
    late = root / "late-zips"  # missing until a test makes it
    server = make_run_orthanc(
        root,
        Places={HOSTILE: {"Kind": "zipped_root", "Path": str(late)}},
        Routes=[{"Destination": HOSTILE}],
    ).start()
    try:
        upload_acceptance_set(server)
        # 4 Orthanc studies: the PET image carries another PatientID than its two SRs
        studies = len(server.get("/studies"))
        assert studies == 4

        def settled() -> bool:
            st = status(server)
            d, s = st["Destinations"], st["Sinks"]
            return (
                d["zips"]["Done"] == studies
                and d[HOSTILE]["Failed"] == studies
                and s["index"]["Done"] == 5
                and s["index"]["Queued"] == 0
            )

        wait_for(settled, 90, "zips done, the late destination failed, the index filled")
        # the throughput record has seen the deliveries (sampled every 0.5 s)
        wait_for(
            lambda: all(
                sum(overview(server)["Throughput"]["Hour"]["Rates"][key]) > 0
                for key in ("zips", "sink:index")
            ),
            30,
            "a throughput sample",
        )
        yield server, late
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser.start(tmp_path_factory.mktemp("screenshots")) as b:
        yield b


def overview(server: OrthancProcess) -> dict[str, Any]:
    result: dict[str, Any] = server.get("/dicomsync/ui/api/overview")
    return result


def test_the_overview_shows_the_queue_s_numbers_and_draws_the_throughput_chart(
    run: tuple[OrthancProcess, Path], browser: Browser
) -> None:
    server, _ = run
    browser.get(server.url + "/dicomsync/ui/")
    assert browser.wait_for_charts(2) == 2
    assert browser.chart_has_pixels("throughput-hour")
    assert browser.chart_has_pixels("throughput-day")
    hour = browser.chart_data("throughput-hour")
    zips = next(d for d in hour["datasets"] if d["label"] == "zips")
    assert sum(zips["data"]) > 0  # the studies' instances, per second
    index = next(d for d in hour["datasets"] if d["label"] == "index (sink)")
    assert sum(index["data"]) > 0  # the index sink's instances
    st = status(server)
    tables = browser.js("return document.querySelectorAll('table.grid').length")
    assert tables == 2
    shown = {r["Destination"]: r for r in browser.table("table.grid")}
    assert set(shown) == {"zips", HOSTILE}  # the script tag is text, not an element
    for key, row in shown.items():
        q = st["Destinations"][key]
        assert [row["Queued"], row["Sending"], row["Done"], row["Failed"]] == [
            str(q["Queued"]),
            str(q["Sending"]),
            str(q["Done"]),
            str(q["Failed"]),
        ]
        assert row["Delivered instances"] == str(q["Delivered"])
    assert shown["zips"]["Done"] == "4" and shown["zips"]["Delivered instances"] == "5"
    assert HOSTILE in shown[HOSTILE]["Last error"]  # the error names the key, escaped
    sinks = {r["Sink"]: r for r in browser.table("table.grid:nth-of-type(2)")}
    assert set(sinks) == {"index"}
    index = st["Sinks"]["index"]
    assert sinks["index"]["Done (instances)"] == str(index["Done"]) == "5"
    assert sinks["index"]["Delivered events"] == str(index["DeliveredEvents"])
    assert browser.js("return window.hacked === undefined")
    assert not [m for m in browser.console() if "SEVERE" in m or "Error" in m]
    browser.screenshot("console-overview")


def test_a_failed_job_shows_its_error_and_is_retried_from_the_page(
    run: tuple[OrthancProcess, Path], browser: Browser
) -> None:
    server, late = run
    failed = jobs(server, state="failed", destination=HOSTILE)
    assert len(failed) == 4
    browser.get(server.url + "/dicomsync/ui/jobs?state=failed")
    rows = browser.table("table.jobs")
    assert {r["ID"] for r in rows} == {str(j["Id"]) for j in failed}
    for row in rows:
        assert row["State"] == "failed" and row["Attempts"] == "1"
        assert "does not exist" in row["Error"] and HOSTILE in row["Error"]
    assert browser.js("return window.hacked === undefined")
    browser.screenshot("console-jobs")

    late.mkdir()  # the destination is fixed: a retry now delivers
    first = failed[0]["Id"]
    browser.click(f'button[data-job="{first}"]')
    browser.wait(
        lambda: f"job {first} requeued" in browser.text("#console-message"), "the retry answer"
    )
    wait_for(lambda: server.get(f"/dicomsync/jobs/{first}")["State"] == "done", 60, "job done")
    assert {j["Id"] for j in jobs(server, state="failed")} == {j["Id"] for j in failed[1:]}

    query = urlencode({"state": "failed", "destination": HOSTILE})
    browser.get(f"{server.url}/dicomsync/ui/jobs?{query}")
    browser.click("#retry-failed")
    browser.driver.switch_to.alert.accept()  # "Requeue every failed job of ...?"
    browser.wait(lambda: "3 job(s) requeued" in browser.text("#console-message"), "retry all")
    wait_for(lambda: status(server)["Destinations"][HOSTILE]["Done"] == 4, 60, "all done")


def test_a_cross_site_post_without_the_console_header_is_refused(
    run: tuple[OrthancProcess, Path], browser: Browser, tmp_path: Path
) -> None:
    server, _ = run
    target = server.url + "/dicomsync/ui/api/retry-failed"
    # a page of another origin (a file) posts a plain form to the console, as a forged
    # request would: the browser sends no custom header, the plugin refuses it
    evil = tmp_path / "evil.html"
    evil.write_text(
        f'<form id="f" method="post" action="{target}" enctype="text/plain">'
        '<input name="{&quot;a&quot;:&quot;" value="&quot;}"></form>'
    )
    browser.get(evil.as_uri())
    browser.js("document.getElementById('f').submit()")
    browser.wait(lambda: browser.driver.current_url.startswith(server.url), "the form post")
    assert "X-DicomSync-Console" in browser.driver.page_source
    for headers in ({}, {"Origin": "https://evil.example"}, {"X-DicomSync-Console": "0"}):
        r = requests.post(target, data=b"{}", headers=headers, timeout=30)
        assert r.status_code == 403, (headers, r.text)
    r = requests.post(target, data=b"{}", headers={"X-DicomSync-Console": "1"}, timeout=30)
    assert r.status_code == 200 and "Requeued" in r.json()


def test_the_console_is_behind_orthanc_s_authentication(tmp_path: Path) -> None:
    """Orthanc authenticates the plugin's routes like its own: no credentials, no page."""
    from plugin_helpers import plugin_orthanc

    (tmp_path / "zips").mkdir()
    server = plugin_orthanc(
        tmp_path,
        "auth",
        {"zips": {"Kind": "zipped_root", "Path": str(tmp_path / "zips")}},
        [{"Destination": "zips"}],
        config={"AuthenticationEnabled": True, "RegisteredUsers": {"alice": "secret"}},
    )
    auth = ("alice", "secret")

    def ready(timeout: float = 30.0) -> None:
        wait_for(lambda: _answers(server.url + "/system", auth), timeout, "Orthanc up")

    server.wait_ready = ready  # type: ignore[method-assign]
    server.start()
    try:
        for path in ("/dicomsync/ui", "/dicomsync/ui/jobs", "/dicomsync/ui/static/console.js"):
            assert requests.get(server.url + path, timeout=30).status_code == 401, path
            assert requests.get(server.url + path, auth=auth, timeout=30).status_code == 200
        target = server.url + "/dicomsync/ui/api/retry-failed"
        assert requests.post(target, data=b"{}", timeout=30).status_code == 401
        # authenticated but without the console's header (a forged request): refused
        assert requests.post(target, data=b"{}", auth=auth, timeout=30).status_code == 403
    finally:
        server.stop()


def _answers(url: str, auth: tuple[str, str]) -> bool:
    try:
        return requests.get(url, auth=auth, timeout=1).ok
    except requests.RequestException:
        return False
