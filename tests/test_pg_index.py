"""The ``postgresql_index`` sink beyond the contract it shares with ``sqlite_index``
(tests/test_sinks_sqlite.py runs that on both): the query language's corner cases on both
kinds, several writers at once, the password rule, errors, and ``replicate --where``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_cluster import PgCluster
from test_cli_tags import _dest_studies, setup  # noqa: F401 (the fixture)
from test_index_query import EVENT

from dicomsync.errors import ConfigError, SinkFatal, SinkRetryable
from dicomsync.index_query import IndexQuery
from dicomsync.sinks.base import Sink, build_sink, delivered_before
from dicomsync.sinks.postgresql_index import PostgresIndex
from dicomsync.tags import Event

from conftest import Cli

ENV = "TEST_PG_PASSWORD"


@pytest.fixture
def pg(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> PgCluster:
    monkeypatch.setenv(ENV, pg_cluster.password)
    return pg_cluster


def pg_index(url: str, key: str = "shared") -> PostgresIndex:
    sink = build_sink(key, {"Kind": "postgresql_index", "Url": url, "PasswordEnv": ENV}, Path())
    assert isinstance(sink, PostgresIndex)
    return sink


@pytest.fixture(params=["sqlite_index", "postgresql_index", "postgresql_index en_US"])
def any_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    """Both kinds; PostgreSQL also in a database whose default collation is en_US (not C),
    where text order and LIKE would differ from SQLite's byte order without COLLATE "C"."""
    if request.param == "sqlite_index":
        sink = build_sink("i", {"Kind": "sqlite_index", "Path": "i.sqlite"}, tmp_path)
    else:
        cluster: PgCluster = request.getfixturevalue("pg")
        name = f"q_{abs(hash(request.node.nodeid)) % 10**9}"
        locale = (
            " LC_COLLATE 'en_US.utf8' LC_CTYPE 'en_US.utf8'" if "en_US" in request.param else ""
        )
        cluster.drop_database(name)
        cluster.psql(f'CREATE DATABASE "{name}" OWNER dicomsync TEMPLATE template0{locale}')
        sink = pg_index(cluster.dsn(name))
    yield sink
    sink.close()


TEXTS = ["a", "B", "b", "_x", "%y", "a_c", "abc", "a%c", "a\\c", "Z", "é", "ab"]


def _text_events() -> list[Event]:
    return [
        Event(
            f"t{i}:instance",
            "dicomsync:instance",
            0.0,
            "now",
            {"StudyInstanceUID": f"1.{i}", "T": t},
        )
        for i, t in enumerate(TEXTS)
    ] + [
        Event("e:instance", "dicomsync:instance", 0.0, "now", {"StudyInstanceUID": "9.9", **EVENT})
    ]


QUERIES = [
    # the in-memory cases of test_index_query, on one stored event
    "Modality=SR",
    "Modality=sr",
    "Modality!=CT",
    "Modality!=SR",
    "Missing!=x",
    '"CT Dose.Mean CTDIvol">50',
    '"CT Dose.Mean CTDIvol"<50',
    '"CT Dose.DLP"=0',
    "StudyDate>=20240101 AND StudyDate<20240201",
    "Sources{}.KVP=140",
    "Sources{}.KVP>150",
    "Manufacturer=SIEM*",
    "Manufacturer=*EMEN*",
    'SeriesDescription="Dose [Record]?"',
    'SeriesDescription="Dose [R*"',
    'SeriesDescription="Dose ?Record*"',
    "Empty=*",
    # LIKE's own wildcards and escape are plain characters in our globs
    "T=a_*",
    "T=a%*",
    "T=_*",
    "T=%*",
    'T="a\\\\*"',
    "T=a*c",
    "T!=a*",
    # text order is by code point, as in SQLite (B < Z < _ < a < b < é), whatever the locale
    "T<a",
    "T>Z",
    "T>=b",
    "T<_x",
    "T>b",
]


@pytest.mark.parametrize("text", QUERIES)
def test_query_language_same_answers_on_every_kind(any_index: Sink, text: str) -> None:
    events = _text_events()
    any_index.send(events)
    q = IndexQuery.parse(text)
    expected = sorted({e.study_uid for e in events if q.matches(e.fields)})
    assert sorted(h.study_uid for h in any_index.query(q)) == expected, text


