"""Issue 9 for the XNAT place: an unreachable XNAT is one line and one wait, no
process-wide side effects, one error rule (http_errors), transient upload errors are
retryable and their retry does not duplicate, and the stand-in's faithfulness fixes."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID
from test_xnat_place import PASSWORD, PROJECT, items, root_place, tls_server, xnat_place

from dicomsync.config import build_place
from dicomsync.errors import ConfigError, NotFound, RemoteRejected, Unreachable
from dicomsync.identity import StudyIdentity
from dicomsync.places.xnat import XnatPreArchive
from dicomsync.queue.base import RetryPolicy
from dicomsync.transfer import send

from conftest import Cli
from dicomdata import build_seed_tree, make_instance
from servers.xnat import XnatServer

__all__ = ["tls_server"]  # the fixture, imported for its use here

TIMEOUT = 1.0  # seconds: the Timeout of the places that talk to the black hole


class BlackHole:
    """A TCP server that accepts connections and never answers (until closed)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._held:
            conn.close()
        self.sock.close()


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    h = BlackHole()
    yield h
    h.close()


@pytest.fixture
def server() -> Iterator[XnatServer]:
    srv = XnatServer(users={"tester": PASSWORD}, projects={PROJECT: None}).start()
    yield srv
    srv.stop()


def six_studies(root: Path) -> None:
    for i in range(6):
        make_instance(
            root / f"patient{i}" / "study1" / "a.dcm",
            patient_id=f"p{i}",
            study_uid=f"1.2.826.0.1.3680043.8.498.600{i}",
        )


def hole_place(hole: BlackHole, tmp_path: Path) -> XnatPreArchive:
    section = {
        "Kind": "xnat_pre_archive",
        "Server": hole.url,
        "Project": PROJECT,
        "User": "tester",
        "Timeout": TIMEOUT,
    }
    place = build_place("xnat", section, tmp_path)
    assert isinstance(place, XnatPreArchive)
    return place


# --- 11: an unreachable XNAT is one line and one wait ---------------------------------------


def test_unreachable_xnat_costs_one_timeout_and_one_login(
    hole: BlackHole, tmp_path: Path, password: str
) -> None:
    """One attempt waits about Timeout (not xnatpy's fixed 12 s for login requests), and
    after prepare() found XNAT unreachable, holds/receive fail at once with the same
    error instead of logging in and waiting again, study by study."""
    expected = f"XNAT {hole.url} is unreachable during login: no answer (timed out)"
    six_studies(tmp_path / "root")
    with root_place(tmp_path / "root") as src, hole_place(hole, tmp_path) as dest:
        pairs = items(src)
        start = time.monotonic()
        with pytest.raises(Unreachable) as info:
            dest.prepare([])
        took = time.monotonic() - start
        assert took < 2 * TIMEOUT + 1.0, took
        assert str(info.value) == expected and info.value.retryable
        start = time.monotonic()
        errors: list[Unreachable] = []
        for source, ref in pairs:
            identity = source.identity(ref)
            with pytest.raises(Unreachable) as again:
                dest.holds(ref.key, identity)
            errors.append(again.value)
            with pytest.raises(Unreachable) as again:
                dest.receive(ref.key, source.instances(ref), identity)
            errors.append(again.value)
        assert time.monotonic() - start < 0.5
        assert hole.accepted == 1  # one login attempt for the whole batch
        assert {(str(e), e.retryable) for e in errors} == {(expected, True)}
        # the next batch tries again (a retry, or the next plugin job)
        with pytest.raises(Unreachable):
            dest.prepare([])
        assert hole.accepted == 2


def test_cli_send_to_unreachable_xnat_is_one_line_one_wait(
    tmp_path: Path, cli: Cli, hole: BlackHole, password: str
) -> None:
    six_studies(tmp_path / "root")
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "root"))
    cli(
        "place",
        "add",
        "xnat_pre_archive",
        "x",
        hole.url,
        PROJECT,
        "tester",
        "--timeout",
        str(TIMEOUT),
    )
    assert json.loads((tmp_path / "dicomsync.json").read_text())["Places"]["x"]["Timeout"] == 1
    start = time.monotonic()
    result = cli("send", "my_studies:*", "x", "--retries", "0", ok=False)
    took = time.monotonic() - start
    assert result.exit_code == 1
    assert took < 3 * TIMEOUT + 2.0, took  # was 7 logins of 12 s each (84 s at Timeout 3)
    assert hole.accepted == 1
    assert result.stderr == (
        f"Error: XNAT {hole.url} is unreachable during login: no answer (timed out)\n"
    )


