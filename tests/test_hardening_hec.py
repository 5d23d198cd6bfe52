"""Issue 9 for the splunk_hec sink: one retry layer, acknowledgements (a token without
ack, pipelined acks, ack timeouts), TLS and network failures, the event's origin as
``source``, hostile answers. Against the HEC stand-in (tests/servers/hec.py)."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomsync.errors import SinkFatal, SinkRetryable
from dicomsync.sinks.base import build_sink, delivered_before
from dicomsync.sinks.splunk_hec import SplunkHec
from dicomsync.sinks.splunk_hec import sink as splunk_hec
from dicomsync.tags import Event

from servers.hec import HecServer, Token

PLAIN = "11111111-2222-3333-4444-555555555555"  # indexer acknowledgement off
ACKED = "aaaaaaaa-2222-3333-4444-555555555555"


@pytest.fixture
def hec() -> Iterator[HecServer]:
    server = HecServer(tokens=[Token(PLAIN), Token(ACKED, use_ack=True)]).start()
    yield server
    server.stop()


def events(n: int, prefix: str = "e", source: str = "") -> list[Event]:
    return [
        Event(f"{prefix}{i}:instance", "dicomsync:instance", 1e9 + i, "now", {"i": i}, source)
        for i in range(n)
    ]


def sink(
    url: str, tmp: Path, token: str, monkeypatch: pytest.MonkeyPatch, **opts: Any
) -> SplunkHec:
    monkeypatch.setenv("HH_TOKEN", token)
    section = {"Kind": "splunk_hec", "Url": url, "TokenEnv": "HH_TOKEN", "BatchEvents": 10}
    built = build_sink("splunk", {**section, **opts}, tmp)
    assert isinstance(built, SplunkHec)
    return built


def event_posts(hec: HecServer) -> list[int]:
    return [s for p, s in hec.state.requests if p == "/services/collector/event"]


# --- point 13: retry in one layer only ------------------------------------------------------
def test_the_sink_does_not_retry_a_busy_hec(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sink(hec.url, tmp_path, PLAIN, monkeypatch, Retries=6, BackoffSeconds=5)
    hec.busy(100)
    started = time.monotonic()
    with pytest.raises(SinkRetryable, match=r"\(503: code 9, Server is busy\)"):
        s.send(events(25))
    assert event_posts(hec) == [503]  # one request, no backoff inside the lease
    assert time.monotonic() - started < 1.0
    hec.busy(0)
    assert s.send(events(25)).delivered == {e.id for e in events(25)}


@pytest.mark.parametrize("failure", ["503", "500", "refused"])
def test_no_backoff_inside_the_sink(
    hec: HecServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """Every retryable failure goes straight up after one request: the sink never sleeps
    (the worker's backoff is the only one), whatever Retries/Backoff* say."""
    url = hec.url
    if failure == "503":
        hec.busy(100)
    elif failure == "500":
        hec.fail(100)
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    s = sink(url, tmp_path, PLAIN, monkeypatch, Retries=6, BackoffSeconds=5)
    slept: list[float] = []
    monkeypatch.setattr(splunk_hec.time, "sleep", slept.append)
    with pytest.raises(SinkRetryable):
        s.send(events(25))
    assert slept == []
    assert event_posts(hec) == ([] if failure == "refused" else [int(failure)])


# --- point 14: a token without indexer acknowledgement ----------------------------------
def test_ack_on_against_a_token_without_ack_stops_at_the_first_answer(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sink(hec.url, tmp_path, PLAIN, monkeypatch, Ack=True)
    batch = events(45)  # five batches of 10
    with pytest.raises(SinkFatal) as info:
        s.send(batch)
    message = str(info.value)
    assert "\n" not in message
    assert "indexer acknowledgement off" in message and '"Ack": false' in message
    assert "the 10 events HEC accepted are recorded" in message
    assert event_posts(hec) == [200]  # it stopped before sending more
    first = {e.id for e in batch[:10]}
    assert delivered_before(info.value) == first
    assert s.has([e.id for e in batch]) == first  # HEC accepted them: recorded
    # the admin sets Ack false: the rerun sends only the rest, nothing twice
    again = sink(hec.url, tmp_path, PLAIN, monkeypatch)
    assert again.send(batch).delivered == {e.id for e in batch}
    assert sorted(hec.event_ids()) == sorted(e.id for e in batch)


def test_ack_disabled_while_batches_are_in_flight(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/services/collector/ack answers 400 code 14: what HEC accepted counts as delivered."""
    hec.state.ack_after_polls = 10_000
    s = sink(hec.url, tmp_path, ACKED, monkeypatch, Ack=True, AckPollSeconds=0.01)
    batch = events(30)
    s.submit(batch)
    assert len(event_posts(hec)) == 3
    hec.state.tokens[ACKED].use_ack = False
    with pytest.raises(SinkFatal, match=r"indexer acknowledgement off") as info:
        s.flush()
    assert delivered_before(info.value) == {e.id for e in batch}
    assert s.has([e.id for e in batch]) == {e.id for e in batch}
    assert sorted(hec.event_ids()) == sorted(e.id for e in batch)


# --- point 14: several batches in flight on the channel --------------------------------
def test_acks_are_pipelined_across_submits(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hec.state.ack_delay = 0.3
    s = sink(hec.url, tmp_path, ACKED, monkeypatch, Ack=True, AckPollSeconds=0.05)
    studies = [events(10, prefix=f"s{k}-") for k in range(12)]  # one batch per study
    started = time.monotonic()
    confirmed: set[str] = set()
    for study in studies:
        confirmed |= s.submit(study).delivered
    confirmed |= s.flush().delivered
    elapsed = time.monotonic() - started
    every = {e.id for study in studies for e in study}
    assert confirmed == every and s.has(every) == every
    assert sorted(hec.event_ids()) == sorted(every)  # once each
    # one at a time this takes 12 x 0.3 s; in flight together about one ack delay
    assert elapsed < 0.3 * 12 / 3, elapsed
    acks = [p for p, _ in hec.state.requests if p == "/services/collector/ack"]
    assert len(acks) < len(studies)  # one /ack request asks for several batches


def test_at_most_ack_in_flight_batches_wait(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hec.state.ack_delay = 0.3  # longer than posting three batches takes, even on a busy machine
    s = sink(hec.url, tmp_path, ACKED, monkeypatch, Ack=True, AckPollSeconds=0.01, AckInFlight=3)
    seen: list[int] = []
    real = s._after_post

    def spy(token: str, delivered: set[str]) -> None:
        seen.append(len(s._flights))
        real(token, delivered)
        assert len(s._flights) <= 2

    monkeypatch.setattr(s, "_after_post", spy)
    batch = events(100)
    assert s.send(batch).delivered == {e.id for e in batch}
    assert max(seen) == 3


def test_a_batch_whose_ack_times_out_is_sent_again_by_the_next_call(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hec.state.ack_after_polls = 10_000
    s = sink(
        hec.url, tmp_path, ACKED, monkeypatch, Ack=True, AckPollSeconds=0.01, AckTimeoutSeconds=0.1
    )
    batch = events(10)
    with pytest.raises(SinkRetryable, match=r"10 events not acknowledged within 0\.1s"):
        s.send(batch)
    assert s.has([e.id for e in batch]) == set()
    hec.state.ack_after_polls = 0
    assert s.flush().delivered == {e.id for e in batch}  # the caller's retry: posted again, acked
    assert s.has([e.id for e in batch]) == {e.id for e in batch}
    assert event_posts(hec) == [200, 200]


# --- point 19: TLS is not transient; timeouts and refused connections are --------------
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An HTTPS server with a self-signed certificate (which no CA bundle trusts)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip("openssl is needed to make a self-signed certificate")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_certificate_failure_is_fatal_everywhere(
    tls_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sink(tls_server, tmp_path, PLAIN, monkeypatch, Ack=True, SearchUrl=tls_server)
    with pytest.raises(SinkFatal, match=r"TLS verification failed") as info:
        s.send(events(3))
    assert str(info.value).endswith("sink stopped, events kept")
    monkeypatch.setenv("SEARCH_TOKEN", "x")
    s.search_token_env = "SEARCH_TOKEN"
    from dicomsync.index_query import IndexQuery

    with pytest.raises(SinkFatal, match=r"TLS verification failed"):
        list(s.query(IndexQuery.parse("Modality=SR")))


def test_tls_handshake_failure_is_fatal(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https:// to a server that speaks plain HTTP: the handshake fails, not transient."""
    s = sink(hec.url.replace("http://", "https://"), tmp_path, PLAIN, monkeypatch)
    with pytest.raises(SinkFatal, match=r"TLS verification failed"):
        s.send(events(3))


def test_timeouts_and_refused_connections_are_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        s = sink(url, tmp_path, PLAIN, monkeypatch, TimeoutSeconds=0.3)
        with pytest.raises(SinkRetryable, match=r"no answer \(timed out\)"):
            s.send(events(3))
    finally:
        silent.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    s = sink(f"http://127.0.0.1:{port}", tmp_path / "r", PLAIN, monkeypatch)
    with pytest.raises(SinkRetryable, match=r"no answer \("):
        s.send(events(3))


# --- point 18: the instance's origin is the envelope's source ---------------------------
def test_source_is_the_instance_origin_unless_configured(
    hec: HecServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = sink(hec.url, tmp_path, PLAIN, monkeypatch)
    s.send(events(2, source="orthanc:1b2c3d4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c"))
    s.send(events(1, prefix="f", source="/data/studies/p1/s1/a.dcm"))
    s.send(events(1, prefix="n"))  # no origin known
    sources = [e["source"] for e in hec.state.events]
    assert sources == [
        "orthanc:1b2c3d4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c",
        "orthanc:1b2c3d4e-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c",
        "/data/studies/p1/s1/a.dcm",
        "dicomsync",
    ]
    fixed = sink(hec.url, tmp_path / "f", PLAIN, monkeypatch, Source="pacs")
    fixed.send(events(1, prefix="x", source="orthanc:abc"))
    assert hec.state.events[-1]["source"] == "pacs"


# --- hostile answers: bounded parsing, one line ----------------------------------------
class _Hostile(http.server.BaseHTTPRequestHandler):
    body = b"[" * 100_000 + b"]" * 100_000

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_deeply_nested_answer_is_one_fatal_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        s = sink(f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path, PLAIN, monkeypatch)
        with pytest.raises(SinkFatal, match=r"unexpected answer \(HTTP 200\)"):
            s.send(events(2))
        assert s.has([e.id for e in events(2)]) == set()
    finally:
        httpd.shutdown()
