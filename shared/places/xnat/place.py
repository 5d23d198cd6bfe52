"""``XnatPreArchive``: the ``xnat_pre_archive`` place, its options and its source side.

Config section (the same in ``dicomsync.json`` and in the plugin's ``DicomSync.Places``)::

    {"Kind": "xnat_pre_archive", "Server": "https://xnat.example.org", "Project": "MYPROJ",
     "User": "alice", "PasswordEnv": "XNAT_PASS", "VerifyTls": true, "CaBundle": "/etc/ca.pem",
     "Timeout": 300}

``PasswordEnv`` (default ``XNAT_PASS``) names the environment variable that holds the
password. The password is read when the place first connects, and is never stored,
logged or put into an error message. ``CaBundle`` and ``Timeout`` are optional.

Keys are ``<subject>/<session label>``.

As a source
    ``studies`` lists prearchive sessions (not those still RECEIVING, whose content is
    incomplete) and archived experiments. ``identity`` downloads the session's DICOM as
    one zip into a temporary folder and reads the headers; that download is cached for
    the life of the place and ``instances`` reads from it.

The connection, login and error mapping are in ``dicomsync.places.xnat.connection``;
listings and the destination side in ``dicomsync.places.xnat.destination``.

Thread-safety: the download cache is a plain dict, written without a lock: two threads
reading the same new session at once may both download it (the last one is kept; both
files are in the place's temporary folder, which ``close()`` removes). Raises only
``dicomsync.errors``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomFileError, NotFound, RemoteRejected
from dicomsync.identity import StudyIdentity, identity_of, read_header
from dicomsync.options import option, parse
from dicomsync.places.base import Instance, Place, StudyRef
from dicomsync.places.local import storage_errors
from dicomsync.places.xnat.connection import DEFAULT_PASSWORD_ENV, DEFAULT_TIMEOUT
from dicomsync.places.xnat.destination import XnatDestination, _Session
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)


@dataclass
class _Download:
    identity: StudyIdentity
    path: Path
    members: dict[str, str]  # SOP UID -> zip member


@dataclass(frozen=True)
class XnatOptions:
    """The options of an ``xnat_pre_archive`` place section."""

    server: str = option("Server", "url", "the XNAT base URL", required=True)
    project: str = option("Project", "str", "the project whose pre-archive receives", required=True)
    user: str = option("User", "str", "the XNAT user", required=True)
    password_env: str = option(
        "PasswordEnv",
        "envvar",
        "name of the environment variable holding the password",
        default=DEFAULT_PASSWORD_ENV,
    )
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option(
        "CaBundle", "path", "CA bundle file to verify with", shown="system"
    )
    timeout: float = option(
        "Timeout", "seconds", "seconds per request", default=DEFAULT_TIMEOUT, above=0
    )


class XnatPreArchive(XnatDestination):
    kind = "xnat_pre_archive"
    label = "XNAT pre-archive"
    Options = XnatOptions

    def __init__(self, key: str, server: str, project: str, user: str, **options: Any) -> None:
        super().__init__(key, server, project, user, **options)
        self._downloads: dict[str, _Download] = {}

    # --- configuration ----------------------------------------------------------------
    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        opts = parse(XnatOptions, section, f"{cls.kind} place {key!r}")
        ca_bundle = None
        if opts.ca_bundle:
            ca_path = Path(opts.ca_bundle).expanduser()
            ca_bundle = str(ca_path if ca_path.is_absolute() else base_dir / ca_path)
        return cls(
            key,
            opts.server,
            opts.project,
            opts.user,
            password_env=opts.password_env,
            verify_tls=opts.verify_tls,
            ca_bundle=ca_bundle,
            timeout=opts.timeout,
        )

    def to_config(self) -> dict[str, Any]:
        section: dict[str, Any] = {
            "Kind": self.kind,
            "Server": self.server,
            "Project": self.project,
            "User": self.user,
            "PasswordEnv": self.password_env,
        }
        if not self.verify_tls:
            section["VerifyTls"] = False
        if self.ca_bundle:
            section["CaBundle"] = self.ca_bundle
        if self.timeout != DEFAULT_TIMEOUT:
            section["Timeout"] = self.timeout
        return section

    def describe(self) -> str:
        return f"XNAT pre-archive project '{self.project}' at {self.server} (user {self.user})"

    def close(self) -> None:
        with self._lock:
            super().close()
            self._downloads.clear()

    # --- source --------------------------------------------------------------------------------
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        query = query or StudyQuery(self.key)
        seen: set[str] = set()
        sessions = self._list_sessions()
        # archived experiments first: they are final; prearchive copies come second
        for s in sorted(sessions, key=lambda s: (not s.archived, s.uri)):
            if s.status == "RECEIVING":
                log.info("skipping XNAT session %s: still RECEIVING", s.uri)
                continue
            patient, study = s.subject or "unknown", s.label or "unknown"
            if f"{patient}/{study}" in seen:
                # disambiguate by the experiment ID or the prearchive timestamp
                study = (
                    f"{study}@{s.uri.rsplit('/', 1)[-1] if s.archived else s.uri.split('/')[-2]}"
                )
            seen.add(f"{patient}/{study}")
            if query.matches(patient, study):
                yield StudyRef(self.key, patient, study, handle=s.uri)

    def _resolve(self, ref: StudyRef) -> _Session:
        if self._listing is None:
            self._list_sessions()
        for s in self._listing or []:
            if s.uri == ref.handle:
                return s
        for candidate in self.studies(StudyQuery(self.key, ref.patient, ref.study)):
            for s in self._listing or []:
                if s.uri == candidate.handle:
                    return s
        raise NotFound(f"{ref}: no such XNAT session in project {self.project!r}")

    def _download(self, ref: StudyRef) -> _Download:
        session = self._resolve(ref)
        cached = self._downloads.get(session.uri)
        if cached is not None:
            return cached
        with storage_errors("a temporary download zip"):
            fd, name = tempfile.mkstemp(prefix="session-", suffix=".zip", dir=self._tmpdir())
        path = Path(name)

        def fetch(s: Any) -> None:
            with os.fdopen(os.dup(fd), "wb") as fh:
                fh.truncate(0)
                s.download_stream(session.zip_uri, fh, format="zip")

        try:
            self._call("download", fetch)
        finally:
            os.close(fd)
        headers = []
        members: dict[str, str] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    try:
                        with zf.open(info) as f:
                            h = read_header(f)
                    except DicomFileError as exc:
                        log.debug("skipping %s in %s: %s", info.filename, session.uri, exc)
                        continue
                    headers.append(h)
                    members.setdefault(h.sop_uid, info.filename)
        except zipfile.BadZipFile as exc:
            raise RemoteRejected(f"{ref}: XNAT sent an unreadable zip ({exc})") from None
        download = _Download(identity_of(headers), path, members)
        self._downloads[session.uri] = download
        return download

    def identity(self, ref: StudyRef) -> StudyIdentity:
        return self._download(ref).identity

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        download = self._download(ref)
        for sop, member in sorted(download.members.items(), key=lambda kv: kv[1]):
            if only is not None and sop not in only:
                continue

            def load(path: Path = download.path, name: str = member) -> bytes:
                with zipfile.ZipFile(path) as zf:
                    return zf.read(name)

            yield Instance(sop, os.path.basename(member), load)