# --- 11: wording --------------------------------------------------------------------------------


def test_forbidden_listing_and_empty_reasons_read_well(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    with xnat_place(server, tmp_path) as place:
        assert isinstance(place, XnatPreArchive)
        place.prepare([])  # logged in, the project is there
        server.store.projects[PROJECT] = {"someone else"}
        with pytest.raises(Exception) as info:
            place.prepare([])
    assert str(info.value) == (
        f"XNAT {server.url} listing: not authorised (403: User tester does not have access "
        f"to project {PROJECT}); check the credentials"
    )
    assert not info.value.retryable  # type: ignore[attr-defined]
    # a status without a body gives no empty reason "(404: )"
    error = place._status_error(404, "", "download")
    assert isinstance(error, NotFound)
    assert str(error) == f"XNAT {server.url} download: not found (404)"
    page = "<html><body><h3></h3><p>Not Found</p></body></html>"
    assert str(place._status_error(404, page, "download")).endswith("not found (404)")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -1, "5", True])
def test_timeout_must_be_a_finite_positive_number(tmp_path: Path, value: object) -> None:
    section = {"Kind": "xnat_pre_archive", "Server": "https://x.org", "Project": "P", "User": "u"}
    with pytest.raises(ConfigError, match="Timeout must be a positive number of seconds"):
        build_place("x", {**section, "Timeout": value}, tmp_path)


# --- 16: no process-wide side effects --------------------------------------------------------


