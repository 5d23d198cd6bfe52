"""The embedded index and its PostgreSQL form: store events, repeats send nothing, answer the
query language (every test of an ``index`` runs on both kinds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_index_query import EVENT
from test_tags_flatten import dose_files

from dicomsync.config import Config
from dicomsync.errors import ConfigError
from dicomsync.index_query import IndexQuery
from dicomsync.sinks.base import build_sink
from dicomsync.sinks.postgresql_index import PostgresIndex
from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import Event, events_from_path

from dicomdata import data

Index = SqliteIndex | PostgresIndex


@pytest.fixture(scope="module")
def all_events() -> list[Event]:
    events: list[Event] = []
    for path in dose_files():
        events += events_from_path(path)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        events += events_from_path(data("images", name))
    return events


@pytest.fixture(params=["sqlite_index", "postgresql_index"])
def index(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Index]:
    """The embedded index, and the same contract on PostgreSQL (tests/pg_cluster.py)."""
    if request.param == "sqlite_index":
        sink = build_sink("local", {"Kind": "sqlite_index", "Path": "idx.sqlite"}, tmp_path)
        assert isinstance(sink, SqliteIndex)
        assert sink.path == tmp_path / "idx.sqlite"
    else:
        pg = request.getfixturevalue("pg_cluster")
        monkeypatch.setenv("TEST_PG_PASSWORD", pg.password)
        section = {"Kind": "postgresql_index", "Url": pg.create_database()}
        sink = build_sink("local", {**section, "PasswordEnv": "TEST_PG_PASSWORD"}, tmp_path)
        assert isinstance(sink, PostgresIndex)
    yield sink
    sink.close()


def test_stores_everything_once(index: Index, all_events: list[Event]) -> None:
    ids = {e.id for e in all_events}
    assert index.has(ids) == set()
    assert index.send(all_events).delivered == ids
    assert index.has(ids) == ids
    stats = index.stats()
    assert sum(stats["events"].values()) == len(ids)
    # a repeat writes nothing new
    assert index.send(all_events).delivered == ids
    assert sum(index.stats()["events"].values()) == len(ids)
    stored = index.event(all_events[1].id)
    assert stored is not None and stored["event"] == all_events[1].fields


def test_changed_event_is_replaced(index: Index) -> None:
    ev = Event(
        "x:instance", "dicomsync:instance", 1.0, "study+tz", {"StudyInstanceUID": "1.2", "A": "1"}
    )
    index.send([ev])
    ev2 = Event(
        "x:instance", "dicomsync:instance", 1.0, "study+tz", {"StudyInstanceUID": "1.2", "A": "2"}
    )
    index.send([ev2])
    assert [h.study_uid for h in index.query(IndexQuery.parse("A=2"))] == ["1.2"]
    assert list(index.query(IndexQuery.parse("A=1"))) == []


def test_queries_match_in_memory_semantics(index: Index, all_events: list[Event]) -> None:
    index.send(all_events)
    queries = [
        "Modality=SR",
        "Modality!=SR",
        '"CT Dose.Mean CTDIvol">50',
        '"CT Dose.Mean CTDIvol"<1',
        "Manufacturer=SIEM*",
        'SeriesDescription="Dose Record"',
        'EventType="CT Acquisition" AND Manufacturer=SIEMENS',
        '"CT Acquisition Parameters.CT X-Ray Source Parameters{}.KVP"=140',
        '"X-Ray Radiation Dose Report.CT Accumulated Dose Data.CT Dose Length Product Total">700',
        "StudyDate>=20180101 AND StudyDate<20190101",
    ]
    for text in queries:
        q = IndexQuery.parse(text)
        expected: dict[str, int] = {}
        for e in all_events:
            if q.matches(e.fields):
                expected[e.study_uid] = expected.get(e.study_uid, 0) + 1
        got = {h.study_uid: h.events for h in index.query(q)}
        assert got == expected, text
    # and a few that must find something specific
    dual = {h.study_uid for h in index.query(IndexQuery.parse(queries[7]))}
    assert dual == {"1.3.6.1.4.1.5962.99.1.3532166422.478333303.1485295916310.3.0"}  # QA-DS
    tap = {h.study_uid for h in index.query(IndexQuery.parse(queries[8]))}
    assert "1.3.6.1.4.1.5962.99.1.2662687737.2058515598.1471541535737.3.0" in tap
    assert {h.study_uid for h in index.query(IndexQuery.parse("Modality!=SR"))} >= {
        "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"  # CT_small
    }


def test_synthetic_event_query(index: Index) -> None:
    index.send(
        [
            Event(
                "e:instance", "dicomsync:instance", 0.0, "now", {"StudyInstanceUID": "9.9", **EVENT}
            )
        ]
    )
    assert [h.study_uid for h in index.query(IndexQuery.parse('SeriesDescription="Dose [R*"'))] == [
        "9.9"
    ]
    assert list(index.query(IndexQuery.parse('SeriesDescription="Dose ?Record*"'))) == []
    assert list(index.query(IndexQuery.parse("Empty=*"))) == []


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="option 'Path' is required"):
        build_sink("x", {"Kind": "sqlite_index"}, tmp_path)
    with pytest.raises(ConfigError, match="unknown sink kind 'nope'"):
        build_sink("x", {"Kind": "nope"}, tmp_path)
    cfg_path = tmp_path / "dicomsync.json"
    cfg_path.write_text('{"Sinks": {"local": {"Kind": "sqlite_index", "Path": "i.sqlite"}}}')
    sink = Config.load(cfg_path).sink("local")
    assert sink.to_config() == {"Kind": "sqlite_index", "Path": "i.sqlite"}
