"""The xnat_pre_archive place against the XNAT stand-in, through the real ``xnat`` client."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from dicomsync.config import build_place
from dicomsync.errors import (
    AuthenticationFailed,
    ConfigError,
    NotFound,
    RemoteRejected,
    Unreachable,
)
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Place, StudyRef
from dicomsync.places.xnat import XnatPreArchive, xnat_label
from dicomsync.query import StudyQuery
from dicomsync.transfer import send, send_study

from conftest import XNAT_PASSWORD
from dicomdata import build_seed_tree, data, make_instance
from servers.xnat import XnatServer

PASSWORD = XNAT_PASSWORD  # the `password` fixture (conftest) puts it in $XNAT_PASS
PROJECT = "TESTPROJ"


@pytest.fixture
def server() -> Iterator[XnatServer]:
    srv = XnatServer(users={"tester": PASSWORD}, projects={PROJECT: None, "LOCKED": set()})
    srv.start()
    yield srv
    srv.stop()


def xnat_place(server: XnatServer, tmp_path: Path, **extra: object) -> XnatPreArchive:
    section = {
        "Kind": "xnat_pre_archive",
        "Server": server.url,
        "Project": PROJECT,
        "User": "tester",
        **extra,
    }
    place = build_place("xnat", section, tmp_path)
    assert isinstance(place, XnatPreArchive)
    return place


def root_place(path: Path, key: str = "src") -> Place:
    return build_place(key, {"Kind": "dicom_root", "Path": str(path)}, path.parent)


def items(place: Place) -> list[tuple[Place, StudyRef]]:
    return [(place, ref) for ref in place.studies(StudyQuery(place.key))]


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def listings(server: XnatServer) -> tuple[int, int]:
    """How many prearchive and experiment listings of PROJECT the server answered."""
    paths = [p.split("?")[0] for m, p in server.requests if m == "GET"]
    return (
        paths.count(f"/data/prearchive/projects/{PROJECT}"),
        paths.count(f"/data/projects/{PROJECT}/experiments"),
    )


# --- configuration and labels --------------------------------------------------------------


def test_label_mapping() -> None:
    assert xnat_label("patient1") == "patient1"
    assert xnat_label("Müller, Hans") == "Muller__Hans"
    assert xnat_label("study [1].x") == "study__1__x"
    assert xnat_label("  ") == "unknown"
    assert xnat_label("a-b_C9") == "a-b_C9"
    long = xnat_label("x" * 100)
    assert len(long) == 64 and long.startswith("x" * 55 + "_")
    assert xnat_label("x" * 100) != xnat_label("x" * 101)


def test_config_round_trip_holds_no_secret(tmp_path: Path, password: str) -> None:
    section = {
        "Kind": "xnat_pre_archive",
        "Server": "https://xnat.example.org/",
        "Project": "P",
        "User": "u",
        "PasswordEnv": "MY_XNAT_PW",
        "VerifyTls": False,
    }
    place = build_place("x", section, tmp_path)
    assert place.to_config() == {
        "Kind": "xnat_pre_archive",
        "Server": "https://xnat.example.org",
        "Project": "P",
        "User": "u",
        "PasswordEnv": "MY_XNAT_PW",
        "VerifyTls": False,
    }
    assert place.describe() == "XNAT pre-archive project 'P' at https://xnat.example.org (user u)"
    assert (
        build_place(
            "x", {**section, "PasswordEnv": None} | {"PasswordEnv": "XNAT_PASS"}, tmp_path
        ).to_config()["PasswordEnv"]
        == "XNAT_PASS"
    )
    assert password not in repr(place.to_config())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Server": None}, "option 'Server' is required"),
        ({"Server": "ftp://x"}, "Server must be an http:// or https:// URL"),
        ({"Server": "https://u:pw@x.org"}, "user name or password"),
        ({"Project": ""}, "option 'Project' is required"),
        ({"PasswordEnv": "not a name"}, "PasswordEnv must be an environment variable name"),
        ({"VerifyTls": "yes"}, "VerifyTls must be true or false"),
    ],
)
def test_config_errors(tmp_path: Path, change: dict[str, object], message: str) -> None:
    section: dict[str, object] = {
        "Kind": "xnat_pre_archive",
        "Server": "https://x.org",
        "Project": "P",
        "User": "u",
    }
    section.update(change)
    section = {k: v for k, v in section.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        build_place("x", section, tmp_path)


def test_missing_password_variable_is_a_config_error(
    server: XnatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XNAT_PASS", raising=False)
    with xnat_place(server, tmp_path) as place, pytest.raises(ConfigError) as info:
        list(place.studies())
    assert str(info.value) == (
        "xnat_pre_archive place 'xnat': set the password in the environment variable XNAT_PASS"
    )
    assert server.requests == []  # nothing was tried without a password


# --- as a destination -----------------------------------------------------------------------


def test_send_seed_tree_then_second_send_uploads_nothing(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        first = send(items(src), dest)
        assert [(str(o.ref), o.status) for o in first.outcomes] == [
            ("src:patient1/study1", "sent"),
            ("src:patient1/study2", "sent"),
            ("src:patient1/study3", "sent"),
            ("src:patient2/study1", "sent"),
        ]
        assert listings(server) == (1, 1)  # one listing each for the whole batch
    assert len(server.imports) == 4
    sessions = {(s.subject, s.name): s for s in server.sessions(PROJECT)}
    assert set(sessions) == {
        ("patient1", "study1"),
        ("patient1", "study2"),
        ("patient1", "study3"),
        ("patient2", "study1"),
    }
    for key, files in layout.items():
        session = sessions[tuple(key.split("/"))]  # type: ignore[index]
        assert {f for scan in session.scans.values() for f in scan.files} == sop_uids(files)
        assert session.status == "READY"
    assert all(
        i.query["import-handler"] == "DICOM-zip" and i.query["dest"] == "/prearchive"
        for i in server.imports
    )

    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        before = listings(server)
        second = send(items(src), dest)
        assert [o.status for o in second.outcomes] == ["duplicate"] * 4
        after = listings(server)
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert len(server.imports) == 4  # nothing uploaded the second time


def test_archived_study_is_a_duplicate_too(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        send(items(src)[:1], dest)
        server.archive(PROJECT, label="study1")
        assert server.sessions(PROJECT) == []
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        outcome = send(items(src)[:1], dest).outcomes[0]
    assert outcome.status == "duplicate"
    assert len(server.imports) == 1


def test_study_still_receiving_is_not_sent_again(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    # another uploader is half-way through patient1/study3
    server.inject(
        PROJECT,
        layout["patient1/study3"][:2],
        subject="patient1",
        label="study3",
        status="RECEIVING",
    )
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src), dest)
    status = {o.ref.key: o.status for o in summary.outcomes}
    assert status == {
        "patient1/study1": "sent",
        "patient1/study2": "sent",
        "patient1/study3": "duplicate",
        "patient2/study1": "sent",
    }
    assert [i.query["session"] for i in server.imports] == ["study1", "study2", "study1"]
    assert server.find(PROJECT, label="study3").file_count() == 2  # untouched


def test_truncated_pixel_data_is_sent_as_xnat_accepts_it(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    """MR_truncated.dcm's header is whole and its Pixel Data ends early. XNAT's importer
    parses only the header attributes it needs and copies the rest unparsed, so the file
    is stored as it came and the study counts as sent."""
    build_seed_tree(tmp_path / "root")
    truncated = tmp_path / "root" / "patient3" / "study1" / "truncated.dcm"
    truncated.parent.mkdir(parents=True)
    shutil.copyfile(data("broken", "MR_truncated.dcm"), truncated)
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src), dest)
    assert [o.status for o in summary.outcomes] == ["sent"] * 5, summary.outcomes
    session = server.find(
        PROJECT, label="study1", tag=str(pydicom.dcmread(truncated).StudyInstanceUID)
    )
    (stored,) = [f for scan in session.scans.values() for f in scan.files.values()]
    assert stored.data == truncated.read_bytes()


def test_file_xnat_refuses_fails_its_study_and_the_others_arrive(
    server: XnatServer, tmp_path: Path, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A file without SOP Class UID has a SOP Instance UID, so the folder place counts it
    as an instance; XNAT's importer answers 400 after storing the members before it. The
    study fails with XNAT's message and the partial session is removed; the others arrive."""
    layout = build_seed_tree(tmp_path / "root")
    ds = pydicom.dcmread(layout["patient1/study3"][0])
    del ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.9")
    ds.save_as(tmp_path / "root" / "patient1" / "study3" / "zz_no_class.dcm")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src), dest)
    outcome = {o.ref.key: o for o in summary.outcomes}
    failed = outcome["patient1/study3"]
    assert failed.status == "failed" and not failed.retryable
    assert failed.error == (
        f"XNAT {server.url} upload: rejected (400: object 000008_zz_no_class.dcm contains no "
        "SOP Class UID)"
    )
    assert [o.status for k, o in sorted(outcome.items()) if k != "patient1/study3"] == ["sent"] * 3
    assert server.imports[2].status == 400
    # the 7 files before the refused one were stored, then removed again
    assert ("POST", "/data/services/prearchive/delete") in [
        (m, p.split("?")[0]) for m, p in server.requests
    ]
    assert {s.name for s in server.sessions(PROJECT)} == {"study1", "study2"}
    for key in ("patient1/study1", "patient1/study2", "patient2/study1"):
        assert sop_uids(layout[key]) <= server.sop_uids(PROJECT)
    assert "removed partial XNAT session" in caplog.text