class GuardedEnviron(MutableMapping[str, str]):
    """os.environ that records every change instead of refusing reads."""

    def __init__(self, real: MutableMapping[str, str]) -> None:
        self.real = real
        self.changes: list[str] = []

    def __getitem__(self, key: str) -> str:
        return self.real[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.changes.append(f"set {key}")
        self.real[key] = value

    def __delitem__(self, key: str) -> None:
        self.changes.append(f"del {key}")
        del self.real[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.real)

    def __len__(self) -> int:
        return len(self.real)

    def copy(self) -> dict[str, str]:
        return dict(self.real)


def test_ca_bundle_login_changes_nothing_process_wide(
    tls_server: XnatServer, tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA bundle is the place's session's only: os.environ, warning filters and the
    default verification of other requests sessions stay as they were."""
    import requests

    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    guard = GuardedEnviron(os.environ)
    monkeypatch.setattr(os, "environ", guard)
    filters = list(warnings.filters)
    seen: list[Any] = []

    def other_client() -> None:  # a concurrent HTTPS client, as the HEC sink is
        try:
            requests.get(tls_server.url + "/", timeout=5)
        except requests.exceptions.SSLError as exc:
            seen.append(exc)

    build_seed_tree(tmp_path / "root")
    with (
        root_place(tmp_path / "root") as src,
        xnat_place(tls_server, tmp_path, CaBundle=str(tmp_path / "cert.pem")) as dest,
    ):
        worker = threading.Thread(target=other_client)
        worker.start()
        assert send(items(src)[:1], dest).sent == 1
        worker.join()
        other_client()
    assert guard.changes == []
    assert warnings.filters == filters
    # other sessions never verify against the place's CA: both attempts failed TLS
    assert len(seen) == 2


# --- 19: a certificate failure is not transient ----------------------------------------------


def test_tls_failure_is_not_retried(tls_server: XnatServer, tmp_path: Path, password: str) -> None:
    sleeps: list[float] = []
    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(tls_server, tmp_path) as dest:
        with pytest.raises(Unreachable) as info:
            send(items(src), dest, retry=RetryPolicy(0.01, 0.02, 5), sleep=sleeps.append)
    assert not info.value.retryable
    assert "TLS verification failed" in str(info.value)
    assert sleeps == []
    logins = [p for m, p in tls_server.requests if p.startswith("/data/services/auth")]
    assert logins == []  # the handshake failed before any request


# --- 13: transient upload errors are retryable; their retry does not duplicate -----------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 503}, "server busy or failing (503: "),
        ({"status": 503, "after_storing": True}, "server busy or failing (503: "),
        ({"reset": True}, "no answer ("),
        ({"reset": True, "after_storing": True}, "no answer ("),
    ],
)
def test_transient_upload_error_is_retryable_and_the_retry_merges(
    server: XnatServer, tmp_path: Path, password: str, fault: dict[str, Any], reason: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        source, ref = items(src)[2]  # patient1/study3, 7 instances
        identity = source.identity(ref)
        dest.prepare([(ref.key, identity)])
        server.fail_imports(1, **fault)
        with pytest.raises(Unreachable) as info:
            dest.receive(ref.key, source.instances(ref), identity)
        assert info.value.retryable
        assert str(info.value).startswith(f"XNAT {server.url}")
        assert reason in str(info.value)
        receipt = dest.receive(ref.key, source.instances(ref), identity)
        assert receipt.written == len(layout[ref.key])
    (session,) = server.sessions(PROJECT)
    assert session.file_count() == len(layout[ref.key])


def test_cli_retry_policy_retries_a_503_upload_without_duplicates(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    build_seed_tree(tmp_path / "root")
    server.fail_imports(2, status=503, after_storing=True)
    sleeps: list[float] = []
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src), dest, retry=RetryPolicy(0.01, 0.02, 3), sleep=sleeps.append)
    assert [o.status for o in summary.outcomes] == ["sent"] * 4
    assert len(sleeps) == 2
    assert sorted((s.subject, s.name) for s in server.sessions(PROJECT)) == [
        ("patient1", "study1"),
        ("patient1", "study2"),
        ("patient1", "study3"),
        ("patient2", "study1"),
    ]


# --- 20: an experiment listing without the UID column ----------------------------------------


def test_listing_without_uid_column_warns_once_and_matches_by_label(
    server: XnatServer, tmp_path: Path, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        assert send(items(src)[:1], dest).sent == 1
    server.archive(PROJECT, label="study1")
    server.omit_uid_column()
    caplog.set_level(logging.WARNING, logger="dicomsync.places.xnat")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src)[:1], dest)
        assert [o.status for o in summary.outcomes] == ["duplicate"]
        dest.prepare([])  # a second listing in the same place: no second warning
    warned = [r.getMessage() for r in caplog.records if "UID column" in r.getMessage()]
    assert warned == [
        f"XNAT {server.url}: the experiment listing of project '{PROJECT}' has no UID column; "
        "archived sessions are matched by subject and session label instead of "
        "StudyInstanceUID"
    ]
    assert len(server.imports) == 1


def test_untagged_session_of_another_key_is_not_present(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    server.omit_uid_column()
    ds = make_instance(None, patient_id="p", study_uid="1.2.826.0.1.3680043.8.498.700")
    with xnat_place(server, tmp_path) as place:
        place.prepare([])
        ident = StudyIdentity("1.2.826.0.1.3680043.8.498.700", frozenset({ds.SOPInstanceUID}))
        assert place.holds("other/key", ident) == frozenset()


# --- 20: the stand-in is faithful: what XNAT refuses, and what it stores ---------------------


def test_rejected_member_message_is_xnats(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    ds = pydicom.dcmread(layout["patient1/study1"][0])
    del ds.SOPInstanceUID  # the folder place falls back to the file meta's UID
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.701")
    ds.save_as(tmp_path / "root" / "patient1" / "study1" / "zz.dcm")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        (outcome, *_) = send(items(src)[:1], dest).outcomes
    assert outcome.status == "failed" and not outcome.retryable
    assert outcome.error == (
        f"XNAT {server.url} upload: rejected (400: object 000004_zz.dcm contains no "
        "SOP Instance UID)"
    )
    assert server.sessions(PROJECT) == []  # the partial session was removed
    with xnat_place(server, tmp_path) as dest, pytest.raises(RemoteRejected):
        dest.receive("a/b", [], StudyIdentity("1.2", frozenset()))


def test_logout_from_a_hanging_server_waits_like_a_login(
    server: XnatServer, tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() logs out with the login requests' limit, not an upload's Timeout."""
    import dicomsync.places.xnat.connection as xnat_module

    from servers import xnat as standin

    monkeypatch.setattr(xnat_module, "PILOT_TIMEOUT", 0.5)
    place = xnat_place(server, tmp_path, Timeout=5)
    place.prepare([])
    hang = threading.Event()

    def hanging_delete(self: Any) -> None:
        hang.wait(6)

    monkeypatch.setattr(standin._Handler, "do_DELETE", hanging_delete)
    start = time.monotonic()
    place.close()
    took = time.monotonic() - start
    hang.set()
    assert took < 2.5, took


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "(502)"),
        ("   \n", "(502)"),
        ("<html><body><h3></h3><p>Bad Gateway</p></body></html>", "(502)"),
        (
            "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
            "<p>The proxy server received an invalid response</p></body></html>",
            "(502: Bad Gateway)",
        ),
        (
            "<html><head><title>Error 502</title></head><body>nothing</body></html>",
            "(502: Error 502)",
        ),
        ("plain\ntext  answer", "(502: plain text answer)"),
    ],
)
def test_error_pages_give_one_short_reason(tmp_path: Path, body: str, reason: str) -> None:
    place = build_place(
        "x",
        {"Kind": "xnat_pre_archive", "Server": "https://x.org", "Project": "P", "User": "u"},
        tmp_path,
    )
    assert isinstance(place, XnatPreArchive)
    error = place._status_error(502, body, "listing")
    assert isinstance(error, Unreachable) and error.retryable
    assert str(error) == f"XNAT https://x.org listing: server busy or failing {reason}"


