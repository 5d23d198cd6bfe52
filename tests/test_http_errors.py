"""One error mapping: every HTTP client of ours gives the same error for the same failure.

The Orthanc client (``HttpTransport``), the XNAT place and the Splunk HEC sink talk to
real local servers here: a server that answers every request with one status, the same
server over https with a self-signed certificate (TLS failure), a server that accepts and
never answers (timeout), and a port nobody listens on (refused). Places and sinks differ
only in the names of the types (``dicomsync.http_errors``'s table): a place raises
``Unreachable``/``AuthenticationFailed``/``NotFound``/``RemoteRejected``, a sink
``SinkRetryable``/``SinkFatal``; retryability is the same for both.

The plugin's in-process transport reads Orthanc's error codes: it gives the error of the
HTTP status Orthanc itself answers for that code; over HTTP, a real Orthanc's error
answers give the same errors as in-process (a 500 for an unknown tag in a query is final
both ways).
"""

from __future__ import annotations

import ast
import socket
import ssl
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicomsync.config import build_place
from dicomsync.errors import (
    AuthenticationFailed,
    DicomSyncError,
    NotFound,
    RemoteRejected,
    SinkFatal,
    SinkRetryable,
    Unreachable,
)
from dicomsync.http_errors import (
    ORTHANC_FINAL,
    ORTHANC_STATUSES,
    is_tls_failure,
    orthanc_error,
    orthanc_status,
    status_error,
    tls_error_in,
    transport_error,
)
from dicomsync.orthanc_client import HttpTransport
from dicomsync.sinks.base import build_sink
from dicomsync.tags import Event

from orthanc_server import REPO_ROOT, OrthancProcess, free_port

TIMEOUT = 1.0

# (what happened, place error type, sink error type, retryable)
ROWS: list[tuple[str, type[DicomSyncError], type[DicomSyncError], bool]] = [
    ("400", RemoteRejected, SinkFatal, False),
    ("401", AuthenticationFailed, SinkFatal, False),
    ("403", AuthenticationFailed, SinkFatal, False),
    ("404", NotFound, SinkFatal, False),
    ("408", Unreachable, SinkRetryable, True),
    ("409", RemoteRejected, SinkFatal, False),
    ("413", RemoteRejected, SinkFatal, False),
    ("429", Unreachable, SinkRetryable, True),
    ("500", Unreachable, SinkRetryable, True),
    ("502", Unreachable, SinkRetryable, True),
    ("503", Unreachable, SinkRetryable, True),
    ("tls", Unreachable, SinkFatal, False),
    ("timeout", Unreachable, SinkRetryable, True),
    ("refused", Unreachable, SinkRetryable, True),
]


