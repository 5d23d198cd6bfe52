"""The Orthanc client and place under hostile or failing servers: one rule for HTTP errors
(a TLS/certificate failure is final, timeouts and 5xx are not), answers parsed without
recursion, ``Delivered`` counting what a failed upload still stored, and bounded caches."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomsync.errors import AuthenticationFailed, NotFound, RemoteRejected, Unreachable
from dicomsync.identity import StudyIdentity
from dicomsync.orthanc_client import HttpTransport, OrthancClient, Transport
from dicomsync.places import orthanc as orthanc_place
from dicomsync.places.base import Instance, StudyRef
from dicomsync.places.orthanc import OrthancPlace


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers from ``server.answers``: path -> (status, body); stores are counted."""

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        srv: Any = self.server
        if self.command == "POST" and self.path == "/instances":
            with srv.lock:
                srv.posts += 1
                n = srv.posts
            status, body = (503, b"{}") if n in srv.fail_posts else (200, b'{"Status": "Success"}')
        else:
            status, body = srv.answers.get(self.path, (404, b'{"Message": "Unknown resource"}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.posts = 0
        self.fail_posts: set[int] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"


def serve(srv: Server) -> Iterator[Server]:
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def plain() -> Iterator[Server]:
    yield from serve(Server())


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls(cert: tuple[Path, Path]) -> Iterator[Server]:
    srv = Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.answers["/system"] = (200, b'{"Version": "1.12"}')
    yield from serve(srv)


# --- one rule for HTTP errors ---------------------------------------------------------------


def test_a_certificate_failure_is_final_not_retried(
    tls: Server, cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    client = OrthancClient(HttpTransport(tls.url, timeout=5))
    with pytest.raises(Unreachable) as info:
        client.system()
    assert info.value.retryable is False
    assert "TLS verification failed" in str(info.value)
    # the right CA bundle: it works
    assert OrthancClient(HttpTransport(tls.url, verify=str(cert[0]), timeout=5)).system()


def test_transient_failures_are_retryable(plain: Server) -> None:
    client = OrthancClient(HttpTransport(plain.url, timeout=5))
    for status in (500, 502, 503, 408, 429):
        plain.answers["/system"] = (status, b'{"Details": "busy"}')
        with pytest.raises(Unreachable) as info:
            client.system()
        assert info.value.retryable, status
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unreachable) as info:
        OrthancClient(HttpTransport(f"http://127.0.0.1:{port}", timeout=2)).system()
    assert info.value.retryable and "cannot reach Orthanc" in str(info.value)


def test_final_statuses(plain: Server) -> None:
    client = OrthancClient(HttpTransport(plain.url, timeout=5))
    for status, error in ((400, RemoteRejected), (401, AuthenticationFailed), (404, NotFound)):
        plain.answers["/system"] = (status, b'{"Message": "no"}')
        with pytest.raises(error) as info:
            client.system()
        assert not info.value.retryable, status


# --- answers parsed without recursion -------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 503])
def test_a_deeply_nested_answer_is_refused_without_recursion(plain: Server, status: int) -> None:
    """A remote Orthanc (or anything at its URL) answering 100,000 nested arrays: one
    error, never a RecursionError (inside Orthanc that is a segfault on a small stack)."""
    plain.answers["/system"] = (status, b"[" * 100_000 + b"]" * 100_000)
    client = OrthancClient(HttpTransport(plain.url, timeout=10))
    with pytest.raises((RemoteRejected, Unreachable)) as info:
        client.system()
    assert len(str(info.value)) < 500


def test_a_deep_answer_in_process_is_refused() -> None:
    """The same for the in-process transport's answers, on a thread with a small C stack."""

    class Deep(Transport):
        def get(self, path: str) -> bytes:
            return b"[" * 50_000 + b"]" * 50_000

        def post(self, path: str, body: bytes, content_type: str = "") -> bytes:
            return self.get(path)

        def delete(self, path: str) -> None:
            pass

    errors: list[BaseException] = []

    def run() -> None:
        try:
            OrthancClient(Deep()).get_json("/studies")
        except BaseException as exc:
            errors.append(exc)

    threading.stack_size(256 * 1024)  # like a web-server thread of Orthanc
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        threading.stack_size(0)
    assert len(errors) == 1 and isinstance(errors[0], RemoteRejected), errors


# --- Delivered counts what a failed upload stored -------------------------------------------


def instances(n: int) -> list[Instance]:
    return [Instance(f"1.2.{i}", f"{i}.dcm", lambda: b"DICM") for i in range(n)]


def test_a_failed_upload_says_how_many_it_stored(plain: Server) -> None:
    plain.fail_posts = {31}  # the 31st store answers 503
    place = OrthancPlace("b", OrthancClient(HttpTransport(plain.url, timeout=5)), upload_threads=1)
    try:
        with pytest.raises(Unreachable) as info:
            place.receive("p/s", instances(50), StudyIdentity("1.2", frozenset()))
        # 30 before the failure, and the one already in flight beside it: what B stored
        assert getattr(info.value, "delivered", None) == plain.posts - 1 >= 30
    finally:
        place.close()


def test_a_failed_parallel_upload_counts_every_store_that_succeeded(plain: Server) -> None:
    plain.fail_posts = {20}
    place = OrthancPlace("b", OrthancClient(HttpTransport(plain.url, timeout=5)), upload_threads=4)
    try:
        with pytest.raises(Unreachable) as info:
            place.receive("p/s", instances(50), StudyIdentity("1.2", frozenset()))
        # every POST but the failed one succeeded; the ones not yet started were cancelled
        assert getattr(info.value, "delivered", None) == plain.posts - 1
    finally:
        place.close()


# --- bounded caches -------------------------------------------------------------------------


def study(i: int) -> dict[str, Any]:
    return {
        "ID": f"study-{i}",
        "PatientMainDicomTags": {"PatientID": f"P{i}"},
        "MainDicomTags": {"StudyInstanceUID": f"1.2.{i}"},
    }


def test_the_study_cache_of_an_orthanc_place_stays_bounded(plain: Server) -> None:
    place = OrthancPlace("a", OrthancClient(HttpTransport(plain.url, timeout=5)))
    try:
        for i in range(orthanc_place.META_CACHE * 3):
            place.ref_for(study(i))
        assert len(place._meta) == orthanc_place.META_CACHE
        # a study the cache forgot is read again: identity stays right
        plain.answers["/studies/study-0"] = (200, json.dumps(study(0)).encode())
        plain.answers["/studies/study-0/instances"] = (
            200,
            b'[{"ID": "i0", "MainDicomTags": {"SOPInstanceUID": "1.2.0.1"}}]',
        )
        ident = place.identity(StudyRef("a", "P0", "1.2.0", handle="study-0"))
        assert ident.patient_id == "P0" and ident.study_uid == "1.2.0"
        assert ident.sop_uids == {"1.2.0.1"}
        assert len(place._meta) == orthanc_place.META_CACHE
    finally:
        place.close()


def test_delivered_adds_up_every_attempt(tmp_path: Path) -> None:
    """Attempt 1 stores 30 of 50 and fails (retryable), attempt 2 stores the 20 left: the
    destination's Delivered is 50, not 20. A final failure that stored some counts too."""
    from dicomsync.errors import TransferError
    from dicomsync.queue import Job, NewJob, RetryPolicy
    from dicomsync.queue.sqlite import SQLiteQueue
    from dicomsync.worker import Delivered, Lane, WorkerPool

    from plugin_helpers import wait_for

    q = SQLiteQueue(tmp_path / "queue.sqlite", RetryPolicy(0.05, 0.1, 5))
    calls: dict[str, int] = {}

    def handler(job: Job) -> Delivered:
        calls[job.resource] = calls.get(job.resource, 0) + 1
        if job.resource == "final":
            error = TransferError("refused after 7", retryable=False)
            error.delivered = 7  # type: ignore[attr-defined]
            raise error
        if calls[job.resource] == 1:
            error = TransferError("503 after 30", retryable=True)
            error.delivered = 30  # type: ignore[attr-defined]
            raise error
        return Delivered("fp", sent=20)

    q.enqueue(NewJob("study", "s1", "b"))
    q.enqueue(NewJob("study", "final", "b"))
    pool = WorkerPool(q, [Lane("b", 1)], {"study": handler}, poll_interval=0.1)
    pool.start()
    try:
        wait_for(lambda: q.stats()["b"].done == 1 and q.stats()["b"].failed == 1, timeout=20)
    finally:
        pool.stop()
    assert q.stats()["b"].delivered == 30 + 20 + 7
    q.close()


def test_route_handler_holds_places_of_live_threads_only() -> None:
    """Jobs handled on 200 short-lived threads: the places of ended threads are closed."""
    from dicomsync.routing import RouteHandler

    closed: list[object] = []

    class FakePlace:
        def close(self) -> None:
            closed.append(self)

    handler = RouteHandler(FakePlace, lambda key: FakePlace())  # type: ignore[arg-type,return-value]

    def job() -> None:
        handler._place("b", FakePlace)  # type: ignore[arg-type]
        handler.source()

    for _ in range(200):
        t = threading.Thread(target=job)
        t.start()
        t.join()
    assert handler.held() <= 4  # the last thread's two, at most one more ended thread's
    assert len(closed) >= 2 * 199 - 2
    handler.close()
    assert handler.held() == 0 and len(closed) == 400


def test_the_glue_passes_the_header_cache_and_leaves_the_environment_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folder places of the plugin cache headers under StateDirectory/cache (or an explicit
    $DICOMSYNC_CACHE_DIR); the process environment, which other plugins share, is unchanged."""
    import os

    from dicomsync import routing
    from dicomsync.service.app import Service

    (tmp_path / "zips").mkdir()
    config = {
        "StorageDirectory": str(tmp_path / "db"),
        routing.SECTION: {
            "Places": {"zips": {"Kind": "zipped_root", "Path": str(tmp_path / "zips")}},
            "Routes": [{"Destination": "zips"}],
            "StateDirectory": str(tmp_path / "state"),
        },
    }
    monkeypatch.delenv("DICOMSYNC_CACHE_DIR")
    before = dict(os.environ)
    app = Service(config, str(tmp_path / "orthanc.json"), Unused())
    try:
        assert dict(os.environ) == before
        assert app.config is not None
        place = app.config.build_place("zips")
        assert place.cache.path == tmp_path / "state" / "cache" / "headers.sqlite"  # type: ignore[attr-defined]
        assert app.config.build_place("zips").cache is place.cache  # type: ignore[attr-defined]
    finally:
        if app.queue is not None:
            app.queue.close()
    explicit = tmp_path / "explicit"
    monkeypatch.setenv("DICOMSYNC_CACHE_DIR", str(explicit))
    cfg = routing.load(config, str(tmp_path / "orthanc.json"))
    assert cfg is not None
    assert cfg.build_place("zips").cache.path == explicit / "headers.sqlite"  # type: ignore[attr-defined]


class Unused(Transport):
    """A transport that is never called."""

    def get(self, path: str) -> bytes:
        raise AssertionError(path)

    def post(self, path: str, body: bytes, content_type: str = "") -> bytes:
        raise AssertionError(path)

    def delete(self, path: str) -> None:
        raise AssertionError(path)


def test_a_route_job_that_fails_mid_upload_reports_what_it_stored(
    plain: Server, tmp_path: Path
) -> None:
    """Route handler, send_study and the Orthanc place together: the error the job ends
    with carries the number of instances B stored before the 503 (the queue adds it)."""
    from dicomsync.errors import TransferError
    from dicomsync.places.dicom_root import DicomRoot
    from dicomsync.queue import Job
    from dicomsync.routing import RouteHandler

    from dicomdata import generate_root

    generate_root(tmp_path / "src", 1, instances=50)

    class Source(DicomRoot):
        def ref_by_id(self, study_id: str) -> StudyRef:
            return next(iter(self.studies()))

    plain.answers["/tools/lookup"] = (200, b"[]")  # B holds nothing of the study yet
    plain.fail_posts = {31}
    handler = RouteHandler(
        lambda: Source("src", tmp_path / "src"),
        lambda key: OrthancPlace(
            key, OrthancClient(HttpTransport(plain.url, timeout=5)), upload_threads=1
        ),
    )
    try:
        with pytest.raises(TransferError) as info:
            handler(Job(1, "study", "any", "b"))
        assert info.value.retryable
        assert getattr(info.value, "delivered", None) == plain.posts - 1 >= 30
    finally:
        handler.close()