def test_cli_send_retries_a_dropped_upload_and_sends_each_study_once(
    tmp_path: Path, cli: Cli, server: XnatServer, password: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    cli("init")
    config = json.loads((tmp_path / "dicomsync.json").read_text())
    config["Retry"] = {"BaseDelay": 0.01, "MaxDelay": 0.02, "MaxAttempts": 3}
    (tmp_path / "dicomsync.json").write_text(json.dumps(config))
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "root"))
    cli("place", "add", "xnat_pre_archive", "x", server.url, PROJECT, "tester")
    server.fail_imports(1, reset=True, after_storing=True)  # stored, but the answer is lost
    server.fail_imports(1, status=503)
    result = cli("send", "my_studies:*", "x")
    assert "4 sent, 0 duplicate, 0 failed" in result.stdout
    assert [i.status for i in server.imports] == [-1, 503, 200, 200, 200, 200]
    sessions = {(s.subject, s.name): s.file_count() for s in server.sessions(PROJECT)}
    assert sessions == {tuple(k.split("/")): len(v) for k, v in layout.items()}


@pytest.mark.parametrize(
    ("page", "kind", "message"),
    [
        (
            '<html><form name="form1" method="post" action="/xnat/login"></form></html>',
            "AuthenticationFailed",
            "{url} refused the login of user 'tester' (check the password in XNAT_PASS)",
        ),
        (
            "<html>Your password has expired. Please try again</html>",
            "AuthenticationFailed",
            "{url}: the password of user 'tester' has expired; renew it in XNAT",
        ),
        (
            "<html>Welcome to nginx!</html>",
            "RemoteRejected",
            "{url} login: /data/auth did not confirm the login; is Server the address of an XNAT?",
        ),
    ],
)
def test_login_check_reads_what_xnatpy_reads(
    server: XnatServer,
    tmp_path: Path,
    password: str,
    monkeypatch: pytest.MonkeyPatch,
    page: str,
    kind: str,
    message: str,
) -> None:
    from servers import xnat as standin

    route = standin._Handler._route

    def answer(self: Any, method: str, path: str, *args: Any) -> None:
        if path == "/data/auth":
            self._send(200, page, standin.HTML)
            return
        route(self, method, path, *args)

    monkeypatch.setattr(standin._Handler, "_route", answer)
    with xnat_place(server, tmp_path) as place, pytest.raises(Exception) as info:
        place.prepare([])
    assert type(info.value).__name__ == kind
    assert str(info.value) == "XNAT " + message.format(url=server.url)
    assert not info.value.retryable  # type: ignore[attr-defined]


def test_full_disk_for_temporary_zips_is_a_retryable_storage_error(
    server: XnatServer, tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import zipfile

    import xnat.session

    from dicomsync.errors import StorageError

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        source, ref = items(src)[0]
        identity = source.identity(ref)
        assert send(items(src)[:1], dest).sent == 1
        with monkeypatch.context() as m:
            m.setattr(zipfile.ZipFile, "writestr", full)
            with pytest.raises(StorageError) as info:
                dest.receive(ref.key, source.instances(ref), identity)
        assert info.value.retryable
        assert str(info.value).endswith(".zip: No space left on device")
        (xref,) = [r for r in dest.studies() if r.key == ref.key]
        monkeypatch.setattr(xnat.session.BaseXNATSession, "download_stream", full)
        with pytest.raises(StorageError) as info:
            dest.identity(xref)
        assert info.value.retryable
        assert str(info.value) == (
            "cannot write a temporary file (download): No space left on device"
        )
