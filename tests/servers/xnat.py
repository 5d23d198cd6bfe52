"""A protocol-faithful XNAT stand-in that the real ``xnat`` client (xnatpy) talks to unchanged.

There is no way to run a real XNAT in this environment (no Docker engine, no XNAT war in a
reachable registry), so the XNAT place is tested against this server. It implements the
slice of XNAT's REST API that dicomsync and xnatpy use, following XNAT's documented
behaviour (wiki.xnat.org: "Image Session Import Service API", "Image Session Archive
Service API", the prearchive REST directory) and what xnatpy 0.8 sends and parses:

Login (what ``xnat.connect(server, user=, password=)`` does)
    ``GET /``                        302 to ``/app/template/Login.vm`` (xnatpy's redirect probe)
    ``PUT /data/services/auth``      form ``username``/``password`` -> 200, the JSESSIONID as
                                     text plus a ``JSESSIONID`` cookie; 401 + ``<h3>`` message
    ``GET /data/auth``               200 ``User 'x' is logged in`` or 401
    ``GET|DELETE /data/JSESSION``    heartbeat / logout
    ``GET /data/version``            404, as on XNAT >= 1.7; xnatpy then asks
    ``GET /xapi/siteConfig/buildInfo``  ``{"version": ...}``
    Basic auth works on every ``/data`` and ``/xapi`` request too, and opens a session.

Import
    ``POST /data/services/import?import-handler=DICOM-zip&dest=/prearchive&project=&subject=
    &session=`` with a zip body. As XNAT's ``DicomZipImporter`` hands each member to
    ``GradualDicomImporter``, each member is read only up to a stop tag (``STOP_TAG``, one
    past StudyComments (0032,4000), the last attribute XNAT's default identifier reads);
    the rest, Pixel Data included, is stored unparsed, so a truncated Pixel Data is
    accepted as it came. Members are grouped into prearchive sessions by (project,
    StudyInstanceUID as ``tag``, session label). A re-sent instance (same SOP Instance UID)
    replaces the file of the same name, so re-sending merges. The answer is the session
    URI(s) as ``text/plain``, one per line, like XNAT. ``400`` is for what the importer
    refuses: a member it cannot read as DICOM (``unable to read DICOM object <name>``), or
    one without a SOP Class UID or SOP Instance UID (``object <name> contains no SOP Class
    UID``); the members before it stay in the prearchive, so the session is partial.
    ``Ignore-Unparsable=true`` skips such members (and answers the last reason when
    nothing else arrived).

Prearchive
    ``GET /data/prearchive/projects[/P]``      ResultSet with XNAT's columns (project,
        timestamp, lastmod, uploaded, scan_date, scan_time, subject, folderName, name, tag,
        status, url, autoarchive, prevent_anon, prevent_auto_commit, SOURCE, VISIT, PROTOCOL,
        TIMEZONE). RECEIVING sessions are listed too (xnatpy filters them client-side).
    ``GET .../P/{timestamp}/{name}``           the session row; ``?format=zip`` its files
    ``GET .../scans``, ``.../scans/{id}/resources`` (label, file_count, file_size),
        ``.../resources/DICOM/files`` (Name, Size, URI) and ``.../files/{name}`` (bytes)
    ``POST /data/services/prearchive/delete?src=/prearchive/projects/P/ts/name``
    ``POST /data/services/archive?src=...``    moves a session into the archive

Archive
    ``GET /data/projects/P``                   404 unknown, 403 no access
    ``GET /data/projects/P/subjects``, ``GET /data/projects/P/experiments`` (honours
        ``columns=`` with XNAT's REST shortcuts ID, label, subject_label, subject_ID, UID,
        xsiType, date, insert_date, project, URI)
    ``GET /data/experiments/{ID}/scans``, ``.../scans/{id}/resources``,
        ``.../scans/ALL/files?format=zip``

Not implemented (answers 404): the XNAT data model/schemas (use ``no_parse_model=True``),
search, pipelines, anonymisation, XAR/gradual-DICOM/SI handlers, ``dest=/archive``. Not
reproduced: dcm4che reads a raw dataset without preamble and file meta; the stand-in
(pydicom with ``force=False``) refuses it as not DICOM.

Hooks for tests: ``set_status``, ``reject``, ``inject``, ``archive``, ``stop``/``start``
on the same port (``forget_logins`` drops server-side sessions like a Tomcat restart),
``fail_imports`` (the next imports answer 503 or lose the connection, before or after
storing), ``omit_uid_column`` (experiment listings without ``UID``), ``imports`` (every
import request) and ``requests`` (every request line).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import re
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

XNAT_VERSION = "1.8.10"
JSON = "application/json"
TEXT = "text/plain"
HTML = "text/html"


# --- the store ------------------------------------------------------------------------------


@dataclass
class StoredFile:
    name: str
    data: bytes
    sop_uid: str


@dataclass
class Scan:
    id: str
    series_uid: str
    series_description: str
    modality: str
    files: dict[str, StoredFile] = field(default_factory=dict)  # by SOP Instance UID

    @property
    def file_size(self) -> int:
        return sum(len(f.data) for f in self.files.values())


@dataclass
class PrearcSession:
    project: str
    timestamp: str
    name: str
    subject: str
    tag: str
    status: str
    uploaded: str
    lastmod: str
    scan_date: str
    scan_time: str
    scans: dict[str, Scan] = field(default_factory=dict)  # by SeriesInstanceUID

    @property
    def url(self) -> str:
        return f"/prearchive/projects/{self.project}/{self.timestamp}/{self.name}"

    def row(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "timestamp": self.timestamp,
            "lastmod": self.lastmod,
            "uploaded": self.uploaded,
            "scan_date": self.scan_date,
            "scan_time": self.scan_time,
            "subject": self.subject,
            "folderName": self.name,
            "name": self.name,
            "tag": self.tag,
            "status": self.status,
            "url": self.url,
            "autoarchive": "Manual",
            "prevent_anon": "false",
            "prevent_auto_commit": "false",
            "SOURCE": "",
            "VISIT": "",
            "PROTOCOL": "",
            "TIMEZONE": "",
        }

    def file_count(self) -> int:
        return sum(len(s.files) for s in self.scans.values())


@dataclass
class Subject:
    id: str
    project: str
    label: str
    insert_date: str


@dataclass
class Experiment:
    id: str
    project: str
    subject: Subject
    label: str
    uid: str
    date: str
    insert_date: str
    modality: str
    scans: dict[str, Scan] = field(default_factory=dict)

    @property
    def xsi_type(self) -> str:
        kind = {"MR": "mr", "CT": "ct", "PT": "pet", "CR": "cr", "DX": "dx"}.get(self.modality)
        return f"xnat:{kind}SessionData" if kind else "xnat:otherDicomSessionData"

    def row(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "label": self.label,
            "project": self.project,
            "date": self.date,
            "xsiType": self.xsi_type,
            "xnat:subjectassessordata/id": self.id,
            "insert_date": self.insert_date,
            "subject_label": self.subject.label,
            "subject_ID": self.subject.id,
            "UID": self.uid,
            "URI": f"/data/experiments/{self.id}",
        }


@dataclass
class ImportRecord:
    """One ``POST /data/services/import`` as the server saw it."""

    user: str
    query: dict[str, str]
    members: int
    status: int
    answer: str


@dataclass
class ImportFault:
    """What the next import request suffers: an error status, or a dropped connection."""

    status: int = 503  # answered with this status (ignored when ``reset``)
    reset: bool = False  # close the connection without an answer
    after_storing: bool = False  # the import happens first; only the answer is lost


class ImportFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> dt.datetime:
    return dt.datetime.now()


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def _label_ok(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+", value) is not None


# GradualDicomImporter reads each object only up to a stop tag: one past the last tag its
# DicomObjectIdentifier needs, and at least past SeriesDescription. XNAT's default
# (classic) identifier reads up to StudyComments (0032,4000). Everything after the stop
# tag, Pixel Data included, is copied into the stored file unparsed.
STOP_TAG = 0x00324001


class UnreadableMember(ValueError):
    """A member XNAT's importer refuses: the message is the ClientException's text."""


def parse_member(name: str, data: bytes) -> pydicom.Dataset:
    """Read one zip member as XNAT's GradualDicomImporter does; UnreadableMember if it can't.

    Only the attributes before ``STOP_TAG`` are parsed (pydicom's ``read_partial`` with a
    stop condition, as dcm4che's ``StopTagInputHandler``), so damage after them, such as
    Pixel Data that ends early, is not noticed: XNAT stores such a file as it came. The
    importer's 400s are for input it cannot read as DICOM, and for objects without a SOP
    Class UID or a SOP Instance UID (``object <name> contains no SOP Class UID``).
    """

    def stop(tag: Any, vr: Any, length: int) -> bool:
        return int(tag) >= STOP_TAG

    try:
        ds = read_partial(io.BytesIO(data), stop_when=stop, force=False)
        ds.get("SOPInstanceUID")  # values are decoded lazily: decode the ones XNAT reads
        for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            ds.get(keyword)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors... on non-DICOM
        raise UnreadableMember(f"unable to read DICOM object {name}") from exc
    if not str(ds.get("SOPClassUID", "") or "").strip():
        raise UnreadableMember(f"object {name} contains no SOP Class UID")
    if not str(ds.get("SOPInstanceUID", "") or "").strip():
        raise UnreadableMember(f"object {name} contains no SOP Instance UID")
    return ds


class XnatStore:
    """The server's state: users, projects, prearchive, archive, logins. Thread-safe."""

    def __init__(self, users: dict[str, str], projects: dict[str, set[str] | None]) -> None:
        self.lock = threading.RLock()
        self.users = dict(users)
        self.projects = dict(projects)
        self.prearchive: list[PrearcSession] = []
        self.subjects: dict[tuple[str, str], Subject] = {}
        self.experiments: dict[str, Experiment] = {}
        self.logins: dict[str, str] = {}  # JSESSIONID -> user
        self.imports: list[ImportRecord] = []
        self.requests: list[tuple[str, str]] = []
        self.rejections: dict[str, tuple[str, int]] = {}  # session label -> (message, keep)
        self.import_faults: list[ImportFault] = []  # for the next import requests, in order
        self.uid_column = True  # False: experiment listings lack the UID column
        self._counter = 0
        self._last_ts = ""

    # ids ---------------------------------------------------------------------------------
    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"XNAT_{prefix}{self._counter:05d}"

    def _timestamp(self) -> str:
        ts = _now().strftime("%Y%m%d_%H%M%S%f")[:-3]
        while ts <= self._last_ts:  # unique and increasing, like XNAT's folder names
            base = int(self._last_ts.replace("_", "")) + 1
            text = str(base)
            ts = f"{text[:8]}_{text[8:]}"
        self._last_ts = ts
        return ts

    # access ------------------------------------------------------------------------------
    def can_access(self, user: str, project: str) -> bool | None:
        """None: no such project; False: exists but the user may not see it."""
        if project not in self.projects:
            return None
        allowed = self.projects[project]
        return allowed is None or user in allowed

    # prearchive --------------------------------------------------------------------------
    def find_session(self, project: str, timestamp: str, name: str) -> PrearcSession | None:
        for s in self.prearchive:
            if (s.project, s.timestamp, s.name) == (project, timestamp, name):
                return s
        return None

    def _session_for(
        self, project: str, tag: str, label: str, subject: str, ds: pydicom.Dataset
    ) -> PrearcSession:
        for s in self.prearchive:
            if (s.project, s.tag, s.name) == (project, tag, label):
                return s
        now = _stamp(_now())
        session = PrearcSession(
            project=project,
            timestamp=self._timestamp(),
            name=label,
            subject=subject,
            tag=tag,
            status="RECEIVING",
            uploaded=now,
            lastmod=now,
            scan_date=_fmt_date(str(ds.get("StudyDate", "") or "")),
            scan_time=_fmt_time(str(ds.get("StudyTime", "") or "")),
        )
        self.prearchive.append(session)
        return session

    def add_instance(
        self, project: str, subject: str | None, label: str | None, ds: pydicom.Dataset, data: bytes
    ) -> PrearcSession:
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "") or study_uid
        subject = subject or _label_from(str(ds.get("PatientName", "") or ""), "unknown")
        label = label or _label_from(str(ds.get("PatientID", "") or ""), study_uid)
        session = self._session_for(project, study_uid, label, subject, ds)
        session.status = "RECEIVING"
        scan = session.scans.get(series_uid)
        if scan is None:
            number = str(ds.get("SeriesNumber", "") or "") or str(len(session.scans) + 1)
            taken = {s.id for s in session.scans.values()}
            scan_id, k = number, 1
            while scan_id in taken:
                k += 1
                scan_id = f"{number}-{k}"
            scan = Scan(
                id=scan_id,
                series_uid=series_uid,
                series_description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
            )
            session.scans[series_uid] = scan
        digest = hashlib.sha1(f"{ds.get('SOPClassUID', '')}{sop_uid}".encode()).hexdigest()[:8]
        name = (
            f"{study_uid}-{ds.get('SeriesNumber', '') or 0}-"
            f"{ds.get('InstanceNumber', '') or 0}-{digest}.dcm"
        )
        scan.files[sop_uid] = StoredFile(name=name, data=data, sop_uid=sop_uid)
        session.lastmod = _stamp(_now())
        return session

    def import_zip(self, user: str, query: dict[str, str], body: Any) -> list[PrearcSession]:
        """DICOM-zip into the prearchive; raises ImportFailed like XNAT's 4xx answers."""
        handler = query.get("import-handler", "DICOM-zip")
        if handler != "DICOM-zip":
            raise ImportFailed(400, f"Unsupported import handler in this stand-in: {handler}")
        dest = query.get("dest", "/prearchive")
        project = query.get("project", "")
        match = re.fullmatch(r"/prearchive(?:/projects/([^/]+))?/?", dest)
        if not match:
            raise ImportFailed(400, f"Unsupported destination in this stand-in: {dest}")
        project = match.group(1) or project
        if not project:
            raise ImportFailed(400, "No project specified; the stand-in has no Unassigned area")
        access = self.can_access(user, project)
        if access is None:
            raise ImportFailed(404, f"Unable to identify project: {project}")
        if not access:
            raise ImportFailed(403, f"User {user} does not have permission to upload to {project}")
        subject = query.get("subject") or None
        label = query.get("session") or None
        for what, value in (("subject", subject), ("session", label)):
            if value is not None and not _label_ok(value):
                raise ImportFailed(400, f"Invalid {what} label: {value}")
        ignore = query.get("Ignore-Unparsable", "false") == "true"
        touched: list[PrearcSession] = []
        try:
            archive = zipfile.ZipFile(body)
        except zipfile.BadZipFile as exc:
            raise ImportFailed(400, f"Unable to read the uploaded archive: {exc}") from exc
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            rejected = self.rejections.get(label or "")
            ignored: UnreadableMember | None = None
            for i, member in enumerate(members):
                if rejected is not None and i >= rejected[1]:
                    self._finish(touched)
                    raise ImportFailed(400, rejected[0])
                data = archive.read(member)
                try:
                    ds = parse_member(member.filename, data)
                except UnreadableMember as exc:
                    if ignore:  # Ignore-Unparsable: skip it, unless nothing else arrives
                        ignored = exc
                        continue
                    self._finish(touched)
                    raise ImportFailed(400, str(exc)) from exc
                with self.lock:
                    session = self.add_instance(project, subject, label, ds, data)
                    if session not in touched:
                        touched.append(session)
            self._finish(touched)
        if not touched and ignored is not None:
            raise ImportFailed(400, str(ignored))
        return touched

    def _finish(self, sessions: Iterable[PrearcSession]) -> None:
        with self.lock:
            for s in sessions:
                if s.status == "RECEIVING":
                    s.status = "READY"

    def delete_session(self, src: str) -> bool:
        with self.lock:
            for s in list(self.prearchive):
                if s.url == src.removeprefix("/data"):
                    self.prearchive.remove(s)
                    return True
        return False

    def archive_session(self, session: PrearcSession) -> Experiment:
        with self.lock:
            key = (session.project, session.subject)
            subject = self.subjects.get(key)
            if subject is None:
                subject = Subject(
                    self._next_id("S"), session.project, session.subject, _stamp(_now())
                )
                self.subjects[key] = subject
            modality = next((s.modality for s in session.scans.values()), "")
            exp = Experiment(
                id=self._next_id("E"),
                project=session.project,
                subject=subject,
                label=session.name,
                uid=session.tag,
                date=session.scan_date,
                insert_date=_stamp(_now()),
                modality=modality,
                scans=session.scans,
            )
            self.experiments[exp.id] = exp
            self.prearchive.remove(session)
            return exp


