"""The dose page's numbers, levels, escaping, CSV, cache and report (issue 14), over real
``sqlite_index`` files (and the PostgreSQL index) filled with the events our flattening
makes from the vendor RDSRs in ../shared/data/dicom.

The browser half (the page in a real Orthanc, the report opened offline in Chromium) is
tests/test_dose_browser.py.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from dicomsync.cli.main import cli
from dicomsync.console import dose, dose_query
from dicomsync.console.dose_levels import Levels
from dicomsync.console.dose_query import DoseReader
from dicomsync.console.dose_view import DoseFilter, quantile, rows, summarize
from dicomsync.console.pages import PageContext, View
from dicomsync.errors import ConfigError
from dicomsync.service.rest_common import HttpError, Reply
from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import SOURCETYPE_DOSE_EVENT, Event, events_from_bytes

from dicomdata import data, data_dir

TAP = "1.3.6.1.4.1.5962.99.1.2662687737.2058515598.1471541535737.3.0"
CTDI, DLP = "CT Dose.Mean CTDIvol", "CT Dose.DLP"
HOSTILE = '<script>window.hacked=1</script>"><img src=x onerror=alert(1)>&amp;'


def file_events(*parts: str) -> list[Event]:
    path = data(*parts)
    return events_from_bytes(path.read_bytes(), source=str(path))


def rdsr_events() -> list[Event]:
    base = data_dir()
    files = sorted((base / "rdsr").glob("*.dcm")) + sorted(
        (base / "study_petct_siemens").glob("*.dcm")
    )
    return [e for f in files for e in events_from_bytes(f.read_bytes(), source=str(f))]


def make_index(path: Path, events: list[Event]) -> Path:
    index = SqliteIndex("t", path)
    index.send(events)
    index.close()
    return path


def snapshot(path: Path, **kw: Any) -> dose_query.Snapshot:
    reader = DoseReader.sqlite(path, **kw)
    try:
        return reader.snapshot()
    finally:
        reader.close()


def synthetic(n: int, ctdivol: float, dlp: float, **fields: Any) -> Event:
    """A CT dose event shaped like TAP-SS's first one, with its own UIDs and values."""
    base = file_events("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    first = next(e for e in base if e.sourcetype == SOURCETYPE_DOSE_EVENT)
    body = copy.deepcopy(first.fields)
    body.update(
        {
            "StudyInstanceUID": f"2.25.{n}",
            "SOPInstanceUID": f"2.25.{n}.1",
            "Irradiation Event UID": f"2.25.{n}.2",
            "StudyDate": "20250115",
        }
    )
    body["CT Dose"].update({"Mean CTDIvol": ctdivol, "DLP": dlp})
    body.update(fields)
    for key, value in fields.items():
        if value is None:
            del body[key]
    return Event(f"2.25.{n}.1:event:2.25.{n}.2", SOURCETYPE_DOSE_EVENT, 1.7e9, "study", body)


# --- the numbers come from the flattened events ---------------------------------------------
def test_tap_ss_total_dlp_and_its_events_are_the_files_own(tmp_path: Path) -> None:
    events = file_events("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    snap = snapshot(make_index(tmp_path / "i.sqlite", events))
    (total,) = [t for t in snap.totals if t.study_uid == TAP]
    assert total.total_dlp == 724.52
    assert total.date == "19970101" and total.accession == "ACC12345601"
    flat = [e.fields for e in events if e.sourcetype == SOURCETYPE_DOSE_EVENT]
    assert len(flat) == 4
    shown = sorted((e.protocol, e.ctdivol, e.dlp) for e in snap.events)
    assert shown == sorted(
        (f["Acquisition Protocol"], f["CT Dose"]["Mean CTDIvol"], f["CT Dose"]["DLP"]) for f in flat
    )
    assert {e.scanner for e in snap.events} == {"CTAWP00001"}  # StationName
    assert snap.modalities == (("19970101", "SR", TAP),)


def test_every_vendor_rdsr_gives_its_ct_events_once(tmp_path: Path) -> None:
    events = rdsr_events()
    snap = snapshot(make_index(tmp_path / "i.sqlite", events))
    ct = {
        (e.fields["StudyInstanceUID"], e.fields.get("Irradiation Event UID") or e.id)
        for e in events
        if e.sourcetype == SOURCETYPE_DOSE_EVENT
        and isinstance(e.fields.get("CT Dose"), dict)
        and (
            e.fields["CT Dose"].get("Mean CTDIvol") is not None
            or e.fields["CT Dose"].get("DLP") is not None
        )
    }
    assert len(snap.events) == len(ct) > 20
    # fluoroscopy, radiography and mammography events are not CT events
    assert not any("RF" in e.scanner or e.protocol.startswith("Fluoro") for e in snap.events)
    # Siemens-Multi-1..3 are cumulative reports of one study: 1+2+3 events, 3 distinct
    multi = [e for e in events if "Multi" in e.source and e.sourcetype == SOURCETYPE_DOSE_EVENT]
    assert len(multi) == 6
    study = multi[0].fields["StudyInstanceUID"]
    assert len([e for e in snap.events if e.study_uid == study]) == 3
    # its one total is the last report's (the largest: a cumulative total only grows)
    (multi_total,) = [t for t in snap.totals if t.study_uid == study]
    assert multi_total.total_dlp == 236.09
    assert TAP in {t.study_uid for t in snap.totals}


def test_protocol_falls_back_to_the_study_description(tmp_path: Path) -> None:
    event = synthetic(
        1, 5.0, 50.0, **{"Acquisition Protocol": None, "StudyDescription": "Head^Routine"}
    )
    snap = snapshot(make_index(tmp_path / "i.sqlite", [event]))
    assert [e.protocol for e in snap.events] == ["Head^Routine"]


def test_median_and_75th_percentile_by_protocol_and_scanner(tmp_path: Path) -> None:
    values = [3.0, 1.0, 4.0, 2.0, 10.0]
    events = [
        synthetic(
            i,
            v,
            v * 10,
            StationName="CT-A" if i % 2 else "CT-B",
            **{"Acquisition Protocol": "Chest"},
        )
        for i, v in enumerate(values)
    ]
    summary = summarize(snapshot(make_index(tmp_path / "i.sqlite", events)), DoseFilter(), Levels())
    ((protocol, stats, level),) = summary.protocols
    assert protocol == "Chest" and stats.n == 5 and level is not None and level.name == "Chest"
    q = statistics.quantiles(values, n=4, method="inclusive")
    assert stats.ctdivol == (statistics.median(values), q[2])
    assert stats.dlp == (statistics.median(values) * 10, pytest.approx(q[2] * 10))
    per = {sc: s for sc, p, s in summary.scanners}
    assert per["CT-B"].ctdivol[0] == statistics.median([3.0, 4.0, 10.0])
    assert per["CT-A"].n == 2
    assert quantile([], 0.5) is None and quantile([7.0], 0.75) == 7.0


def test_the_date_range_filters_events_totals_and_days(tmp_path: Path) -> None:
    events = [
        synthetic(1, 5.0, 50.0, StudyDate="20250101"),
        synthetic(2, 6.0, 60.0, StudyDate="20250401"),
    ]
    events += file_events("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    snap = snapshot(make_index(tmp_path / "i.sqlite", events))
    q2 = summarize(snap, DoseFilter("20250301", "20250630"), Levels())
    assert q2.events == 1 and [s.ctdivol[0] for _, s, _ in q2.protocols] == [6.0]
    assert q2.studies == [] and q2.days == {}
    y1997 = summarize(snap, DoseFilter("19970101", "19970101"), Levels())
    assert y1997.events == 4 and [t.total_dlp for t in y1997.studies] == [724.52]
    assert y1997.days == {("19970101", "SR"): 1}


# --- reference levels -------------------------------------------------------------------------
def test_reference_levels_match_protocol_then_word_and_make_outliers(tmp_path: Path) -> None:
    levels = Levels()
    assert [(lv.name, lv.ctdivol) for lv in levels.levels] == [
        ("Head", (50.0, 75.0)),
        ("Chest", (20.0, 25.0)),
        ("Abdomen", (20.0, 25.0)),
    ]
    assert levels.match("Routine HEAD", "").name == "Head"  # type: ignore[union-attr]
    assert levels.match("Scout", "Chest").name == "Chest"  # type: ignore[union-attr]
    assert levels.match("Forehead", "") is None  # a word, not a substring
    custom = Levels(
        {"Thorax^TAP (Adult)": {"CTDIvol": [1, 2], "DLP": [700, 800]}, "Head": [50, 75]}
    )
    exact = custom.match("thorax^tap (adult) ")
    assert exact is not None and exact.dlp == (700.0, 800.0)
    events = [
        synthetic(
            1, 60.0, 500.0, **{"Acquisition Protocol": "Head routine", "Target Region": "Head"}
        ),
        synthetic(
            2, 80.0, 500.0, **{"Acquisition Protocol": "Head routine", "Target Region": "Head"}
        ),
        synthetic(
            3, 10.0, 500.0, **{"Acquisition Protocol": "Head routine", "Target Region": "Head"}
        ),
        synthetic(4, 99.0, 500.0, **{"Acquisition Protocol": "Knee", "Target Region": "Knee"}),
    ]
    summary = summarize(snapshot(make_index(tmp_path / "i.sqlite", events)), DoseFilter(), levels)
    found = [(o.event.study_uid, o.value, o.above_alert) for o in summary.outliers]
    assert found == [("2.25.2", 80.0, True), ("2.25.1", 60.0, False)]  # most above first
    header, table = rows(summary, "outliers")
    assert header[:4] == ["Study", "Accession", "Date", "Scanner"]
    assert table[0][:4] == ["2.25.2", "ACC12345601", "2025-01-15", "CTAWP00001"]


@pytest.mark.parametrize(
    "section",
    [{"ReferenceLevels": {"Head": [75, 50]}}, {"ReferenceLevels": {"Head": [50]}},
     {"ReferenceLevels": {"Head": {"CTDI": [1, 2]}}}, {"ReferenceLevels": ["Head"]},
     {"ReferenceLevels": {"Head": [float("nan"), 2]}}, {"Index": 3}],
)  # fmt: skip
def test_bad_reference_levels_are_one_config_error(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        Levels.from_section(section, "DicomSync.Dose")
    assert str(err.value).startswith("DicomSync.Dose")
    assert "\n" not in str(err.value)


# --- escaping ---------------------------------------------------------------------------------
def test_hostile_values_are_text_in_the_page_charts_and_csv(tmp_path: Path) -> None:
    event = synthetic(
        1, 90.0, 900.0,
        StationName=HOSTILE, AccessionNumber=HOSTILE,
        **{"Acquisition Protocol": f"Head {HOSTILE}", "StudyDescription": HOSTILE},
    )  # fmt: skip
    path = make_index(tmp_path / "i.sqlite", [event])
    reader = DoseReader.sqlite(path)
    for standalone in (False, True):
        page = dose.render(reader, DoseFilter(), Levels(), standalone=standalone, index=HOSTILE)
        body = page.split("<main>", 1)[1]
        assert "<script>window.hacked" not in body and "<img src=x" not in body
        assert "&lt;script&gt;window.hacked=1&lt;/script&gt;" in body  # shown, as text
        assert "window.hacked" in body  # in the tables, escaped, and in the charts' JSON
        for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', body, re.S):
            assert "<" not in block and ">" not in block  # no value can close the block
    summary = summarize(reader.snapshot(), DoseFilter(), Levels())
    import csv
    import io

    (_header, row) = list(csv.reader(io.StringIO(dose.csv_text(summary, "outliers"))))
    assert row[1] == HOSTILE and row[4] == f"Head {HOSTILE}"  # CSV is data: quoted, not escaped
    reader.close()


def test_csv_cells_cannot_start_a_spreadsheet_formula(tmp_path: Path) -> None:
    import csv
    import io

    events = [synthetic(i, 90.0, 900.0, AccessionNumber=v, **{"Acquisition Protocol": "Head"})
              for i, v in enumerate(["=HYPERLINK(\"x\")", "+1", "-2+3", "@SUM(A1)", "ok"])]  # fmt: skip
    summary = summarize(snapshot(make_index(tmp_path / "i.sqlite", events)), DoseFilter(), Levels())
    got = {r[1] for r in list(csv.reader(io.StringIO(dose.csv_text(summary, "outliers"))))[1:]}
    assert got == {'\'=HYPERLINK("x")', "+1", "'-2+3", "'@SUM(A1)", "ok"}  # a number stays


# --- CSV ------------------------------------------------------------------------------------
def test_csv_export_is_the_table_shown_with_every_row(tmp_path: Path) -> None:
    import csv
    import io

    snap = snapshot(make_index(tmp_path / "i.sqlite", rdsr_events()))
    summary = summarize(snap, DoseFilter(), Levels())
    for name in dose.dose_view.TABLES:
        parsed = list(csv.reader(io.StringIO(dose.csv_text(summary, name))))
        header, body = rows(summary, name)
        assert parsed == [header, *body]
    studies = list(csv.reader(io.StringIO(dose.csv_text(summary, "studies"))))
    assert any(r[0] == TAP and r[-1] == "724.52" for r in studies)
    with pytest.raises(HttpError):
        dose.csv_text(summary, "../etc/passwd")


# --- refresh, replaced events, the summary cache -----------------------------------------------
def test_a_refresh_reads_new_events_and_forgets_replaced_ones(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    index = SqliteIndex("t", path)
    index.send([synthetic(1, 5.0, 50.0)])
    reader = DoseReader.sqlite(path)
    assert [e.ctdivol for e in reader.snapshot().events] == [5.0]
    index.send([synthetic(2, 6.0, 60.0)])
    assert sorted(e.ctdivol or 0 for e in reader.snapshot().events) == [5.0, 6.0]
    index.send([synthetic(3, 1.0, 10.0)])
    assert sorted(e.ctdivol or 0 for e in reader.snapshot().events) == [1.0, 5.0, 6.0]
    index.send([synthetic(2, 7.0, 70.0)])  # the same event id, a new body: replaced
    assert sorted(e.ctdivol or 0 for e in reader.snapshot().events) == [1.0, 5.0, 7.0]
    index.close()
    reader.close()


def test_the_summary_cache_serves_a_restart_without_reading_the_index_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_index(tmp_path / "i.sqlite", rdsr_events())
    cache = tmp_path / "cache" / "dose.sqlite"
    first = snapshot(path, cache=cache)
    reads: list[tuple[int, int]] = []
    real = DoseReader._read

    def counting(self: DoseReader, after: int, upto: int) -> Any:
        reads.append((after, upto))
        return real(self, after, upto)

    monkeypatch.setattr(DoseReader, "_read", counting)
    assert snapshot(path, cache=cache) == first
    assert reads == []  # nothing new: the index's fields were not read
    index = SqliteIndex("t", path)
    index.send([synthetic(1, 5.0, 50.0)])
    index.close()
    again = snapshot(path, cache=cache)
    assert len(again.events) == len(first.events) + 1 and len(reads) == 1
    # another index at the same path (made again): the cache is not used for it
    path.unlink()
    make_index(path, [synthetic(9, 1.0, 2.0)])
    assert [e.study_uid for e in snapshot(path, cache=cache).events] == ["2.25.9"]


def test_a_broken_cache_file_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_index(tmp_path / "i.sqlite", [synthetic(1, 5.0, 50.0)])
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"not a database" * 100)
    assert len(snapshot(path, cache=cache).events) == 1
    assert "summary cache" in caplog.text


# --- the page (its function, without a browser) and the report -----------------------------------
def fake_service(tmp_path: Path, index: Path, dose_section: dict[str, Any] | None = None) -> Any:
    config = SimpleNamespace(
        sinks={
            "index": {"Kind": "sqlite_index", "Path": str(index)},
            "splunk": {"Kind": "splunk_hec"},
        },
        sinks_base=tmp_path,
        state_dir=tmp_path / "state",
        dose=dose_section or {},
    )
    return SimpleNamespace(config=config)


def page(service: Any, **get: str) -> View | Reply:
    return dose.page(PageContext(service, get, "/dicomsync/ui/"))


def test_the_page_reads_a_new_index_in_the_background_then_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dose._readers.clear()
    index = make_index(tmp_path / "i.sqlite", rdsr_events())
    small = page(fake_service(tmp_path / "a", index))  # a small index: read at once
    assert isinstance(small, View) and small.status == 200 and "724.52" in small.body
    dose._readers.clear()
    monkeypatch.setattr(dose, "FIRST_READ_WAIT", 0.0)  # as if the index were big:
    real = DoseReader._refresh

    def slow(self: DoseReader) -> bool:  # the first read outlasts the first request
        if not self.ready:
            time.sleep(0.5)
        return real(self)

    monkeypatch.setattr(DoseReader, "_refresh", slow)
    service = fake_service(tmp_path, index)
    first = page(service)
    assert isinstance(first, View) and first.status == 503 and "reading" in str(first.body)
    deadline = time.monotonic() + 30
    while True:
        view = page(service)
        assert isinstance(view, View)
        if view.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert view.status == 200
    assert "724.52" in view.body and 'action="/dicomsync/ui/dose"' in view.body
    assert "/dicomsync/ui/dose?csv=protocols" in view.body
    csv = page(service, csv="studies", since="1997-01-01", until="1997-01-01")
    assert isinstance(csv, Reply) and csv.content_type.startswith("text/csv")
    assert str(csv.body).count("\r\n") == 2 and "724.52" in str(csv.body)
    with pytest.raises(HttpError) as err:
        page(service, since="1997-13-01")
    assert err.value.status == 400
    missing = page(service, index="nope")
    assert (
        isinstance(missing, View) and missing.status == 404 and "index sinks: index" in missing.body
    )
    bad = page(fake_service(tmp_path, index, {"ReferenceLevels": {"Head": [2, 1]}}))
    assert isinstance(bad, View) and bad.status == 500 and "reference first" in bad.body
    assert (tmp_path / "state" / "dose").is_dir()  # the summary cache, beside the queue
    dose._readers.clear()


def test_the_report_is_one_file_without_external_references(tmp_path: Path) -> None:
    index = make_index(tmp_path / "i.sqlite", rdsr_events())
    reader = DoseReader.sqlite(index)
    html = dose.report(reader, DoseFilter(), Levels(), index="index")
    reader.close()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert not re.search(r"<link\b", html) and "<script src" not in html
    assert "Chart.js v3" in html  # Debian's chart.min.js, inlined
    assert "724.52" in html and html.count('href="data:text/csv') == 5


def test_cli_dose_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DICOMSYNC_CACHE_DIR", str(tmp_path / "cache"))
    make_index(tmp_path / "i.sqlite", rdsr_events())
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    assert runner.invoke(cli, ["sink", "add", "sqlite_index", "ix", "i.sqlite"]).exit_code == 0
    out = tmp_path / "report.html"
    result = runner.invoke(
        cli,
        [
            "dose",
            "report",
            "--sink",
            "ix",
            "--since",
            "1997-01-01",
            "--until",
            "1997-12-31",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "1997-01-01 to 1997-12-31" in result.output
    text = out.read_text(encoding="utf-8")
    assert "724.52" in text and "2013-06-11" not in text.split("<main>")[1].split("dose-studies")[1]
    levels = tmp_path / "levels.json"
    levels.write_text('{"ReferenceLevels": {"Thorax^TAP (Adult)": [0.1, 0.2]}}')
    result = runner.invoke(cli, ["dose", "report", "--levels", str(levels), "--out", str(out)])
    assert result.exit_code == 0, result.output  # the only index: --sink may be left out
    assert "Thorax^TAP (Adult) 0.10 / 0.20 mGy" in out.read_text(encoding="utf-8")
    levels.write_text('{"ReferenceLevels": {"Head": [3, 1]}}')
    result = runner.invoke(cli, ["dose", "report", "--levels", str(levels), "--out", str(out)])
    assert (
        result.exit_code == 1
        and result.output.startswith("Error: ")
        and result.output.count("\n") == 1
    )
    monkeypatch.setenv("SPLUNK_HEC_TOKEN", "x")
    runner.invoke(cli, ["sink", "add", "splunk_hec", "s", "https://splunk:8088"])
    result = runner.invoke(cli, ["dose", "report", "--sink", "s", "--out", str(out)])
    assert result.exit_code == 1 and "not an index" in result.output


# --- the PostgreSQL index -----------------------------------------------------------------------
def test_the_postgresql_index_gives_the_same_snapshot(
    tmp_path: Path, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomsync.sinks.postgresql_index import PostgresIndex

    url = pg_cluster.create_database()
    monkeypatch.setenv("DICOMSYNC_DB_PASSWORD", pg_cluster.password)
    section = {"Kind": "postgresql_index", "Url": url, "PasswordEnv": "DICOMSYNC_DB_PASSWORD"}
    events = [*rdsr_events(), synthetic(1, 5.0, 50.0)]
    sink = PostgresIndex.from_config("pg", section, base_dir=tmp_path)
    sink.send(events)
    reader = dose.reader_for("postgresql_index", section, tmp_path, shared=False)
    got = reader.snapshot()
    want = snapshot(make_index(tmp_path / "i.sqlite", events))
    key = repr  # the rows' order is the index's own (PostgreSQL writes in id order)
    assert sorted(got.events, key=key) == sorted(want.events, key=key)
    assert sorted(got.totals, key=key) == sorted(want.totals, key=key)
    assert got.modalities == want.modalities
    assert 724.52 in {t.total_dlp for t in got.totals}
    sink.send([synthetic(1, 7.0, 70.0)])  # replaced: the old row is deleted
    assert sorted(e.ctdivol or 0 for e in reader.snapshot().events if e.study_uid == "2.25.1") == [
        7.0
    ]
    reader.close()
    sink.close()


def test_the_service_reads_the_dose_index_ahead_at_its_start(tmp_path: Path) -> None:
    """The first page request after a restart finds the summary loaded: the service
    starts reading the default index when it starts, not when the page is asked for."""
    from test_console import make_service

    dose._readers.clear()
    index = make_index(tmp_path / "i.sqlite", rdsr_events())
    sinks = {"index": {"Kind": "sqlite_index", "Path": str(index)}}
    service = make_service(tmp_path, Sinks=sinks, SinksBackfill=False)
    cfg = service.config
    assert cfg is not None
    service.start()
    try:
        reader = dose._reader(cfg, "index")
        deadline = time.monotonic() + 30
        while not reader.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reader.ready  # no page was asked for
    finally:
        service.stop()
        dose._readers.clear()
