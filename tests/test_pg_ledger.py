"""The sinks' delivered ledger on PostgreSQL: several nodes' Splunk sinks share one, so an
event one node delivered is never posted again by another (and the CLI's SQLite file is
untouched outside ``shared_ledger``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_cluster import PgCluster
from test_sinks_hec import GOOD, assert_once, events, hec, hec_server, make_sink  # noqa: F401

from dicomsync.errors import SinkFatal, SinkRetryable
from dicomsync.pg import SAME_AS_USER, PgTarget
from dicomsync.sinks.base import Ledger, open_ledger, shared_ledger
from dicomsync.sinks.pg_ledger import PgLedger
from dicomsync.tags import Event

from servers.hec import HecServer

ENV = "TEST_PG_PASSWORD"


@pytest.fixture
def target(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgTarget]:
    monkeypatch.setenv(ENV, pg_cluster.password)
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    yield PgTarget.checked(pg_cluster.create_database(), ENV, "dicomsync")


def test_two_nodes_share_what_splunk_has(
    target: PgTarget,
    hec: HecServer,  # noqa: F811
    events: list[Event],  # noqa: F811
    tmp_path: Path,
) -> None:
    with shared_ledger(target):
        node1 = make_sink(hec, tmp_path / "node1")
        node2 = make_sink(hec, tmp_path / "node2")
    assert isinstance(node1.ledger, PgLedger) and isinstance(node2.ledger, PgLedger)
    half = len(events) // 2
    assert node1.send(events[:half]).delivered == {e.id for e in events[:half]}
    # node 2 gets every event (a job taken over, or the same study seen twice): it posts
    # only the half node 1 has not delivered, and reports all of them delivered
    assert node2.send(events).delivered == {e.id for e in events}
    assert_once(hec, events)
    assert node1.has({e.id for e in events}) == {e.id for e in events}
    assert node1.stats()["delivered"] == len(events)
    # neither node wrote an SQLite ledger
    assert not list(tmp_path.rglob("*.ledger.sqlite"))
    node1.close()
    node2.close()


def test_ledger_per_sink_and_concurrent_adds(target: PgTarget) -> None:
    a, b = PgLedger(target, "a"), PgLedger(target, "b")
    ids = [f"{i}:instance" for i in range(500)]
    threads = [
        threading.Thread(target=a.add, args=(ids,)),
        threading.Thread(target=PgLedger(target, "a").add, args=(list(reversed(ids)),)),
        threading.Thread(target=b.add, args=(ids[:10],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a.count() == 500 and b.count() == 10
    assert b.known(ids) == set(ids[:10])
    a.close()
    with pytest.raises(SinkRetryable, match="closed"):
        a.add(["x"])


def test_outside_shared_ledger_the_sqlite_file(tmp_path: Path, target: PgTarget) -> None:
    assert isinstance(open_ledger(tmp_path / "l.sqlite", "k"), Ledger)
    with shared_ledger(None):
        assert isinstance(open_ledger(tmp_path / "l.sqlite", "k"), Ledger)
    with shared_ledger(target):
        assert isinstance(open_ledger(tmp_path / "l.sqlite", "k"), PgLedger)
    assert isinstance(open_ledger(tmp_path / "l.sqlite", "k"), Ledger)


def test_errors(target: PgTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    from orthanc_server import free_port

    down = PgTarget.checked(f"postgresql://dicomsync@127.0.0.1:{free_port()}/x", ENV, "dicomsync")
    with pytest.raises(SinkRetryable, match="cannot read"):
        PgLedger(down, "s").known({"a"})
    monkeypatch.setenv(ENV, "wrong")
    with pytest.raises(SinkFatal, match="password") as info:
        PgLedger(target, "s").add(["a"])
    assert "wrong" not in str(info.value)


def test_a_schema_named_like_the_user_is_made_with_a_warning(
    target: PgTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """orthanc-postgresql connecting as that user would put its tables in it
    (tests/test_multinode.py's nodes do connect as the same user)."""
    same = PgTarget.checked(target.url, ENV, "dicomsync")
    with caplog.at_level("WARNING", logger="dicomsync.pg"):
        PgLedger(same, "s").add(["a"])
        PgLedger(same, "s").add(["b"])  # the schema exists now: said once
        PgLedger(PgTarget.checked(target.url, ENV, "dsq"), "s").add(["a"])
    assert [r.getMessage() for r in caplog.records] == [SAME_AS_USER % ("dicomsync", "PostgreSQL")]
