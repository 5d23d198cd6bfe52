"""The splunk_hec sink against the protocol-faithful HEC stand-in (tests/servers/hec.py)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_tags_flatten import dose_files

from dicomsync.errors import ConfigError, SinkFatal, SinkRetryable
from dicomsync.index_query import IndexQuery
from dicomsync.sinks.base import build_sink, delivered_before, rejected_before
from dicomsync.sinks.splunk_hec import SplunkHec
from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import Event, events_from_path

from dicomdata import data
from servers.hec import HecServer, Token

GOOD = "11111111-2222-3333-4444-555555555555"
ACKED = "aaaaaaaa-2222-3333-4444-555555555555"
DISABLED = "dddddddd-2222-3333-4444-555555555555"
ONLY_DICOM = "cccccccc-2222-3333-4444-555555555555"
CHANNEL = "0b6a1c3e-9f7d-4d8e-b1a2-3c4d5e6f7a8b"


@pytest.fixture(scope="module")
def hec_server() -> Iterator[HecServer]:
    server = HecServer(
        tokens=[
            Token(GOOD),
            Token(ACKED, use_ack=True),
            Token(DISABLED, disabled=True),
            Token(ONLY_DICOM, indexes=("dicom",)),
        ],
        users={"admin": "s3cret"},
    ).start()
    server.state.search_tokens.add("search-token-1")
    yield server
    server.stop()


@pytest.fixture
def hec(hec_server: HecServer) -> HecServer:
    hec_server.reset()
    hec_server.state.ack_after_polls = 0
    return hec_server


@pytest.fixture(scope="module")
def events() -> list[Event]:
    out: list[Event] = []
    for path in dose_files():
        out += events_from_path(path)
    out += events_from_path(data("images", "CT_small.dcm"))
    return out


def make_sink(hec: HecServer, tmp_path: Path, **options: Any) -> SplunkHec:
    section = {
        "Kind": "splunk_hec",
        "Url": hec.url,
        "TokenEnv": "TEST_HEC_TOKEN",
        "AckPollSeconds": 0.01,
        "BatchEvents": 20,
        **options,
    }
    sink = build_sink("splunk", section, tmp_path)
    assert isinstance(sink, SplunkHec)
    return sink


def assert_once(hec: HecServer, events: list[Event]) -> None:
    received = hec.event_ids()
    assert sorted(received) == sorted(e.id for e in events)  # every event, exactly once


def test_batches_every_event_exactly_once(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    sink = make_sink(hec, tmp_path, Index="main", Host="test-host")
    assert sink.send(events).delivered == {e.id for e in events}
    assert_once(hec, events)
    posts = [s for p, s in hec.state.requests if p == "/services/collector/event"]
    assert len(posts) >= len(events) // 20  # batched by count
    first = hec.state.events[0]
    assert first["sourcetype"] == "dicomsync:instance"
    assert first["host"] == "test-host" and first["index"] == "main"
    assert first["source"] == events[0].source != ""  # the instance's origin (its file path)
    assert first["fields"]["time_source"] == events[0].time_source
    assert first["event"] == events[0].fields
    assert {e["sourcetype"] for e in hec.state.events} == {
        "dicomsync:instance",
        "dicomsync:dose_report",
        "dicomsync:dose_event",
    }
    # a repeat sends nothing: the ledger knows
    before = len(hec.state.requests)
    assert sink.send(events).delivered == {e.id for e in events}
    assert len(hec.state.requests) == before
    # a new sink object over the same ledger file knows too
    again = make_sink(hec, tmp_path)
    assert again.has([e.id for e in events]) == {e.id for e in events}
    assert again.send(events).delivered == {e.id for e in events}
    assert len(hec.state.requests) == before


@pytest.mark.parametrize("batch_bytes", [1024, 30_000, 200_000])
def test_batches_by_bytes(
    hec: HecServer,
    tmp_path: Path,
    events: list[Event],
    monkeypatch: pytest.MonkeyPatch,
    batch_bytes: int,
) -> None:
    """Every post is at most BatchBytes (an event larger than that goes alone), is made of
    whole events, and is as full as BatchBytes allows (the next event did not fit)."""
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    sink = make_sink(hec, tmp_path, BatchEvents=10_000, BatchBytes=batch_bytes, Gzip=False)
    sink.send(events)
    assert_once(hec, events)
    sizes = [len(sink.envelope(e)) for e in events]
    posts = [n for p, n in hec.state.bodies if p == "/services/collector/event"]
    assert len(posts) == len([s for p, s in hec.state.requests if p == "/services/collector/event"])
    assert sum(posts) == sum(sizes)
    assert len(posts) > 1  # it did split
    pos = 0
    for n, post in enumerate(posts):
        run = 0
        start = pos
        while run < post:
            run += sizes[pos]
            pos += 1
        assert run == post, f"post {n} ({post} bytes) is not made of whole events"
        count = pos - start
        assert post <= batch_bytes or count == 1, (n, post, count)
        if pos < len(sizes):
            assert post + sizes[pos] > batch_bytes, f"post {n} stopped before it was full"
    assert pos == len(sizes)


def test_runs_of_503_deliver_exactly_once(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink does not retry: each 503 is one SinkRetryable, the caller tries again."""
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    sink = make_sink(hec, tmp_path)
    assert sink.send(events[:30]).delivered == {e.id for e in events[:30]}
    hec.busy(3)
    for _ in range(3):
        with pytest.raises(SinkRetryable) as info:
            sink.send(events)
        assert "server busy or failing (503: code 9, Server is busy)" in str(info.value)
        assert str(info.value).endswith("; events kept for a later retry")
        assert delivered_before(info.value) >= {e.id for e in events[:30]}
    assert [s for _, s in hec.state.requests].count(503) == 3
    # later, the same events again: each reaches Splunk exactly once in total
    assert sink.send(events).delivered == {e.id for e in events}
    assert_once(hec, events)


