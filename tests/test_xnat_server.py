"""The XNAT stand-in speaks what the real ``xnat`` client (xnatpy) expects.

These tests drive the stand-in with xnatpy itself, unchanged, so that the place tests
rest on a server that behaves as XNAT's documented REST API does.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
import requests
import xnat
import xnat.exceptions

from dicomdata import data, make_instance, pcir_study_files
from servers.xnat import XnatServer, iter_zip_dicom

PASSWORD = "s3cret-Pa55"
LOG = logging.getLogger("test.xnatpy")


@pytest.fixture
def server() -> Iterator[XnatServer]:
    srv = XnatServer(
        users={"tester": PASSWORD, "other": "x"},
        projects={"TESTPROJ": None, "PRIVATE": {"other"}},
    ).start()
    yield srv
    srv.stop()


@pytest.fixture
def session(server: XnatServer) -> Iterator[xnat.session.XNATSession]:
    s = xnat.connect(server.url, user="tester", password=PASSWORD, no_parse_model=True, logger=LOG)
    yield s
    s.disconnect()


def zip_of(files: Sequence[Path | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, f in enumerate(files):
            zf.writestr(f"{i:03d}.dcm", f if isinstance(f, bytes) else f.read_bytes())
    return buf.getvalue()


def first_study() -> list[Path]:
    return next(iter(pcir_study_files().values()))


def test_login_sequence_is_what_xnatpy_does(server: XnatServer) -> None:
    s = xnat.connect(server.url, user="tester", password=PASSWORD, no_parse_model=True, logger=LOG)
    try:
        assert s.logged_in_user == "tester"
        assert s.xnat_version == "1.8.10"
        assert s.interface.cookies.get("JSESSIONID")
    finally:
        s.disconnect()
    paths = [p.split("?")[0] for _, p in server.requests]
    assert paths[:5] == [
        "/",
        "/app/template/Login.vm",
        "/data/services/auth",
        "/data/auth",
        "/data/JSESSION",
    ]
    assert ("DELETE", "/data/JSESSION") in server.requests
    assert not server.store.logins  # logged out


def test_wrong_password_is_refused(server: XnatServer) -> None:
    with pytest.raises(xnat.exceptions.XNATLoginFailedError, match="Login attempt failed"):
        xnat.connect(server.url, user="tester", password="wrong", no_parse_model=True, logger=LOG)
    r = requests.get(server.url + "/data/prearchive/projects", auth=("tester", "wrong"), timeout=5)
    assert r.status_code == 401


def test_basic_auth_opens_a_session(server: XnatServer) -> None:
    r = requests.get(server.url + "/data/auth", auth=("tester", PASSWORD), timeout=5)
    assert r.status_code == 200 and "User 'tester' is logged in" in r.text
    assert r.cookies.get("JSESSIONID")


def test_unknown_and_forbidden_projects(session: xnat.session.XNATSession) -> None:
    assert (
        session.get_json("/data/projects/TESTPROJ")["items"][0]["data_fields"]["ID"] == "TESTPROJ"
    )
    with pytest.raises(xnat.exceptions.XNATResponseError, match="status 404"):
        session.get("/data/projects/NOPE")
    with pytest.raises(xnat.exceptions.XNATResponseError, match="status 403"):
        session.get("/data/prearchive/projects/PRIVATE")


def test_import_groups_by_study_and_answers_the_session_uri(
    server: XnatServer, session: xnat.session.XNATSession
) -> None:
    files = first_study()
    result = session.services.import_(
        data=io.BytesIO(zip_of(files)),
        project="TESTPROJ",
        subject="patient1",
        experiment="study1",
        destination="/prearchive",
        import_handler="DICOM-zip",
        content_type="application/zip",
    )
    assert result.uri.startswith("/data/prearchive/projects/TESTPROJ/")
    assert result.uri.endswith("/study1")
    rows = session.get_json("/data/prearchive/projects/TESTPROJ")["ResultSet"]["Result"]
    assert len(rows) == 1
    row = rows[0]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert (row["subject"], row["name"], row["folderName"], row["tag"], row["status"]) == (
        "patient1",
        "study1",
        "study1",
        study_uid,
        "READY",
    )
    assert row["url"] == result.uri.removeprefix("/data")
    for column in ("project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time"):
        assert row[column]
    # xnatpy's own wrappers parse the rows
    (pre,) = session.prearchive.sessions("TESTPROJ")
    assert pre.tag == study_uid and pre.uploaded is not None and pre.scan_date is not None
    scans = session.get_json(result.uri + "/scans")["ResultSet"]["Result"]
    counts = [
        int(r["file_count"])
        for s in scans
        for r in session.get_json(f"{result.uri}/scans/{s['ID']}/resources")["ResultSet"]["Result"]
    ]
    assert sum(counts) == len(files)


def test_resend_merges_into_the_same_session(
    server: XnatServer, session: xnat.session.XNATSession
) -> None:
    files = first_study()
    kw = dict(
        project="TESTPROJ",
        subject="p",
        experiment="s",
        destination="/prearchive",
        import_handler="DICOM-zip",
        content_type="application/zip",
    )
    a = session.services.import_(data=io.BytesIO(zip_of(files[:1])), **kw)
    b = session.services.import_(data=io.BytesIO(zip_of(files)), **kw)
    assert a.uri == b.uri
    (only,) = server.sessions("TESTPROJ")
    assert only.file_count() == len(files)
    # a different label for the same study is a different session, as in XNAT
    kw["experiment"] = "other"
    session.services.import_(data=io.BytesIO(zip_of(files[:1])), **kw)
    assert len(server.sessions("TESTPROJ")) == 2


IMPORT = {
    "project": "TESTPROJ",
    "subject": "p",
    "experiment": "s",
    "destination": "/prearchive",
    "import_handler": "DICOM-zip",
}


def without(path: Path, keyword: str) -> bytes:
    """The file with one dataset attribute removed (its file meta keeps the UIDs)."""
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_truncated_pixel_data_is_stored_unparsed_as_xnat_does(
    server: XnatServer, session: xnat.session.XNATSession
) -> None:
    """GradualDicomImporter parses only up to its stop tag; Pixel Data that ends early is
    copied as it came, and the import succeeds."""
    truncated = data("broken", "MR_truncated.dcm")
    files = first_study()
    result = session.services.import_(data=io.BytesIO(zip_of([*files[:2], truncated])), **IMPORT)
    assert result.uri.startswith("/data/prearchive/projects/TESTPROJ/")
    assert server.imports[-1].status == 200
    stored = {
        f.sop_uid: f.data
        for s in server.sessions("TESTPROJ")
        for scan in s.scans.values()
        for f in scan.files.values()
    }
    sop = str(pydicom.dcmread(truncated, stop_before_pixels=True).SOPInstanceUID)
    assert stored[sop] == truncated.read_bytes()
    assert len(stored) == 3


@pytest.mark.parametrize(
    ("keyword", "reason"),
    [
        ("SOPClassUID", "contains no SOP Class UID"),
        ("SOPInstanceUID", "contains no SOP Instance UID"),
    ],
)
def test_member_without_sop_uid_gives_400_and_leaves_a_partial_session(
    server: XnatServer, session: xnat.session.XNATSession, keyword: str, reason: str
) -> None:
    files = first_study()
    body = zip_of([*files[:2], without(files[2], keyword), *files[3:]])
    with pytest.raises(xnat.exceptions.XNATUploadError) as info:
        session.services.import_(data=io.BytesIO(body), **IMPORT)
    assert "Status code 400" in str(info.value)
    assert f"object 002.dcm {reason}" in str(info.value)
    (partial,) = server.sessions("TESTPROJ")
    assert partial.file_count() == 2  # the members before it stay
    assert server.imports[-1].status == 400


def test_not_dicom_member_gives_400_unless_ignored(
    session: xnat.session.XNATSession, server: XnatServer
) -> None:
    body = zip_of([b"this is not DICOM", *first_study()])
    imp = {k: v for k, v in IMPORT.items() if k != "destination"}
    with pytest.raises(xnat.exceptions.XNATUploadError, match="unable to read DICOM object 000"):
        session.services.import_(data=io.BytesIO(body), **imp)
    assert server.sessions() == []
    query = {
        "project": "TESTPROJ",
        "subject": "p",
        "session": "s",
        "import-handler": "DICOM-zip",
        "Ignore-Unparsable": "true",
    }
    r = session.post("/data/services/import", data=body, query=query)
    assert r.text.strip().startswith("/data/prearchive/projects/TESTPROJ/")
    # ignored members alone: nothing arrives, and the last reason is the answer
    with pytest.raises(xnat.exceptions.XNATResponseError, match="status 400"):
        session.post("/data/services/import", data=zip_of([b"not DICOM"]), query=query)


def test_import_into_unknown_project_or_bad_label_is_refused(
    session: xnat.session.XNATSession,
) -> None:
    body = zip_of(first_study()[:1])
    with pytest.raises(xnat.exceptions.XNATUploadError, match="Status code 404"):
        session.services.import_(
            data=io.BytesIO(body),
            project="NOPE",
            subject="p",
            experiment="s",
            import_handler="DICOM-zip",
        )
    with pytest.raises(xnat.exceptions.XNATUploadError, match="Invalid session label"):
        session.services.import_(
            data=io.BytesIO(body),
            project="TESTPROJ",
            subject="p",
            experiment="a b",
            import_handler="DICOM-zip",
        )


def test_receiving_sessions_are_listed_and_xnatpy_hides_them_by_default(
    server: XnatServer, session: xnat.session.XNATSession
) -> None:
    server.inject("TESTPROJ", first_study()[:1], subject="p", label="s", status="RECEIVING")
    rows = session.get_json("/data/prearchive/projects/TESTPROJ")["ResultSet"]["Result"]
    assert [r["status"] for r in rows] == ["RECEIVING"]
    assert session.prearchive.sessions("TESTPROJ") == []  # the original dicomsync's blind spot
    assert len(session.prearchive.sessions("TESTPROJ", allow_receiving=True)) == 1
    server.set_status("TESTPROJ", "READY", label="s")
    assert len(session.prearchive.sessions("TESTPROJ")) == 1


def test_download_of_prearchive_and_archived_sessions(
    server: XnatServer, session: xnat.session.XNATSession, tmp_path: Path
) -> None:
    files = first_study()
    sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    pre = server.inject("TESTPROJ", files, subject="p", label="s")
    session.download_zip(f"/data{pre.url}", tmp_path / "pre.zip", verbose=False)
    assert {str(d.SOPInstanceUID) for d in iter_zip_dicom(tmp_path / "pre.zip")} == sop
    listing = session.get_json(
        f"/data{pre.url}/scans/{next(iter(pre.scans.values())).id}/resources/DICOM/files"
    )["ResultSet"]["Result"]
    assert listing and {"Name", "Size", "URI"} <= set(listing[0])

    exp = server.archive("TESTPROJ", label="s")
    assert server.sessions("TESTPROJ") == []
    rows = session.get_json(
        "/data/projects/TESTPROJ/experiments", query={"columns": "ID,label,subject_label,UID"}
    )["ResultSet"]["Result"]
    assert rows == [
        {
            "ID": exp.id,
            "label": "s",
            "subject_label": "p",
            "UID": pre.tag,
            "URI": f"/data/experiments/{exp.id}",
        }
    ]
    subjects = session.get_json("/data/projects/TESTPROJ/subjects")["ResultSet"]["Result"]
    assert [s["label"] for s in subjects] == ["p"]
    session.download_zip(
        f"/data/experiments/{exp.id}/scans/ALL/files", tmp_path / "a.zip", verbose=False
    )
    assert {str(d.SOPInstanceUID) for d in iter_zip_dicom(tmp_path / "a.zip")} == sop


def test_archive_and_delete_services(server: XnatServer, session: xnat.session.XNATSession) -> None:
    pre = server.inject("TESTPROJ", first_study(), subject="p", label="s")
    (wrapped,) = session.prearchive.sessions("TESTPROJ")
    wrapped.delete()
    assert server.sessions() == []
    pre = server.inject("TESTPROJ", first_study(), subject="p", label="s")
    answer = session.post("/data/services/archive", query={"src": pre.url}).text.strip()
    assert answer.startswith("/data/experiments/XNAT_E")


def test_stop_and_start_keep_port_and_data(server: XnatServer, tmp_path: Path) -> None:
    server.inject("TESTPROJ", [_instance_bytes()], subject="p", label="s")
    port = server.port
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/data/auth", timeout=2)
    server.start()
    assert server.port == port
    r = requests.get(
        server.url + "/data/prearchive/projects/TESTPROJ",
        auth=("tester", PASSWORD),
        params={"format": "json"},
        timeout=5,
    )
    assert len(r.json()["ResultSet"]["Result"]) == 1


def _instance_bytes() -> bytes:
    ds = make_instance(None, patient_id="p", study_uid="1.2.826.0.1.3680043.8.498.1")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