def test_several_writers_store_each_event_once(pg: PgCluster) -> None:
    """Two nodes' sinks send overlapping batches at the same time: every call succeeds,
    every id is delivered to each, and the index holds each event once."""
    url = pg.create_database()
    nodes = [pg_index(url, "a"), pg_index(url, "b")]
    events = [
        Event(
            f"{i}:instance",
            "dicomsync:instance",
            0.0,
            "now",
            {"StudyInstanceUID": f"2.{i % 7}", "N": i},
        )
        for i in range(300)
    ]
    errors: list[BaseException] = []
    results: list[set[str]] = []

    def run(sink: PostgresIndex, order: list[Event]) -> None:
        try:
            for start in range(0, len(order), 25):
                results.append(set(sink.send(order[start : start + 50]).delivered))
        except BaseException as exc:  # pragma: no cover - the failure is the assertion
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(nodes[0], events)),
        threading.Thread(target=run, args=(nodes[1], list(reversed(events)))),
        threading.Thread(target=run, args=(nodes[0], events[::3] + events[1::3])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert set().union(*results) == {e.id for e in events}
    assert sum(nodes[1].stats()["events"].values()) == len(events)
    assert nodes[0].has({e.id for e in events}) == {e.id for e in events}
    for n in nodes:
        n.close()


def test_password_only_from_the_environment(pg: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg.create_database()
    with pytest.raises(ConfigError, match="user name or password in its URL"):
        pg_index(pg.dsn("x", password=True))
    with pytest.raises(ConfigError, match="Url must carry no password"):
        pg_index(url + "?password=" + pg.password)
    with pytest.raises(ConfigError, match="Url must start with postgresql://"):
        pg_index("mysql://127.0.0.1/x")
    monkeypatch.delenv(ENV)
    sink = pg_index(url)  # built without a connection: a down database only delays jobs
    ev = Event("p:instance", "dicomsync:instance", 0.0, "now", {"StudyInstanceUID": "1"})
    with pytest.raises(SinkFatal, match="password") as info:
        sink.send([ev])
    assert pg.password not in str(info.value)
    assert delivered_before(info.value) == set()
    monkeypatch.setenv(ENV, pg.password)
    assert sink.send([ev]).delivered == {"p:instance"}  # connects again at the next call
    assert sink.to_config() == {"Kind": "postgresql_index", "Url": url, "PasswordEnv": ENV}
    assert pg.password not in sink.describe()
    sink.close()


def test_database_down_is_retryable(pg: PgCluster) -> None:
    from orthanc_server import free_port

    sink = pg_index(f"postgresql://dicomsync@127.0.0.1:{free_port()}/x")
    ev = Event("d:instance", "dicomsync:instance", 0.0, "now", {"StudyInstanceUID": "1"})
    with pytest.raises(SinkRetryable, match="cannot write"):
        sink.send([ev])
    with pytest.raises(SinkFatal, match="does not exist"):
        pg_index(pg.dsn("no_such_db")).send([ev])


def test_replicate_where_reads_the_postgresql_index(
    setup: tuple[Cli, dict[str, set[str]], set[str]],  # noqa: F811
    tmp_path: Path,
    pg: PgCluster,
) -> None:
    cli, studies, dose_studies = setup
    url = pg.create_database()
    out = cli("sink", "add", "postgresql_index", "shared", url, "--password-env", ENV).output
    assert (
        out.strip()
        == f"added postgresql_index sink 'shared': postgresql_index {url} (schema dicomsync_index)"
    )
    assert pg.password not in (tmp_path / "dicomsync.json").read_text()
    cli("index", "src:*", "--sink", "shared")
    dose_keys = json.loads((tmp_path / "dose_keys.json").read_text())
    out = cli("replicate", "src", "dest", "--where", "Modality=SR").output
    assert len([line for line in out.splitlines() if line.startswith("sent ")]) == len(dose_keys)
    assert _dest_studies(tmp_path) == dose_studies
    assert len(dose_studies) < len(studies)