def test_rejected_upload_is_cleaned_up_and_a_later_send_succeeds(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    build_seed_tree(tmp_path / "root")
    server.reject("study3", "Session is locked by an administrator", keep=3)
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        summary = send(items(src), dest)
        failed = {o.ref.key: o for o in summary.outcomes}["patient1/study3"]
        assert failed.status == "failed"
        assert failed.error == (
            f"XNAT {server.url} upload: rejected (400: Session is locked by an administrator)"
        )
    assert "study3" not in {s.name for s in server.sessions(PROJECT)}
    server.clear_rejections()
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        again = send(items(src), dest)
    assert {o.ref.key: o.status for o in again.outcomes}["patient1/study3"] == "sent"
    assert server.find(PROJECT, label="study3").file_count() == 7


def test_resend_of_missing_instances_merges_into_the_session(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    """Called directly (as after a partial failure elsewhere), receive merges into the
    existing session of the same study and label instead of making a second one."""
    layout = build_seed_tree(tmp_path / "root")
    files = layout["patient1/study3"]
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        ref = next(r for _, r in items(src) if r.key == "patient1/study3")
        ident = src.identity(ref)
        some = list(src.instances(ref))[:3]
        dest.receive(ref.key, some, ident)
        rest = list(src.instances(ref))[3:]
        receipt = dest.receive(ref.key, rest, ident)
    assert receipt.written == len(files) - 3
    (session,) = server.sessions(PROJECT)
    assert session.file_count() == len(files)


def test_labels_are_sanitised(server: XnatServer, tmp_path: Path, password: str) -> None:
    make_instance(
        tmp_path / "root" / "Dr. Müller" / "CT [1]" / "a.dcm",
        patient_id="p",
        study_uid="1.2.826.0.1.3680043.8.498.77",
    )
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        (outcome,) = send(items(src), dest).outcomes
    assert outcome.status == "sent"
    (session,) = server.sessions(PROJECT)
    assert (session.subject, session.name) == ("Dr__Muller", "CT__1_")


# --- errors ------------------------------------------------------------------------------------


def test_wrong_password(
    server: XnatServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("XNAT_PASS", "not-the-" + PASSWORD)
    with xnat_place(server, tmp_path) as place, pytest.raises(AuthenticationFailed) as info:
        place.prepare([])
    assert str(info.value) == (
        f"XNAT {server.url} refused the login of user 'tester' (check the password in XNAT_PASS)"
    )
    assert not info.value.retryable
    assert PASSWORD not in caplog.text and "not-the-" not in caplog.text
    # a refused password stops the batch at its one listing, not once per study
    with xnat_place(server, tmp_path) as place:
        build_seed_tree(tmp_path / "root")
        with root_place(tmp_path / "root") as src, pytest.raises(AuthenticationFailed) as again:
            send(items(src), place)
    assert str(again.value) == str(info.value)
    logins = [p for m, p in server.requests if p.startswith("/data/services/auth")]
    assert len(logins) == 2  # one for the first place, one for the batch


def test_unknown_project(server: XnatServer, tmp_path: Path, password: str) -> None:
    place = xnat_place(server, tmp_path)
    place.project = "NOPE"
    with place, pytest.raises(NotFound) as info:
        list(place.studies())
    assert str(info.value) == f"XNAT {server.url} has no project 'NOPE'"
    place = xnat_place(server, tmp_path)
    place.project = "LOCKED"
    with place, pytest.raises(NotFound) as info:
        list(place.studies())
    assert str(info.value) == (
        f"XNAT {server.url} has no project 'LOCKED' or user 'tester' may not access it"
    )


def test_unreachable_then_back(server: XnatServer, tmp_path: Path, password: str) -> None:
    build_seed_tree(tmp_path / "root")
    server.stop()
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        with pytest.raises(Unreachable) as info:
            dest.prepare([])
        assert info.value.retryable
        assert str(info.value) == (
            f"XNAT {server.url} is unreachable during login: no answer (Connection refused)"
        )
        server.start()
        (outcome,) = send(items(src)[:1], dest).outcomes
        assert outcome.status == "sent"
        # the server goes down after login, and comes back having forgotten our session
        server.stop()
        with pytest.raises(Unreachable) as info:
            dest.prepare([])
        assert str(info.value) == (
            f"XNAT {server.url} is unreachable during listing: no answer (Connection refused)"
        )
        server.forget_logins()
        server.start()
        (outcome,) = send(items(src)[1:2], dest).outcomes
        assert outcome.status == "sent"
    assert [i.status for i in server.imports] == [200, 200]


# --- as a source -------------------------------------------------------------------------------


def test_as_source_lists_and_reads_prearchive_and_archive(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    layout = build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        send(items(src), dest)
    server.archive(PROJECT, label="study2")
    server.inject(
        PROJECT, layout["patient1/study1"][:1], subject="busy", label="upload", status="RECEIVING"
    )
    with xnat_place(server, tmp_path) as place:
        refs = list(place.studies(StudyQuery("xnat")))
        assert sorted(r.key for r in refs) == sorted(layout)  # RECEIVING is not listed
        assert [r.key for r in place.studies(StudyQuery("xnat", "patient1", "*2"))] == [
            "patient1/study2"
        ]
        for ref in refs:
            ident = place.identity(ref)
            assert ident.sop_uids == frozenset(sop_uids(layout[ref.key]))
            got = {i.sop_uid: i.read() for i in place.instances(ref)}
            assert set(got) == ident.sop_uids
            assert all(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID == s for s, b in got.items())
        ref = next(r for r in refs if r.key == "patient1/study3")
        one = sorted(place.identity(ref).sop_uids)[0]
        assert [i.sop_uid for i in place.instances(ref, only={one})] == [one]


def test_xnat_to_folder_round_trip(server: XnatServer, tmp_path: Path, password: str) -> None:
    layout = build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        send(items(src), dest)
    (tmp_path / "back").mkdir()
    with xnat_place(server, tmp_path) as x, root_place(tmp_path / "back", "back") as back:
        summary = send(items(x), back)
        assert summary.sent == 4
        again = send(items(x), back)
        assert again.duplicates == 4
    for key, files in layout.items():
        assert sop_uids(list((tmp_path / "back" / key).rglob("*.dcm"))) == sop_uids(files)


def test_send_study_api_with_identity(server: XnatServer, tmp_path: Path, password: str) -> None:
    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        ref = items(src)[0][1]
        outcome = send_study(src, ref, dest)
        assert (outcome.status, outcome.sent) == ("sent", 3)
        assert dest.holds(ref.key, StudyIdentity("9.9.9", frozenset({"1"}))) == frozenset()
        assert send_study(src, ref, dest).status == "duplicate"


def test_close_logs_out_and_tolerates_a_dead_server(
    server: XnatServer, tmp_path: Path, password: str
) -> None:
    place = xnat_place(server, tmp_path)
    place.prepare([])
    assert len(server.store.logins) == 1
    place.close()
    assert server.store.logins == {}
    place.prepare([])
    server.stop()
    place.close()  # no exception
    with pytest.raises(Unreachable):
        place.prepare([])
    place.close()


def test_empty_receive_is_rejected(server: XnatServer, tmp_path: Path, password: str) -> None:
    with xnat_place(server, tmp_path) as place, pytest.raises(RemoteRejected, match="nothing"):
        place.receive("a/b", [], StudyIdentity("1.2", frozenset()))


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[XnatServer]:
    """The stand-in over https with a self-signed certificate made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    srv = XnatServer(users={"tester": PASSWORD}, projects=[PROJECT], tls=(cert, key)).start()
    yield srv
    srv.stop()


def test_tls_verification_and_ca_bundle(
    tls_server: XnatServer, tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert tls_server.url.startswith("https://")
    with xnat_place(tls_server, tmp_path) as place, pytest.raises(Unreachable) as info:
        place.prepare([])
    assert re.fullmatch(
        re.escape(f"XNAT {tls_server.url} login: TLS verification failed ([SSL: ")
        + r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed: self-signed certificate "
        + r"\(_ssl\.c:\d+\)\); give the CA in CaBundle",
        str(info.value),
    ), str(info.value)
    assert not info.value.retryable
    build_seed_tree(tmp_path / "root")
    with (
        root_place(tmp_path / "root") as src,
        xnat_place(tls_server, tmp_path, CaBundle=str(tmp_path / "cert.pem")) as dest,
    ):
        assert send(items(src)[:2], dest).sent == 2
        (ref,) = [r for r in dest.studies() if r.key == "patient1/study1"]
        assert len(dest.identity(ref)) == 3  # later requests verify with the bundle too
    assert "REQUESTS_CA_BUNDLE" not in os.environ
    with xnat_place(tls_server, tmp_path, VerifyTls=False) as place:
        place.prepare([])


def test_same_key_twice_gets_told_apart(server: XnatServer, tmp_path: Path, password: str) -> None:
    a = make_instance(None, patient_id="p", study_uid="1.2.826.0.1.3680043.8.498.501")
    b = make_instance(None, patient_id="p", study_uid="1.2.826.0.1.3680043.8.498.502")
    blobs = []
    for ds in (a, b):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    first = server.inject(PROJECT, [blobs[0]], subject="p", label="s")
    second = server.inject(PROJECT, [blobs[1]], subject="p", label="s")
    exp = server.archive(PROJECT, tag=second.tag, label="s")
    with xnat_place(server, tmp_path) as place:
        keys = sorted(r.key for r in place.studies())
        assert keys == ["p/s", f"p/s@{first.timestamp}"]
        refs = {r.key: r for r in place.studies()}
        assert place.identity(refs["p/s"]).study_uid == exp.uid  # the archived one
        assert place.identity(refs[f"p/s@{first.timestamp}"]).study_uid == first.tag


def test_long_lived_place_lists_again_when_its_listing_is_old(
    server: XnatServer, tmp_path: Path, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin worker keeps its place: a session deleted in XNAT must be sent again."""
    import dicomsync.places.xnat.destination as xnat_module

    build_seed_tree(tmp_path / "root")
    with root_place(tmp_path / "root") as src, xnat_place(server, tmp_path) as dest:
        ref = items(src)[0][1]
        ident = src.identity(ref)
        assert send_study(src, ref, dest).status == "sent"
        assert send_study(src, ref, dest).status == "duplicate"
        session = next(s for s in server.sessions(PROJECT) if s.name == ref.study)
        assert server.store.delete_session("/data" + session.url)
        assert dest.holds(ref.key, ident) == ident.sop_uids  # the listing is still fresh
        monkeypatch.setattr(xnat_module, "LISTING_MAX_AGE", 0.0)
        assert dest.holds(ref.key, ident) == frozenset()
        assert send_study(src, ref, dest).status == "sent"
