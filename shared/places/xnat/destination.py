"""The destination side of an ``xnat_pre_archive`` place: listings, ``prepare``, ``holds``
and ``receive``.

``XnatDestination`` extends ``XnatConnection`` (every request through ``_call``, so every
failure is mapped by ``dicomsync.http_errors``) and is the base of ``XnatPreArchive``.

As a destination
    ``prepare`` lists the project's prearchive once (RECEIVING sessions included) and its
    archived experiments once, with their StudyInstanceUIDs. A study counts as present
    when a session (prearchived or archived) with the same StudyInstanceUID exists in the
    project: ``holds`` then answers every SOP UID of the study. XNAT's listings carry no
    SOP UIDs, and downloading a session to compare instance by instance would cost as
    much as sending it, so the session's existence is the duplicate rule. A session still
    RECEIVING therefore also counts: an upload in progress is not duplicated.

    ``receive`` writes the instances one by one into a temporary zip file (never the whole
    study in memory) and uploads it with the request xnatpy's ``services.import_`` makes
    (``POST /data/services/import?dest=/prearchive&import-handler=DICOM-zip``, with
    ``Timeout``), the subject and session labels mapped from the key by ``xnat_label``.
    Then it checks that the session exists and that its scans hold at least the number
    of files sent. XNAT groups what it receives into sessions by
    (project, StudyInstanceUID, label), so a re-send merges into the same session.

    XNAT's importer parses each file only up to a stop tag and copies the rest (Pixel Data
    included) unparsed; it answers ``400`` for a member that is not DICOM or has no SOP
    Class or SOP Instance UID, after storing the members before it. Because a session's
    existence counts as "present", ``receive`` deletes a session that this very upload
    created before it raises ``RemoteRejected`` with XNAT's message. The error is not
    retryable: XNAT refuses the content, and sending it again gives the same answer. A
    retried receive (after a 503 or a lost answer) merges into the same session.

    When the experiment listing has no ``UID`` column (XNAT did not give it), archived
    sessions are matched by (subject, session label) instead, with one warning.

Label mapping (``xnat_label``): XNAT labels may hold only letters, digits, ``_`` and
``-``. Accents are removed (``é`` -> ``e``), every other character becomes ``_``, an
empty value becomes ``unknown``, and labels longer than 64 characters are cut and get an
8-character hash suffix.

Thread-safety: the listing (``_listing``, ``_present``, ``_untagged``) is replaced or
extended under the place's ``RLock``; worker lanes may share one place. Raises only
``dicomsync.errors``: the mapped request errors, ``StorageError`` for the temporary zip,
``RemoteRejected`` for content XNAT refuses and ``TransferError`` when the session does
not hold what was sent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomSyncError, NotFound, RemoteRejected, TransferError, Unreachable
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Instance, Receipt, split_key
from dicomsync.places.local import storage_errors
from dicomsync.places.xnat.connection import XnatConnection

log = logging.getLogger(__name__)

LISTING_MAX_AGE = 300.0  # seconds a project listing answers duplicate checks
UNREACHABLE_SECONDS = 60.0  # after prepare() found XNAT unreachable, at most this long
MAX_LABEL = 64

_LABEL_BAD = re.compile(r"[^A-Za-z0-9_-]")


def xnat_label(value: str) -> str:
    """Map a key part to an XNAT label (letters, digits, ``_`` and ``-`` only)."""
    text = unicodedata.normalize("NFKD", str(value).strip())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _LABEL_BAD.sub("_", text)
    if not text:
        return "unknown"
    if len(text) > MAX_LABEL:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        text = text[: MAX_LABEL - 9] + "_" + digest
    return text


@dataclass(frozen=True)
class _Session:
    """A prearchive session or an archived experiment, as listed."""

    subject: str
    label: str
    tag: str  # StudyInstanceUID ("" when XNAT does not know it)
    status: str  # prearchive status; "ARCHIVED" for experiments
    uri: str  # /data/prearchive/projects/P/ts/name or /data/experiments/ID

    @property
    def archived(self) -> bool:
        return self.status == "ARCHIVED"

    @property
    def zip_uri(self) -> str:
        return f"{self.uri}/scans/ALL/files" if self.archived else self.uri


class XnatDestination(XnatConnection):
    """Listings and the destination side of the place (see the module docstring)."""

    def __init__(self, key: str, server: str, project: str, user: str, **options: Any) -> None:
        super().__init__(key, server, project, user, **options)
        self._present: set[str] | None = None  # StudyInstanceUIDs in the project
        self._listed_at = 0.0  # monotonic time of the listing behind _present
        self._listing: list[_Session] | None = None
        self._untagged: set[tuple[str, str]] = set()  # (subject, label) of sessions without UID
        self._warned_no_uid = False
        self._tmp: Path | None = None

    def close(self) -> None:
        with self._lock:
            super().close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def _tmpdir(self) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="dicomsync-xnat-"))
            return self._tmp

    # --- listings ---------------------------------------------------------------------------
    def _list_sessions(self) -> list[_Session]:
        """One prearchive listing (RECEIVING included) and one archive listing."""

        def run(s: Any) -> list[_Session]:
            pre = s.get_json(f"/data/prearchive/projects/{self.project}")
            exp = s.get_json(
                f"/data/projects/{self.project}/experiments",
                query={"columns": "ID,label,subject_label,UID,xsiType"},
            )
            out: list[_Session] = []
            for row in pre["ResultSet"]["Result"]:
                url = str(row.get("url", ""))
                out.append(
                    _Session(
                        subject=str(row.get("subject", "") or ""),
                        label=str(row.get("name", "") or row.get("folderName", "") or ""),
                        tag=str(row.get("tag", "") or ""),
                        status=str(row.get("status", "") or ""),
                        uri=url if url.startswith("/data/") else f"/data{url}",
                    )
                )
            rows = exp["ResultSet"]["Result"]
            if rows and not all("UID" in row for row in rows) and not self._warned_no_uid:
                self._warned_no_uid = True
                log.warning(
                    "%s: the experiment listing of project %r has no UID column; archived "
                    "sessions are matched by subject and session label instead of "
                    "StudyInstanceUID",
                    self._where,
                    self.project,
                )
            for row in rows:
                out.append(
                    _Session(
                        subject=str(row.get("subject_label", "") or ""),
                        label=str(row.get("label", "") or ""),
                        tag=str(row.get("UID", "") or ""),
                        status="ARCHIVED",
                        uri=f"/data/experiments/{row['ID']}",
                    )
                )
            return out

        with self._lock:
            self._listing = self._present = None  # a failed listing leaves no stale answer
        sessions = self._call("listing", run)
        with self._lock:  # worker lanes may share one place between threads
            self._set_listing(sessions)
            self._listed_at = time.monotonic()
        return sessions

    def _set_listing(self, sessions: list[_Session]) -> None:
        """The sessions, and what counts as present: their StudyInstanceUIDs, and the
        (subject, label) of sessions listed without one (XNAT did not say it)."""
        self._listing = sessions
        self._present = {s.tag for s in sessions if s.tag}
        self._untagged = {(s.subject, s.label) for s in sessions if not s.tag}

    # --- destination -------------------------------------------------------------------------
    def prepare(self, identities: Iterable[tuple[str, StudyIdentity]]) -> None:
        """List the project once for the batch; an unreachable XNAT is remembered.

        Every prepare() tries again (a retry of the batch, the next plugin job). When it
        finds XNAT unreachable, the batch's ``holds``/``receive`` calls answer with the
        same error at once, instead of each logging in and waiting ``Timeout`` again.
        """
        with self._lock:
            self._down = None
        try:
            self._list_sessions()
        except Unreachable as exc:
            with self._lock:
                self._down = (time.monotonic() + UNREACHABLE_SECONDS, exc)
            raise

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        present = self._present
        # A long-lived place (a plugin worker's) lists again when its listing is old, so a
        # session deleted in XNAT is sent again; within a batch, prepare() lists once.
        if present is None or time.monotonic() - self._listed_at > LISTING_MAX_AGE:
            self._list_sessions()
            present = self._present or set()
        if identity.study_uid and identity.study_uid in present:
            return identity.sop_uids
        patient, study = split_key(key)
        if (xnat_label(patient), xnat_label(study)) in self._untagged:
            return identity.sop_uids
        return frozenset()

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        patient, study = split_key(key)
        subject, label = xnat_label(patient), xnat_label(study)
        if self._listing is None:
            self._list_sessions()
        before = {s.uri for s in (self._listing or [])}
        with storage_errors("a temporary upload zip"):
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=self._tmpdir())
            os.close(fd)
        zip_path = Path(name)
        try:
            with storage_errors(str(zip_path)):
                count = self._write_zip(zip_path, instances)
            if count == 0:
                raise RemoteRejected(f"{key}: nothing to send")
            log.info(
                "uploading %s (%d instances) to %s project %s as %s/%s",
                key,
                count,
                self.server,
                self.project,
                subject,
                label,
            )

            def upload(s: Any) -> Any:
                # what xnatpy's services.import_ sends, as one POST whose failure keeps
                # its status (import_ turns it into text), with Timeout applied
                with open(zip_path, "rb") as fh:
                    return s.post(
                        "/data/services/import",
                        data=fh,
                        query={
                            "dest": "/prearchive",
                            "project": self.project,
                            "subject": subject,
                            "session": label,
                            "import-handler": "DICOM-zip",
                        },
                        headers={"Content-Type": "application/zip"},
                        timeout=self.timeout,
                    )

            try:
                response = self._call("upload", upload)
            except RemoteRejected:
                self._remove_new_sessions(subject, label, before)
                raise
            uri = (str(response.text or "").split() or [""])[0]
            self._verify(key, uri, count, label, before, identity)
        finally:
            zip_path.unlink(missing_ok=True)
        with self._lock:
            if self._present is not None and identity.study_uid:
                self._present.add(identity.study_uid)
            elif not identity.study_uid:
                self._untagged.add((subject, label))
            if self._listing is not None and uri not in before:
                # known from now on, so that a later failure in this batch never removes it
                self._listing.append(_Session(subject, label, identity.study_uid, "READY", uri))
        return Receipt(count, f"{self.server}{uri}")

    def _write_zip(self, path: Path, instances: Iterable[Instance]) -> int:
        count = 0
        seen: set[str] = set()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for inst in instances:
                if inst.sop_uid in seen:
                    continue
                seen.add(inst.sop_uid)
                count += 1
                base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(inst.name))[-80:]
                zf.writestr(f"{count:06d}_{base or 'instance'}", inst.read())
        return count

    def _verify(
        self, key: str, uri: str, count: int, label: str, before: set[str], identity: StudyIdentity
    ) -> None:
        """The session exists and its scans hold at least the files sent."""
        if not uri.startswith("/data/prearchive/"):
            raise TransferError(f"{key}: XNAT answered the upload with {uri!r}, not a session")

        def files(s: Any) -> dict[str, int]:
            counts: dict[str, int] = {}
            scans = s.get_json(f"{uri}/scans")["ResultSet"]["Result"]
            for scan in scans:
                sid = str(scan["ID"])
                res = s.get_json(f"{uri}/scans/{sid}/resources")["ResultSet"]["Result"]
                counts[sid] = sum(
                    int(r.get("file_count", 0) or 0)
                    for r in res
                    if r.get("label") in ("DICOM", "secondary")
                )
            return counts

        try:
            counts = self._call("verification", files)
        except NotFound:
            raise TransferError(f"{key}: XNAT session {uri} is missing after the upload") from None
        total = sum(counts.values())
        if total < count:
            detail = ", ".join(f"scan {k}: {v}" for k, v in sorted(counts.items()))
            if uri not in before:
                self._remove(uri)
            raise TransferError(
                f"{key}: XNAT session {uri} holds {total} files after sending {count} ({detail})"
            )
        log.info("%s: XNAT session %s holds %d files in %d scans", key, uri, total, len(counts))

    def _remove_new_sessions(self, subject: str, label: str, before: set[str]) -> None:
        """After a rejected upload, delete the partial sessions this upload created."""
        try:
            sessions = self._list_sessions()
        except DicomSyncError as exc:
            log.warning("cannot list XNAT sessions to remove a partial upload: %s", exc)
            return
        removed = {
            s.uri
            for s in sessions
            if not s.archived and s.uri not in before and (s.subject, s.label) == (subject, label)
        }
        for uri in sorted(removed):
            self._remove(uri)
        with self._lock:
            self._set_listing([s for s in sessions if s.uri not in removed])

    def _remove(self, uri: str) -> None:
        src = uri.removeprefix("/data")
        try:
            self._call(
                "cleanup", lambda s: s.post("/data/services/prearchive/delete", query={"src": src})
            )
            log.warning("removed partial XNAT session %s", uri)
        except DicomSyncError as exc:
            log.warning("could not remove partial XNAT session %s: %s", uri, exc)