def _fmt_date(value: str) -> str:
    if re.fullmatch(r"\d{8}", value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _fmt_time(value: str) -> str:
    if re.fullmatch(r"\d{6}(\.\d+)?", value):
        return f"{value[:2]}:{value[2:4]}:{value[4:6]}"
    return value


def _label_from(value: str, fallback: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", value.strip())
    return text or re.sub(r"[^A-Za-z0-9_-]", "_", fallback)


def _zip_scans(scans: Iterable[Scan], prefix: str, out: Any) -> None:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for scan in scans:
            for f in scan.files.values():
                zf.writestr(f"{prefix}/scans/{scan.id}/resources/DICOM/files/{f.name}", f.data)
        zf.writestr(f"{prefix}/catalog.xml", "<cat:Catalog/>")  # non-DICOM, as XNAT zips have


# --- HTTP --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # plumbing ----------------------------------------------------------------------------
    @property
    def store(self) -> XnatStore:
        return self.server.store

    def _send(
        self,
        status: int,
        body: bytes | str = b"",
        ctype: str = TEXT,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header(
            "Content-Type", f"{ctype};charset=UTF-8" if ctype != "application/zip" else ctype
        )
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**getattr(self, "_extra", {}), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value), JSON)

    def _result_set(self, rows: list[dict[str, Any]]) -> None:
        self._json({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})

    def _error(self, status: int, message: str) -> None:
        # XNAT (Restlet) answers errors as a small HTML page; the client shows the text
        reason = {
            400: "Bad Request",
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not Found",
            409: "Conflict",
        }.get(status, "Error")
        page = (
            f"<html><head><title>Status page</title></head><body><h3>{message}</h3>"
            f"<p>{reason}</p></body></html>"
        )
        self._send(status, page, HTML)

    def _read_body(self) -> Any:
        spool = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                spool.write(self.rfile.read(size))
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                spool.write(chunk)
                remaining -= len(chunk)
        spool.seek(0)
        return spool

    def _cookie_session(self) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "JSESSIONID" and value:
                return value
        return None

    def _user(self) -> tuple[str | None, dict[str, str]]:
        """The logged-in user, and headers to add (a new session cookie)."""
        token = self._cookie_session()
        with self.store.lock:
            if token and token in self.store.logins:
                return self.store.logins[token], {}
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, {}
            if self.store.users.get(user) == password and user:
                return user, self._new_login(user)
        return None, {}

    def _new_login(self, user: str) -> dict[str, str]:
        token = secrets.token_hex(16).upper()
        with self.store.lock:
            self.store.logins[token] = user
        return {"Set-Cookie": f"JSESSIONID={token}; Path=/; HttpOnly", "X-Token": token}

    # dispatch ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        with self.store.lock:
            self.store.requests.append((self.command, self.path))
        method = self.command if self.command != "HEAD" else "GET"
        self._extra: dict[str, str] = {}
        try:
            if path == "/" and method == "GET":
                self._send(302, "", HTML, {"Location": "/app/template/Login.vm"})
                return
            if path == "/app/template/Login.vm":
                self._send(
                    200,
                    '<html><body><form name="form1" method="post" '
                    'action="/xnat/login"></form></body></html>',
                    HTML,
                )
                return
            if path == "/data/services/auth" and method == "PUT":
                self._login()
                return
            if path == "/data/JSESSION" and method == "DELETE":
                token = self._cookie_session()
                with self.store.lock:
                    self.store.logins.pop(token or "", None)
                self._send(200, "")
                return
            if path.startswith(("/data", "/REST", "/xapi")):
                user, extra = self._user()
                if user is None:
                    if path == "/data/JSESSION":
                        self._send(200, secrets.token_hex(16).upper())  # guest session
                        return
                    self._error(401, "Login attempt failed. Please try again.")
                    return
                self._route(method, path.replace("/REST/", "/data/", 1), query, user, extra)
                return
            self._error(404, f"The requested resource {path} is not available")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _login(self) -> None:
        body = self._read_body().read().decode("utf-8", "replace")
        form = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        user, password = form.get("username", ""), form.get("password", "")
        if not user or self.store.users.get(user) != password:
            self._error(401, "Login attempt failed. Please try again.")
            return
        headers = self._new_login(user)
        self._send(200, headers.pop("X-Token"), TEXT, headers)

    def _route(
        self, method: str, path: str, query: dict[str, str], user: str, extra: dict[str, str]
    ) -> None:
        extra.pop("X-Token", None)
        self._extra = extra  # a new session cookie rides on the answer
        store = self.store
        fmt = query.get("format", "json")
        m: re.Match[str] | None
        if path == "/data/auth":
            self._send(200, f"User '{user}' is logged in", TEXT)
        elif path == "/data/JSESSION":
            self._send(200, self._cookie_session() or "", TEXT, extra)
        elif path == "/data/version":
            self._error(404, "The requested resource /data/version is not available")
        elif path == "/xapi/siteConfig/buildInfo":
            self._json(
                {
                    "version": XNAT_VERSION,
                    "buildNumber": "stand-in",
                    "commit": "stand-in",
                    "date": "2024-01-01",
                }
            )
        elif path == "/xapi/siteConfig/uptime":
            self._json({"days": 0, "hours": 0, "minutes": 1, "seconds": 0})
        elif path == "/data/services/import" and method == "POST":
            self._import(query, user)
        elif path == "/data/services/prearchive/delete" and method == "POST":
            ok = store.delete_session(query.get("src", ""))
            self._send(200, "") if ok else self._error(404, "No such prearchive session")
        elif path == "/data/services/archive" and method == "POST":
            self._archive(query, user)
        elif path == "/data/prearchive/projects" and method == "GET":
            with store.lock:
                rows = [s.row() for s in store.prearchive if store.can_access(user, s.project)]
            self._result_set(rows)
        elif (m := re.fullmatch(r"/data/prearchive/projects/([^/]+)", path)) and method == "GET":
            if self._project_denied(user, m.group(1)):
                return
            with store.lock:
                rows = [s.row() for s in store.prearchive if s.project == m.group(1)]
            self._result_set(rows)
        elif m := re.fullmatch(r"/data/prearchive/projects/([^/]+)/([^/]+)/([^/]+)(/.*)?", path):
            if self._project_denied(user, m.group(1)):
                return
            session = store.find_session(m.group(1), m.group(2), m.group(3))
            if session is None:
                self._error(404, f"Unable to find prearchive session {path}")
                return
            self._prearc(method, session, m.group(4) or "", fmt)
        elif (m := re.fullmatch(r"/data(?:/archive)?/projects/([^/]+)", path)) and method == "GET":
            if self._project_denied(user, m.group(1)):
                return
            p = m.group(1)
            self._json(
                {
                    "items": [
                        {
                            "meta": {"xsi:type": "xnat:projectData"},
                            "data_fields": {"ID": p, "name": p, "secondary_ID": p},
                        }
                    ]
                }
            )
        elif m := re.fullmatch(r"/data(?:/archive)?/projects/([^/]+)/subjects", path):
            if self._project_denied(user, m.group(1)):
                return
            with store.lock:
                rows = [
                    {
                        "ID": s.id,
                        "label": s.label,
                        "project": s.project,
                        "insert_date": s.insert_date,
                        "URI": f"/data/subjects/{s.id}",
                    }
                    for s in store.subjects.values()
                    if s.project == m.group(1)
                ]
            self._result_set(rows)
        elif m := re.fullmatch(r"/data(?:/archive)?/projects/([^/]+)/experiments", path):
            if self._project_denied(user, m.group(1)):
                return
            with store.lock:
                rows = [e.row() for e in store.experiments.values() if e.project == m.group(1)]
            if not store.uid_column:
                rows = [{k: v for k, v in r.items() if k != "UID"} for r in rows]
            self._result_set(_columns(rows, query.get("columns"), keep_missing=False))
        elif m := re.fullmatch(r"/data(?:/archive)?/experiments/([^/]+)(/.*)?", path):
            exp = store.experiments.get(m.group(1))
            if exp is None or not store.can_access(user, exp.project):
                self._error(404, f"Unable to find experiment {m.group(1)}")
                return
            self._experiment(exp, m.group(2) or "", fmt, query)
        else:
            self._error(404, f"The requested resource {path} is not available in this stand-in")

    def _project_denied(self, user: str, project: str) -> bool:
        access = self.store.can_access(user, project)
        if access is None:
            self._error(404, f"Unable to find project {project}")
            return True
        if not access:
            self._error(403, f"User {user} does not have access to project {project}")
            return True
        return False

    def _import(self, query: dict[str, str], user: str) -> None:
        body = self._read_body()
        with self.store.lock:
            fault = self.store.import_faults.pop(0) if self.store.import_faults else None
        if fault is not None and not fault.after_storing:
            body.close()
            self._fault(fault, user, query)
            return
        try:
            sessions = self.store.import_zip(user, query, body)
        except ImportFailed as exc:
            with self.store.lock:
                self.store.imports.append(ImportRecord(user, query, 0, exc.status, exc.message))
            self._error(exc.status, exc.message)
            return
        finally:
            body.close()
        answer = "".join(f"/data{s.url}\r\n" for s in sessions)
        with self.store.lock:
            count = sum(s.file_count() for s in sessions)
            self.store.imports.append(
                ImportRecord(user, query, count, 200 if fault is None else -1, answer)
            )
        if fault is not None:
            self._fault(fault, user, query)
            return
        self._send(200, answer, TEXT)

    def _fault(self, fault: ImportFault, user: str, query: dict[str, str]) -> None:
        """Answer an import as ``fault`` says (status -1 in ``imports``: stored, answer lost)."""
        if not fault.after_storing:
            with self.store.lock:
                status = 0 if fault.reset else fault.status
                self.store.imports.append(ImportRecord(user, query, 0, status, "fault"))
        if fault.reset:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._error(fault.status, "The server is temporarily unable to service your request")

    def _archive(self, query: dict[str, str], user: str) -> None:
        m = re.fullmatch(
            r"(?:/data)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)", query.get("src", "")
        )
        session = self.store.find_session(*m.groups()) if m else None
        if session is None or not self.store.can_access(user, session.project):
            self._error(404, "No such prearchive session")
            return
        exp = self.store.archive_session(session)
        self._send(200, f"/data/experiments/{exp.id}\r\n", TEXT)

    def _prearc(self, method: str, session: PrearcSession, rest: str, fmt: str) -> None:
        base = f"/data{session.url}"
        if method == "DELETE" and not rest:
            self.store.delete_session(session.url)
            self._send(200, "")
            return
        if rest == "":
            if fmt == "zip":
                self._zip(session.scans.values(), session.name)
            else:
                self._result_set([session.row()])
            return
        if rest == "/scans":
            self._result_set(
                [
                    {
                        "ID": s.id,
                        "series_description": s.series_description,
                        "xsiType": "xnat:imageScanData",
                        "URI": f"{base}/scans/{s.id}",
                    }
                    for s in session.scans.values()
                ]
            )
            return
        m = re.fullmatch(r"/scans/([^/]+)(/resources(?:/([^/]+))?)?(/files(?:/(.+))?)?", rest)
        if not m:
            self._error(404, f"Unknown prearchive resource {rest}")
            return
        scans = list(session.scans.values())
        if m.group(1) != "ALL":
            scans = [s for s in scans if s.id == m.group(1)]
            if not scans:
                self._error(404, f"No scan {m.group(1)}")
                return
        self._scan_part(scans, m, f"{base}/scans", fmt, session.name)

    def _experiment(self, exp: Experiment, rest: str, fmt: str, query: dict[str, str]) -> None:
        base = f"/data/experiments/{exp.id}"
        if rest == "":
            self._json(
                {
                    "items": [
                        {
                            "meta": {"xsi:type": exp.xsi_type},
                            "data_fields": {
                                "ID": exp.id,
                                "label": exp.label,
                                "UID": exp.uid,
                                "project": exp.project,
                                "subject_ID": exp.subject.id,
                            },
                        }
                    ]
                }
            )
            return
        if rest == "/scans":
            self._result_set(
                [
                    {
                        "ID": s.id,
                        "type": s.series_description,
                        "series_description": s.series_description,
                        "xsiType": "xnat:imageScanData",
                        "UID": s.series_uid,
                        "URI": f"{base}/scans/{s.id}",
                    }
                    for s in exp.scans.values()
                ]
            )
            return
        m = re.fullmatch(r"/scans/([^/]+)(/resources(?:/([^/]+))?)?(/files(?:/(.+))?)?", rest)
        if not m:
            self._error(404, f"Unknown experiment resource {rest}")
            return
        scans = list(exp.scans.values())
        if m.group(1) != "ALL":
            scans = [s for s in scans if s.id in m.group(1).split(",")]
            if not scans:
                self._error(404, f"No scan {m.group(1)}")
                return
        self._scan_part(scans, m, f"{base}/scans", fmt, exp.label)

    def _scan_part(
        self, scans: list[Scan], m: re.Match[str], base: str, fmt: str, label: str
    ) -> None:
        resources, resource, files, filename = m.group(2), m.group(3), m.group(4), m.group(5)
        if resources is not None and resource is None and files is not None:
            self._error(404, "Unknown resource path")
            return
        if resource is not None and resource != "DICOM":
            self._error(404, f"No resource {resource}")
            return
        if resources is None and files is None:
            if fmt == "zip":
                self._zip(scans, label)
            else:
                self._result_set(
                    [{"ID": s.id, "series_description": s.series_description} for s in scans]
                )
            return
        if files is None and resource is None:
            self._result_set(
                [
                    {
                        "label": "DICOM",
                        "format": "DICOM",
                        "content": "RAW",
                        "file_count": str(len(s.files)),
                        "file_size": str(s.file_size),
                        "xnat_abstractresource_id": f"{s.id}-DICOM",
                    }
                    for s in scans
                ]
            )
            return
        if files is None or (filename is None and fmt == "zip"):
            self._zip(scans, label)
            return
        if filename is None:
            self._result_set(
                [
                    {
                        "Name": f.name,
                        "Size": str(len(f.data)),
                        "URI": f"{base}/{s.id}/resources/DICOM/files/{f.name}",
                        "collection": "DICOM",
                        "file_content": "RAW",
                        "file_format": "DICOM",
                    }
                    for s in scans
                    for f in s.files.values()
                ]
            )
            return
        for s in scans:
            for f in s.files.values():
                if f.name == filename:
                    self._send(200, f.data, "application/dicom")
                    return
        self._error(404, f"No file {filename}")

    def _zip(self, scans: Iterable[Scan], label: str) -> None:
        buf = io.BytesIO()
        _zip_scans(list(scans), label, buf)
        self._send(
            200,
            buf.getvalue(),
            "application/zip",
            {"Content-Disposition": f'attachment; filename="{label}.zip"'},
        )


def _columns(
    rows: list[dict[str, Any]], columns: str | None, *, keep_missing: bool = True
) -> list[dict[str, Any]]:
    if not columns:
        default = (
            "ID",
            "project",
            "date",
            "xsiType",
            "xnat:subjectassessordata/id",
            "label",
            "insert_date",
            "URI",
        )
        return [{k: r[k] for k in default} for r in rows]
    wanted = [c for c in columns.split(",") if c]
    return [{k: r.get(k, "") for k in [*wanted, "URI"] if keep_missing or k in r} for r in rows]


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: XnatStore

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close kept-alive client connections too: a stopped server answers nothing."""
        with self.connections_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


# --- the fixture object --------------------------------------------------------------------------


class XnatServer:
    """An XNAT stand-in on a free loopback port. ``start()``/``stop()`` keep port and data."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        projects: dict[str, set[str] | None] | Iterable[str] | None = None,
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key) PEM files to serve https instead of http."""
        self.tls = tls
        table: dict[str, set[str] | None]
        if projects is None:
            table = {"TESTPROJ": None}
        elif isinstance(projects, dict):
            table = projects
        else:
            table = {p: None for p in projects}
        self.store = XnatStore(users or {"tester": "s3cret-Pa55"}, table)
        self.port = port
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> XnatServer:
        if self._httpd is not None:
            return self
        httpd = _HttpServer(("127.0.0.1", self.port), _Handler)
        httpd.store = self.store
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            name="xnat-stand-in",
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take the server down: the port refuses connections until ``start()``."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.drop_connections()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> XnatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- hooks for tests ------------------------------------------------------------------
    @property
    def imports(self) -> list[ImportRecord]:
        with self.store.lock:
            return list(self.store.imports)

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.store.lock:
            return list(self.store.requests)

    def sessions(self, project: str | None = None) -> list[PrearcSession]:
        with self.store.lock:
            return [s for s in self.store.prearchive if project in (None, s.project)]

    def experiments(self, project: str | None = None) -> list[Experiment]:
        with self.store.lock:
            return [e for e in self.store.experiments.values() if project in (None, e.project)]

    def sop_uids(self, project: str | None = None) -> set[str]:
        """Every SOP Instance UID held in prearchive and archive (of ``project``)."""
        out: set[str] = set()
        with self.store.lock:
            holders: list[Iterable[Scan]] = [s.scans.values() for s in self.sessions(project)]
            holders += [e.scans.values() for e in self.experiments(project)]
            for scans in holders:
                for scan in scans:
                    out.update(scan.files)
        return out

    def find(
        self, project: str, *, label: str | None = None, tag: str | None = None
    ) -> PrearcSession:
        with self.store.lock:
            for s in self.store.prearchive:
                if s.project == project and label in (None, s.name) and tag in (None, s.tag):
                    return s
        raise KeyError(f"no prearchive session {project}/{label or tag}")

    def set_status(
        self, project: str, status: str, *, label: str | None = None, tag: str | None = None
    ) -> None:
        """Put a prearchive session in ``status`` (e.g. RECEIVING, READY, ERROR)."""
        with self.store.lock:
            self.find(project, label=label, tag=tag).status = status

    def reject(self, label: str, message: str = "Simulated rejection", keep: int = 1) -> None:
        """Imports for session ``label`` store ``keep`` members, then answer 400 ``message``."""
        with self.store.lock:
            self.store.rejections[label] = (message, keep)

    def fail_imports(
        self, count: int = 1, *, status: int = 503, reset: bool = False, after_storing: bool = False
    ) -> None:
        """The next ``count`` imports answer ``status`` (or lose the connection with ``reset``);
        with ``after_storing`` the files are stored first and only the answer is lost."""
        with self.store.lock:
            self.store.import_faults.extend(
                ImportFault(status, reset, after_storing) for _ in range(count)
            )

    def omit_uid_column(self, omit: bool = True) -> None:
        """Experiment listings come without the ``UID`` column (as some XNATs answer)."""
        with self.store.lock:
            self.store.uid_column = not omit

    def clear_rejections(self) -> None:
        with self.store.lock:
            self.store.rejections.clear()

    def inject(
        self,
        project: str,
        files: Iterable[Path | bytes],
        *,
        subject: str,
        label: str,
        status: str = "READY",
    ) -> PrearcSession:
        """Put files into the prearchive as an import would (for an "upload in progress")."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i, f in enumerate(files):
                zf.writestr(f"f{i}.dcm", f if isinstance(f, bytes) else Path(f).read_bytes())
        buf.seek(0)
        user = next(iter(self.store.users))
        with self.store.lock:
            sessions = self.store.import_zip(
                user, {"project": project, "subject": subject, "session": label}, buf
            )
            for s in sessions:
                s.status = status
        return sessions[0]

    def archive(
        self, project: str, *, label: str | None = None, tag: str | None = None
    ) -> Experiment:
        """Move a prearchive session into the archive (as ``POST /data/services/archive``)."""
        return self.store.archive_session(self.find(project, label=label, tag=tag))

    def forget_logins(self) -> None:
        """Drop every server-side session, as a restart of XNAT's Tomcat does."""
        with self.store.lock:
            self.store.logins.clear()


def iter_zip_dicom(path: Path) -> Iterator[pydicom.Dataset]:
    """Every DICOM member of a zip (tests use it to inspect downloads)."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            try:
                yield pydicom.dcmread(io.BytesIO(zf.read(info)), stop_before_pixels=True)
            except InvalidDicomError:
                continue
