"""The console's units without Orthanc: escaping of hostile values, the cross-site guard,
static files and a missing Chart.js, the throughput record, the pages' routes and
config errors. The browser tests (tests/test_console_browser.py) drive a real Orthanc."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from test_service_units import Memory

from dicomsync.console import assets, html, pages
from dicomsync.console.throughput import KEEP_MINUTES, Throughput
from dicomsync.queue import Delivered, DestinationStats, NewJob
from dicomsync.service.app import Service
from dicomsync.service.rest_common import Reply

HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'
CONSOLE = {"X-DicomSync-Console": "1"}


def make_service(tmp_path: Path, dest: str = "zips", **section: Any) -> Service:
    (tmp_path / "zips").mkdir(exist_ok=True)
    conf = {
        "DicomSync": {
            "Places": {dest: {"Kind": "zipped_root", "Path": str(tmp_path / "zips")}},
            "Routes": [{"Destination": dest}],
            "StateDirectory": str(tmp_path / "state"),
            **section,
        }
    }
    service = Service(conf, str(tmp_path / "orthanc.json"), Memory({}))
    assert service.config_error is None and service.queue is not None
    return service


def hostile_service(tmp_path: Path) -> Service:
    """A destination whose key is markup, with a failed job whose error is markup."""
    service = make_service(tmp_path, HOSTILE)
    assert service.queue is not None
    service.queue.enqueue_many(
        [NewJob("study", f"{HOSTILE}-{i}", HOSTILE, study_uid=HOSTILE) for i in range(3)]
    )
    leased = service.queue.lease(HOSTILE, 3)
    service.queue.fail(leased[0], f"refused: {HOSTILE}")
    service.throughput.sample(service.queue)
    return service


def get(service: Service, path: str, query: dict[str, str] | None = None) -> Reply:
    return service.handle("GET", path, query or {}, None)


def markup(reply: Reply) -> str:
    assert reply.status == 200, reply.body
    assert reply.content_type.startswith("text/html")
    return reply.payload().decode()


# --- escaping -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["ui", "ui/jobs"])
def test_every_hostile_value_is_escaped_on_the_pages(tmp_path: Path, path: str) -> None:
    service = hostile_service(tmp_path)
    # the jobs page, filtered by the hostile destination too (the query string is hostile)
    for query in ({}, {"destination": HOSTILE, "state": "failed"}, {"state": HOSTILE}):
        text = markup(get(service, path, query))
        # our own markup has no <script> but the two script tags of the layout
        assert (
            text.count("<script")
            == text.count("</script>")
            == (2 + text.count('type="application/json"'))
        )
        assert "<img" not in text  # the event-handler attribute never becomes markup
        assert html.esc(HOSTILE) in text  # shown, as text
    # the chart data names the destination too: no "<" inside the JSON block
    for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', text, re.S):
        assert "<" not in block and ">" not in block and "&" not in block
        json.loads(block)


def test_the_helpers_escape_cells_attributes_and_chart_labels() -> None:
    cell = html.table(["a"], [[HOSTILE]])
    assert HOSTILE not in cell and html.esc(HOSTILE) in cell
    link = html.tag("a", "x", href=f'" onclick="{HOSTILE}')
    assert 'onclick="' not in link
    chart = html.chart("c", {"type": "bar", "data": {"labels": ["</script><b>"]}})
    assert "</script><b>" not in chart and chart.count("</script>") == 1
    assert html.esc(html.Html("<b>")) == "<b>"  # markup a helper built is not escaped twice


def test_a_standalone_document_inlines_its_scripts_and_links_nothing(tmp_path: Path) -> None:
    text = html.document("T", html.chart("c", {"type": "bar", "data": {}}), standalone=True)
    assert not re.search(r'(src|href)="', text)
    assert "Chart.js v3" in text and "dicomsyncCharts" in text
    assert text.count("</script>") == 3  # chart.js, console.js, the chart's JSON


# --- cross-site requests -----------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [None, {}, {"Origin": "https://evil.example"}, {"X-DicomSync-Console": "0"}],
)
@pytest.mark.parametrize("path", ["ui/api/retry-failed", "ui/api/jobs/1/retry"])
def test_a_console_post_without_the_header_is_refused(
    tmp_path: Path, path: str, headers: dict[str, str] | None
) -> None:
    service = hostile_service(tmp_path)
    assert service.queue is not None
    reply = service.handle("POST", path, {}, b"{}", headers)
    assert reply.status == 403 and "X-DicomSync-Console" in reply.body["Message"]
    assert service.queue.stats()[HOSTILE].failed == 1  # nothing requeued


def test_a_console_post_with_the_header_retries(tmp_path: Path) -> None:
    service = hostile_service(tmp_path)
    assert service.queue is not None
    failed = service.queue.jobs("failed", HOSTILE, 10)[0]
    # Orthanc hands header names in lower case
    reply = service.handle(
        "POST", f"ui/api/jobs/{failed.id}/retry", {}, None, {"x-dicomsync-console": "1"}
    )
    assert reply.status == 200 and reply.body["State"] == "queued"
    assert reply.body["Attempts"] == 0
    service.queue.fail(service.queue.lease(HOSTILE, 3)[0], "again")
    body = json.dumps({"Destination": HOSTILE}).encode()
    reply = service.handle("POST", "ui/api/retry-failed", {}, body, CONSOLE)
    assert reply.status == 200 and reply.body == {"Requeued": 1}


def test_the_rest_api_s_own_endpoints_and_console_gets_need_no_header(tmp_path: Path) -> None:
    service = hostile_service(tmp_path)
    assert service.handle("POST", "retry-failed", {}, b"{}").status == 200
    for path in ("ui", "ui/jobs", "ui/api/overview", "ui/static/console.js"):
        assert get(service, path).status == 200, path


# --- GET arguments ------------------------------------------------------------------------
def test_get_arguments_are_percent_decoded_once(tmp_path: Path) -> None:
    """Orthanc 1.10 hands a plugin its GET arguments still percent-encoded."""
    service = hostile_service(tmp_path)
    raw = {"destination": "%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E%26%3Cimg+src%3Dx+"
           "onerror%3Dalert%281%29%3E", "state": "failed"}  # fmt: skip
    reply = service.handle("GET", "jobs", raw, None)
    assert reply.status == 200, reply.body
    assert [j["Destination"] for j in reply.body["Jobs"]] == [HOSTILE]
    text = markup(get(service, "ui/jobs", raw))
    assert "unknown destination" not in text and "1 job(s) shown" in text


# --- pages, routes, errors ------------------------------------------------------------------
def test_pages_carry_a_content_security_policy_and_links_under_the_console(
    tmp_path: Path,
) -> None:
    service = make_service(tmp_path)
    reply = get(service, "ui/jobs")
    policy = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert reply.headers["X-Frame-Options"] == "DENY"
    text = markup(reply)
    assert 'href="/dicomsync/ui/static/console.css"' in text
    assert 'src="/dicomsync/ui/static/chart.min.js"' in text
    assert " style=" not in text and "<style" not in text  # the policy forbids them
    assert get(service, "ui/nothing").status == 404


def test_a_page_whose_module_is_missing_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pages.PAGES, "dose", "dicomsync.console.no_such_module:page")
    reply = make_service(tmp_path).handle("GET", "ui/dose", {}, None)
    assert reply.status == 503
    assert "not available" in reply.payload().decode()
    assert "no_such_module" in reply.payload().decode()


def test_a_configuration_error_is_shown_plainly(tmp_path: Path) -> None:
    conf = {"DicomSync": {"Places": {"zips": {"Kind": "zipped_root"}}, "Routes": "no"}}
    service = Service(conf, str(tmp_path / "orthanc.json"), Memory({}))
    assert service.config_error
    text = markup(get(service, "ui"))
    assert "Configuration error, routing is OFF" in text
    assert html.esc(service.config_error) in text
    jobs = get(service, "ui/jobs")
    assert jobs.status == 503 and "not configured" in jobs.payload().decode()
    data = get(service, "ui/api/overview").body
    assert data["ConfigError"] == service.config_error and data["Destinations"] == {}


def test_the_overview_json_has_the_queue_s_numbers(tmp_path: Path) -> None:
    service = hostile_service(tmp_path)
    assert service.queue is not None
    data = get(service, "ui/api/overview").body
    d = data["Destinations"][HOSTILE]
    assert (d["Queued"], d["Sending"], d["Failed"], d["Done"]) == (0, 2, 1, 0)
    assert HOSTILE in d["LastError"]
    hour = data["Throughput"]["Hour"]
    assert len(hour["Labels"]) == len(hour["Rates"][HOSTILE]) == 60
    assert len(data["Throughput"]["Day"]["Labels"]) in (96, 97)


# --- static files, Chart.js ----------------------------------------------------------------
def test_static_files_are_only_the_listed_ones(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    js = get(service, "ui/static/chart.min.js")
    assert js.status == 200 and js.content_type.startswith("text/javascript")
    assert b"Chart.js v3" in js.payload()[:200]
    css = get(service, "ui/static/console.css")
    assert css.content_type.startswith("text/css")
    for name in ("..%2F..%2Fetc%2Fpasswd", "chart.js", "console.py", ".."):
        assert get(service, f"ui/static/{name}").status == 404, name


def test_without_chart_js_the_pages_say_why_and_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOMSYNC_CHART_JS", str(tmp_path / "missing" / "chart.min.js"))
    service = make_service(tmp_path)
    text = markup(get(service, "ui"))
    assert "Charts cannot be drawn" in text and "libjs-chart.js" in text
    reply = get(service, "ui/static/chart.min.js")
    assert reply.status == 404 and "libjs-chart.js" in reply.body["Message"]
    assert assets.chart_js_problem() is not None
    standalone = html.document("T", "", standalone=True)
    assert "Charts cannot be drawn" in standalone and "Chart.js v3" not in standalone


# --- throughput ---------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.study: dict[str, DestinationStats] = {}
        self.tags: dict[str, DestinationStats] = {}
        self.meta: dict[str, str] = {}

    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]:
        return self.study if kind == "study" else self.tags

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value


def test_throughput_counts_what_grew_per_minute_from_a_destination_s_first_job() -> None:
    clock = [6000.0 * 60]
    t = Throughput(lambda: clock[0])
    queue = Stats()
    t.sample(queue)  # the first sample: the queue is still empty (the plugin just started)
    queue.study["zips"] = DestinationStats("zips", done=1, delivered=120)
    queue.tags["index"] = DestinationStats("index", done=30, delivered=90)
    clock[0] += 10
    t.sample(queue)  # a destination the queue did not know before counts from 0
    queue.study["zips"].delivered = 180
    clock[0] += 60
    t.sample(queue)
    s = t.series(["zips", "sink:index", "other"], 60)
    assert s.rates["zips"][-2:] == [2.0, 1.0]  # 120 and 60 instances in their minutes
    assert s.rates["sink:index"][-2:] == [0.5, 0.0]  # 30 instances (done jobs) of a sink
    assert s.rates["other"] == [0.0] * 60 and len(s.labels) == 60
    day = t.series(["zips"], 24 * 60, 15)
    assert sum(day.rates["zips"]) * 15 * 60 == pytest.approx(180)


def test_throughput_ignores_a_shrinking_total_and_forgets_after_a_day() -> None:
    clock = [1000.0 * 60]
    t = Throughput(lambda: clock[0])
    t.add({"zips": 100})
    t.add({"zips": 160})
    t.add({"zips": 40})  # pruned or rebuilt: no progress, and no negative rate
    t.add({"zips": 70})
    assert sum(t.series(["zips"], 60).rates["zips"]) * 60 == pytest.approx(90)
    clock[0] += KEEP_MINUTES * 60
    t.add({"zips": 70})
    assert t._buckets["zips"] == {}  # older than a day


def test_the_overview_reads_only_the_queue_s_counters(tmp_path: Path) -> None:
    """What keeps it fast at 1M jobs (bench/bench_console.py): no listing of jobs."""
    service = hostile_service(tmp_path)
    queue = service.queue
    assert queue is not None
    called: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> Any:
            called.append(name)
            return getattr(queue, name)

    recorder: Any = Recorder()
    service.queue = recorder
    if service.sinks is not None:
        service.sinks.queue = recorder
    for path in ("ui", "ui/api/overview"):
        called.clear()
        assert get(service, path).status == 200
        assert set(called) == {"stats"}, called


def test_throughput_is_saved_once_a_minute_and_read_back_after_a_restart() -> None:
    clock = [5000.0 * 60 + 5]
    queue = Stats()
    t = Throughput(lambda: clock[0])
    t.sample(queue, "console:throughput:a")
    queue.study["zips"] = DestinationStats("zips", delivered=300)
    for _ in range(5):  # samples within one minute write nothing
        clock[0] += 10
        t.sample(queue, "console:throughput:a")
    assert queue.meta == {}
    clock[0] += 10  # the next minute: saved once
    t.sample(queue, "console:throughput:a")
    saved = queue.meta["console:throughput:a"]
    clock[0] += 10
    t.sample(queue, "console:throughput:a")
    assert queue.meta["console:throughput:a"] == saved

    # Orthanc restarts two minutes later; 100 more were delivered while it was down
    clock[0] += 120
    queue.study["zips"].delivered = 400
    again = Throughput(lambda: clock[0])
    again.sample(queue, "console:throughput:a")
    assert sum(again.series(["zips"], 60).rates["zips"]) * 60 == pytest.approx(300)
    assert again.since == t.since
    queue.study["zips"].delivered = 460
    clock[0] += 5
    again.sample(queue, "console:throughput:a")
    assert sum(again.series(["zips"], 60).rates["zips"]) * 60 == pytest.approx(360)
    # another node's record, a record of another format, garbage: each starts afresh
    for value in (None, '{"Format": 99, "Buckets": {}}', "not json", '{"Format": 1}', "[]"):
        fresh = Throughput(lambda: clock[0])
        fresh.load(value)
        assert sum(fresh.series(["zips"], 60).rates["zips"]) == 0


def test_a_saved_record_older_than_a_day_is_dropped() -> None:
    clock = [9000.0 * 60]
    t = Throughput(lambda: clock[0])
    t.add({"zips": 0})
    t.add({"zips": 50})
    text = t.dump()
    clock[0] += KEEP_MINUTES * 60
    later = Throughput(lambda: clock[0])
    later.load(text)
    assert later._buckets == {"zips": {}}


def test_the_service_keeps_its_throughput_in_its_queue_across_a_restart(tmp_path: Path) -> None:
    clock = [time.time() - 300]  # in the past: the page's window ends now
    service = make_service(tmp_path)
    service.throughput.clock = lambda: clock[0]
    queue = service.queue
    assert queue is not None and service.config is not None
    service.publish_metrics()  # the baseline: nothing yet
    queue.enqueue_many([NewJob("study", f"s{i}", "zips") for i in range(3)])
    queue.done_many([(j, Delivered(f"fp{j.id}", sent=40)) for j in queue.lease("zips", 3)])
    clock[0] += 30
    service.publish_metrics()
    clock[0] += 60  # a new minute: saved
    service.publish_metrics()
    assert queue.get_meta(f"console:throughput:{service.config.node_id}")
    queue.close()

    restarted = make_service(tmp_path)
    restarted.throughput.clock = lambda: clock[0]
    restarted.publish_metrics()
    data = get(restarted, "ui/api/overview").body
    hour = data["Throughput"]["Hour"]["Rates"]["zips"]
    assert sum(hour) * 60 == pytest.approx(120)  # 3 jobs x 40 instances