class _StatusHandler(BaseHTTPRequestHandler):
    status = 200

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<html><body><h1>simulated</h1></body></html>"
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class StatusServer:
    """Answers every request with ``status``; over https when ``tls`` (cert, key) is given."""

    def __init__(self, status: int = 200, tls: tuple[Path, Path] | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
        self.httpd.status = status  # type: ignore[attr-defined]
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class Silent:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
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


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def failing(request: pytest.FixtureRequest, cert: tuple[Path, Path]) -> Iterator[str]:
    """The URL of a server that fails in the row's way."""
    case: str = request.param
    if case == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    server: StatusServer | Silent
    if case == "timeout":
        server = Silent()
    elif case == "tls":
        server = StatusServer(200, tls=cert)
    else:
        server = StatusServer(int(case))
    try:
        yield server.url
    finally:
        server.close()


def _orthanc(url: str, tmp_path: Path) -> None:
    HttpTransport(url, timeout=TIMEOUT).get("/system")


def _xnat(url: str, tmp_path: Path) -> None:
    section = {
        "Kind": "xnat_pre_archive",
        "Server": url,
        "Project": "P",
        "User": "tester",
        "Timeout": TIMEOUT,
    }
    place = build_place("xnat", section, tmp_path)
    try:
        list(place.studies())
    finally:
        place.close()


def _hec(url: str, tmp_path: Path) -> None:
    section = {"Kind": "splunk_hec", "Url": url, "TokenEnv": "TEST_HEC_TOKEN", "Timeout": TIMEOUT}
    sink = build_sink("splunk", section, tmp_path)
    event = Event("1.2.3:instance", "dicom:instance", 0.0, "test", {"StudyInstanceUID": "1.2"})
    try:
        sink.send([event])
    finally:
        sink.close()


CLIENTS: dict[str, tuple[Callable[[str, Path], None], bool]] = {
    "orthanc": (_orthanc, False),
    "xnat": (_xnat, False),
    "hec": (_hec, True),
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize(
    ("failing", "place_error", "sink_error", "retryable"),
    ROWS,
    indirect=["failing"],
    ids=[r[0] for r in ROWS],
)
def test_every_client_maps_a_failure_the_same_way(
    client: str,
    failing: str,
    place_error: type[DicomSyncError],
    sink_error: type[DicomSyncError],
    retryable: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    password: str,
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", "11111111-2222-3333-4444-555555555555")
    call, is_sink = CLIENTS[client]
    with pytest.raises(DicomSyncError) as info:
        call(failing, tmp_path)
    expected = sink_error if is_sink else place_error
    assert type(info.value) is expected, str(info.value)
    assert info.value.retryable is retryable, str(info.value)
    assert "\n" not in str(info.value)
    assert password not in str(info.value)


# --- the in-process transport: Orthanc's error codes -----------------------------------------


@pytest.fixture
def inprocess(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """``dicomsync.plugin.inprocess`` over a minimal ``orthanc`` module whose calls fail."""

    class OrthancException(Exception):
        pass

    fake = types.ModuleType("orthanc")
    fake.OrthancException = OrthancException  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orthanc", fake)
    monkeypatch.delitem(sys.modules, "dicomsync.plugin.inprocess", raising=False)
    import dicomsync.plugin.inprocess as module

    yield module
    sys.modules.pop("dicomsync.plugin.inprocess", None)


# Every code of Orthanc's ErrorCodes.json below 50, and a few SQLite/plugin ones.
ORTHANC_CODES = [*range(-1, 48), 1000, 1004, 2000, 9999]


@pytest.mark.parametrize("code", ORTHANC_CODES)
def test_an_orthanc_error_code_gives_the_error_of_its_http_status(
    code: int, inprocess: types.ModuleType
) -> None:
    """In-process, a code raises what the HTTP status Orthanc answers for it raises over
    HTTP (status_error); the four final codes Orthanc answers 500 for are 400s."""
    fake = sys.modules["orthanc"]

    def fail(path: str) -> bytes:
        raise fake.OrthancException(code, "simulated")

    fake.RestApiGet = fail  # type: ignore[attr-defined]
    if code == 0:
        return  # Success is never raised
    status = ORTHANC_FINAL.get(code) or ORTHANC_STATUSES.get(code, 500)
    expected = status_error(status, "GET /x")
    assert expected is not None
    with pytest.raises(DicomSyncError) as info:
        inprocess.InProcessTransport().get("/x")
    assert type(info.value) is type(expected), (code, str(info.value))
    assert info.value.retryable is expected.retryable, code
    assert f"Orthanc error {code}" in str(info.value)
    assert orthanc_status(code) == status


def test_orthanc_codes_follow_orthancs_own_statuses(inprocess: types.ModuleType) -> None:
    """The codes whose meaning the old private table got wrong: a missing tag is 404,
    forbidden access 403, a revision conflict or duplicate 409, a bad range 416."""

    def err(code: int) -> DicomSyncError:
        error: DicomSyncError = inprocess.translate(Exception(code, "x"), "GET /x")
        return error

    assert isinstance(err(21), NotFound)  # INEXISTENT_TAG
    assert isinstance(err(45), AuthenticationFailed)  # FORBIDDEN_ACCESS
    for code in (34, 41, 43, 46):  # NOT_ACCEPTABLE, BAD_RANGE, REVISION, DUPLICATE_RESOURCE
        assert isinstance(err(code), RemoteRejected) and not err(code).retryable, code
    for code in (36, 42):  # DATABASE_UNAVAILABLE, DATABASE_CANNOT_SERIALIZE: 503
        assert isinstance(err(code), Unreachable) and err(code).retryable, code


# --- Orthanc over HTTP and in-process: the same error for the same failure -------------------

REAL_FAILURES = [
    ("POST", "/tools/find", b'{"Level": "Study", "Query": {"NoSuchTag": "x"}}'),  # 27, a 500
    ("POST", "/tools/find", b""),  # 8
    ("POST", "/tools/find", b'{"Level": "Bogus", "Query": {}}'),  # 3
    ("GET", "/instances/nope/file", None),  # 17
    ("POST", "/instances", b"not dicom at all"),  # 15
    ("GET", "/studies/nope/archive", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REAL_FAILURES)
def test_orthanc_over_http_fails_as_the_inprocess_transport_does(
    orthanc: OrthancProcess, method: str, path: str, body: bytes | None
) -> None:
    """A real Orthanc's error answer carries its ``OrthancStatus``; the HTTP transport
    raises what the in-process transport raises for that code (orthanc_error)."""
    import requests

    raw = requests.request(method, orthanc.url + path, data=body, timeout=30)
    assert raw.status_code >= 400
    code = raw.json()["OrthancStatus"]
    if code not in ORTHANC_FINAL:  # the table is Orthanc's own answer for that code
        assert ORTHANC_STATUSES.get(code, 500) == raw.status_code, code
    expected = orthanc_error(code, "x")
    transport = HttpTransport(orthanc.url, timeout=30)
    with pytest.raises(DicomSyncError) as info:
        if method == "GET":
            transport.get(path)
        else:
            transport.post(path, body or b"")
    assert type(info.value) is type(expected), (code, str(info.value))
    assert info.value.retryable is expected.retryable, (code, str(info.value))


def test_the_tls_error_is_found_inside_requests_and_urllib3_wrappers() -> None:
    """requests wraps urllib3's MaxRetryError, whose ``reason`` wraps the ssl error: the
    mapping finds it by structure (its text names the failure), not by parsing text."""
    import requests
    import urllib3

    inner = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    reason = urllib3.exceptions.SSLError(inner)
    pool_error = urllib3.exceptions.MaxRetryError(None, "/x", reason=reason)  # type: ignore[arg-type]
    wrapped = requests.exceptions.SSLError(pool_error)
    assert tls_error_in(wrapped) is inner
    assert is_tls_failure(wrapped)
    error = transport_error(wrapped, "GET x")
    assert isinstance(error, Unreachable) and not error.retryable
    assert isinstance(transport_error(wrapped, "POST y", sink=True), SinkFatal)
    assert tls_error_in(requests.exceptions.ConnectionError("refused")) is None
    assert transport_error(requests.exceptions.ConnectionError("refused"), "GET x").retryable


# --- one backoff formula, one retry loop ------------------------------------------------------


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for folder in ("shared", "cli", "plugin"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            yield str(path.relative_to(REPO_ROOT)), ast.parse(path.read_text(encoding="utf-8"))


def test_one_backoff_formula_and_one_retry_loop() -> None:
    """Only ``RetryPolicy.delay`` (shared/queue/retry.py) computes a growing or jittered
    delay (a power with a variable exponent, ``random``), and only dicomsync.transfer
    waits between attempts (``wait_to_retry``, which asks ``RetryPolicy.delay``)."""
    powers, randoms, waits = set(), set(), set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Pow)
                and not isinstance(node.right, ast.Constant)
            ):
                powers.add(name)
            if isinstance(node, ast.Import) and any(a.name == "random" for a in node.names):
                randoms.add(name)
            if isinstance(node, ast.ImportFrom) and node.module == "random":
                randoms.add(name)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name | ast.Attribute)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "wait_to_retry"
            ):
                waits.add(name)
    assert powers == {"shared/queue/retry.py"}
    assert randoms == {"shared/queue/retry.py"}
    assert waits == {"shared/transfer.py"}