def test_5xx_and_network_errors_are_retryable(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    sink = make_sink(hec, tmp_path)
    hec.fail(2)
    for _ in range(2):
        with pytest.raises(SinkRetryable, match=r"\(500: code 8, Internal server error\)"):
            sink.send(events[:5])
    sink.send(events[:5])
    assert_once(hec, events[:5])
    dead = make_sink(hec, tmp_path / "dead", Url="http://127.0.0.1:9")
    with pytest.raises(SinkRetryable, match=r"HEC http://127.0.0.1:9/.*: no answer \("):
        dead.send(events[:1])


def test_invalid_token_keeps_everything_until_fixed(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink(hec, tmp_path)
    monkeypatch.delenv("TEST_HEC_TOKEN", raising=False)
    with pytest.raises(SinkFatal) as info:
        sink.send(events)
    assert str(info.value) == (
        "splunk_hec 'splunk': environment variable TEST_HEC_TOKEN is not set "
        "(it must hold the HEC token); events are kept"
    )
    monkeypatch.setenv("TEST_HEC_TOKEN", "not-a-token")
    with pytest.raises(SinkFatal) as info:
        sink.send(events)
    assert str(info.value) == (
        f"splunk_hec 'splunk': HEC {hec.url}/services/collector/event (token from "
        "$TEST_HEC_TOKEN): not authorised (403: code 4, Invalid token); check the "
        "credentials; sink stopped, events kept"
    )
    assert "not-a-token" not in str(info.value)
    monkeypatch.setenv("TEST_HEC_TOKEN", DISABLED)
    with pytest.raises(SinkFatal, match=r"\(403: code 1, Token disabled\)"):
        sink.send(events)
    assert hec.event_ids() == []
    assert sink.has([e.id for e in events]) == set()
    # the token is fixed and the sink restarted: everything arrives, once
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    restarted = make_sink(hec, tmp_path)
    assert restarted.send(events).delivered == {e.id for e in events}
    assert_once(hec, events)


def test_partial_batch_resends_after_the_bad_event(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    bad = {events[7].id, events[8].id, events[25].id}
    hec.state.reject_when = lambda env: env["fields"]["dicomsync_id"] in bad
    sink = make_sink(hec, tmp_path)
    result = sink.send(events)
    assert result.delivered == {e.id for e in events} - bad
    assert set(result.rejected) == bad
    assert result.rejected[events[7].id] == "400, code 6: Invalid data format"
    assert sorted(hec.event_ids()) == sorted(e.id for e in events if e.id not in bad)
    assert sink.has(bad) == set()


def test_a_send_failing_after_a_rejection_still_reports_it(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rejection is the call's own (``SendResult``, or ``rejected_before`` on its error),
    and the CLI's retry adds every attempt's result up."""
    from dicomsync.cli.tags import retried
    from dicomsync.queue import RetryPolicy

    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    bad = events[7].id
    seen: list[str] = []

    def reject(envelope: dict[str, Any]) -> bool:
        if envelope["fields"]["dicomsync_id"] != bad:
            return False
        if not seen:
            hec.busy(1)  # the rest of the batch, posted again, finds HEC busy
        seen.append(bad)
        return True

    hec.state.reject_when = reject
    sink = make_sink(hec, tmp_path)
    with pytest.raises(SinkRetryable) as info:
        sink.send(events)
    assert rejected_before(info.value) == {bad: "400, code 6: Invalid data format"}
    assert delivered_before(info.value) == {e.id for e in events[:7]}
    assert not hasattr(sink, "rejected")  # nothing shared between calls
    seen.clear()
    result = retried(
        lambda: sink.send(events), "sink", RetryPolicy(0.01, 0.01, 3), sleep=lambda _: None
    )
    assert result.delivered == {e.id for e in events} - {bad}
    assert result.rejected == {bad: "400, code 6: Invalid data format"}
    assert len(seen) == 2  # rejected by both attempts, reported once


def test_indexer_acknowledgement(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", ACKED)
    hec.state.ack_after_polls = 2
    sink = make_sink(hec, tmp_path, Ack=True)
    assert sink.send(events).delivered == {e.id for e in events}
    assert_once(hec, events)
    acks = [p for p, _ in hec.state.requests if p == "/services/collector/ack"]
    assert len(acks) >= 3
    # acks that never come: nothing is recorded as delivered
    hec.reset()
    hec.state.ack_after_polls = 10_000
    slow = make_sink(hec, tmp_path / "slow", Ack=True, AckTimeoutSeconds=0.3)
    with pytest.raises(SinkRetryable, match=r"not acknowledged within 0\.3s"):
        slow.send(events[:3])
    assert slow.has([e.id for e in events[:3]]) == set()
    # a sink without Ack on a token that needs a channel: one clear fatal line
    plain = make_sink(hec, tmp_path / "plain")
    with pytest.raises(SinkFatal, match=r"rejected \(400: code 10, Data channel is missing\)"):
        plain.send(events[:1])


def test_incorrect_index_is_fatal(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", ONLY_DICOM)
    sink = make_sink(hec, tmp_path, Index="other")
    with pytest.raises(SinkFatal, match=r"\(400: code 7, Incorrect index\)"):
        sink.send(events[:2])
    assert hec.event_ids() == []


def test_query_through_search_api_matches_sqlite(
    hec: HecServer, tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", GOOD)
    monkeypatch.setenv("SPLUNK_USER", "admin")
    monkeypatch.setenv("SPLUNK_PASSWORD", "s3cret")
    sink = make_sink(
        hec,
        tmp_path,
        SearchUrl=hec.url,
        SearchUserEnv="SPLUNK_USER",
        SearchPasswordEnv="SPLUNK_PASSWORD",
    )
    sink.send(events)
    index = SqliteIndex("local", tmp_path / "idx.sqlite")
    index.send(events)
    for text in (
        "Modality=SR",
        "Modality!=SR",
        '"CT Dose.Mean CTDIvol">5',
        'Manufacturer=SIEM* AND EventType="CT Acquisition"',
        '"CT Acquisition Parameters.CT X-Ray Source Parameters{}.KVP"=140',
        'StudyDescription="Thorax^TAP (Adult)"',
        "StudyDate<20100101",
    ):
        q = IndexQuery.parse(text)
        from_splunk = list(sink.query(q))
        assert from_splunk == list(index.query(q)), text
        assert from_splunk, text
    assert hec.state.searches[0].startswith('search sourcetype="dicomsync:*" | where')
    # a search token instead of a login
    monkeypatch.setenv("SPLUNK_SEARCH_TOKEN", "search-token-1")
    bearer = make_sink(hec, tmp_path, SearchUrl=hec.url, SearchTokenEnv="SPLUNK_SEARCH_TOKEN")
    assert list(bearer.query(IndexQuery.parse("Modality=SR")))
    monkeypatch.setenv("SPLUNK_PASSWORD", "wrong")
    bad = make_sink(
        hec,
        tmp_path,
        SearchUrl=hec.url,
        SearchUserEnv="SPLUNK_USER",
        SearchPasswordEnv="SPLUNK_PASSWORD",
    )
    with pytest.raises(SinkFatal, match=r"login: not authorised \(401: Login failed\)"):
        list(bad.query(IndexQuery.parse("Modality=SR")))


def test_config_errors(tmp_path: Path, hec: HecServer) -> None:
    with pytest.raises(ConfigError, match="option 'Url' is required"):
        build_sink("s", {"Kind": "splunk_hec"}, tmp_path)
    with pytest.raises(ConfigError, match=r"CaBundle .*missing\.pem does not exist"):
        make_sink(hec, tmp_path, CaBundle="missing.pem")
    with pytest.raises(ConfigError, match="BatchEvents must be an integer >= 1"):
        make_sink(hec, tmp_path, BatchEvents=0)
    sink = make_sink(hec, tmp_path)
    assert sink.verify is True  # TLS verification is on by default
    with pytest.raises(ConfigError, match='set "SearchUrl"'):
        list(sink.query(IndexQuery.parse("Modality=SR")))


# --- the stand-in itself speaks the documented protocol --------------------------------------
def post(
    hec: HecServer, body: bytes, headers: dict[str, str], path: str = "/services/collector/event"
) -> Any:
    r = requests.post(hec.url + path, data=body, headers=headers, timeout=10)
    return r.status_code, r.json()


def test_stand_in_status_codes(hec: HecServer) -> None:
    ok = {"Authorization": f"Splunk {GOOD}"}
    ev = b'{"event": {"a": 1}}'
    assert post(hec, ev, {}) == (401, {"text": "Token is required", "code": 2})
    assert post(hec, ev, {"Authorization": "Bearer x"}) == (
        401,
        {"text": "Invalid authorization", "code": 3},
    )
    assert post(hec, ev, {"Authorization": "Splunk nope"}) == (
        403,
        {"text": "Invalid token", "code": 4},
    )
    assert post(hec, ev, {"Authorization": f"Splunk {DISABLED}"}) == (
        403,
        {"text": "Token disabled", "code": 1},
    )
    assert post(hec, b"", ok) == (400, {"text": "No data", "code": 5})
    assert post(hec, b'{"event": 1}{"nope": 2}', ok) == (
        400,
        {"text": "Event field is required", "code": 12, "invalid-event-number": 1},
    )
    assert post(hec, b'{"event": ""}', ok) == (
        400,
        {"text": "Event field cannot be blank", "code": 13, "invalid-event-number": 0},
    )
    assert post(hec, b'{"event": 1} {"event": 2} {bad', ok) == (
        400,
        {"text": "Invalid data format", "code": 6, "invalid-event-number": 2},
    )
    assert post(hec, gzip.compress(ev * 3), {**ok, "Content-Encoding": "gzip"}) == (
        200,
        {"text": "Success", "code": 0},
    )
    hec.busy(1)
    assert post(hec, ev, ok) == (503, {"text": "Server is busy", "code": 9})
    acked = {"Authorization": f"Splunk {ACKED}"}
    assert post(hec, ev, acked) == (400, {"text": "Data channel is missing", "code": 10})
    assert post(hec, ev, {**acked, "X-Splunk-Request-Channel": "x"}) == (
        400,
        {"text": "Invalid data channel", "code": 11},
    )
    assert post(hec, ev, {**acked, "X-Splunk-Request-Channel": CHANNEL}) == (
        200,
        {"text": "Success", "code": 0, "ackId": 0},
    )
    assert post(hec, ev, {**acked, "X-Splunk-Request-Channel": CHANNEL}) == (
        200,
        {"text": "Success", "code": 0, "ackId": 1},
    )
    status, answer = post(
        hec,
        json.dumps({"acks": [0, 1, 7]}).encode(),
        {**acked, "X-Splunk-Request-Channel": CHANNEL},
        path=f"/services/collector/ack?channel={CHANNEL}",
    )
    assert (status, answer) == (200, {"acks": {"0": True, "1": True, "7": False}})
    # as Splunk does, an ackId answered true is dropped: asking again says false
    status, answer = post(
        hec,
        json.dumps({"acks": [0, 1]}).encode(),
        {**acked, "X-Splunk-Request-Channel": CHANNEL},
        path=f"/services/collector/ack?channel={CHANNEL}",
    )
    assert (status, answer) == (200, {"acks": {"0": False, "1": False}})
    # a token with ack disabled accepts a channel, answers without ackId, and has no /ack
    assert post(hec, ev, {**ok, "X-Splunk-Request-Channel": CHANNEL}) == (
        200,
        {"text": "Success", "code": 0},
    )
    assert post(
        hec,
        b'{"acks": [0]}',
        {**ok, "X-Splunk-Request-Channel": CHANNEL},
        path=f"/services/collector/ack?channel={CHANNEL}",
    ) == (400, {"text": "ACK is disabled", "code": 14})
    # 2 from the first batch, 3 gzipped, 2 acked, 1 without ack: events before a bad
    # one are indexed
    assert len(hec.state.events) == 1 + 2 + 3 + 2 + 1
    r = requests.get(hec.url + "/services/collector/health", timeout=10)
    assert r.json() == {"text": "HEC is healthy", "code": 17}
