"""STOW-RS for a ``dicomweb`` place: batches, the request body, the answer (PS3.18 10.5).

``store(connection, study_uid, instances, per_request, in_flight)`` sends a study's
instances to ``{Url}/studies/{StudyInstanceUID}`` as ``multipart/related;
type="application/dicom"`` bodies of at most ``per_request`` instances and
``MAX_REQUEST_BYTES`` (a batch's body is posted early when its next instance would take
it past that; a larger instance goes alone), ``in_flight`` requests at a time. At most
``in_flight`` bodies are in memory (each thread reads its batch's instances itself). Each body is one ``bytes`` object with
a ``Content-Length``, never chunked (``Transfer-Encoding: chunked``, which
dicomweb-client's own ``store_instances`` switches to above its chunk size, breaks
against Orthanc's DICOMweb plugin), so the STOW request is made here on the place's
session rather than through ``DICOMwebClient.store_instances`` (which would also decode
and re-encode every file with pydicom).

The answer (``application/dicom+json``) is read whatever its status (``read_answer``):

- ``ReferencedSOPSequence`` (0008,1199): stored, with or without a ``WarningReason``
  (0008,1196; a 0xB000-range coercion counts as stored);
- ``FailedSOPSequence`` (0008,1198): each ``ReferencedSOPInstanceUID`` with its
  ``FailureReason`` (0008,1197). 0x0111 (duplicate SOP instance) means the server holds
  it: counted as stored, and ``send``'s verify step checks. 0xA7xx (out of resources)
  is retryable; every other reason is final.

Statuses (PS3.18 Table 10.5.3-1): 200 all stored; 202 some stored or stored with
warnings; 409 none stored (a conflict, e.g. an instance of another study: Orthanc's
DICOMweb plugin answers that with reason 0x0110). With failed instances the batch fails
with one line that names them and their reasons (``RemoteRejected``, or ``Unreachable``
when every reason is retryable); without a failed-SOP sequence an error status goes
through ``dicomsync.http_errors.status_error``. Either way the error's ``delivered`` is
the number of instances the server said it stored before (the queue's ``Delivered``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from dicomsync.errors import DicomSyncError, RemoteRejected, Unreachable
from dicomsync.http_errors import status_error
from dicomsync.places.base import Instance
from dicomsync.places.dicomweb.connection import Connection, answer_detail
from dicomsync.places.parallel import run_bounded

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024

REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0112: "no such object instance",
    0x0117: "invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0211: "unrecognised operation",
    0x0213: "resource limitation",
}
DUPLICATE = 0x0111


def reason_text(code: int | None) -> str:
    if code is None:
        return "no reason given"
    if 0xA700 <= code <= 0xA7FF:
        name = "out of resources"
    elif 0xA900 <= code <= 0xA9FF:
        name = "data set does not match SOP class"
    elif 0xC000 <= code <= 0xCFFF:
        name = "cannot understand"
    else:
        name = REASONS.get(code, "failed")
    return f"0x{code:04X} {name}"


def retryable_reason(code: int | None) -> bool:
    return code is not None and (0xA700 <= code <= 0xA7FF or code == 0x0213)


@dataclass
class Answer:
    """What a STOW-RS answer says: stored SOP UIDs, failed SOP UID -> reason code."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, int | None] = field(default_factory=dict)
    warnings: int = 0


def _values(item: Any, tag: str) -> list[Any]:
    element = item.get(tag) if isinstance(item, dict) else None
    value = element.get("Value") if isinstance(element, dict) else None
    return value if isinstance(value, list) else []


def read_answer(response: requests.Response) -> Answer:
    """The STOW-RS answer body (DICOM JSON); empty for a body that is not one."""
    answer = Answer()
    if not response.content or "json" not in response.headers.get("Content-Type", "json"):
        return answer
    try:
        body = response.json()
    except ValueError:
        return answer
    if isinstance(body, list) and len(body) == 1:  # some servers wrap the data set
        body = body[0]
    if not isinstance(body, dict):
        return answer
    for item in _values(body, "00081199"):
        for uid in _values(item, "00081155"):
            answer.stored.add(str(uid))
        if _values(item, "00081196"):
            answer.warnings += 1
    for item in _values(body, "00081198"):
        reasons = _values(item, "00081197")
        code = reasons[0] if reasons and isinstance(reasons[0], int) else None
        for uid in _values(item, "00081155") or ["(no SOP instance UID)"]:
            if code == DUPLICATE:
                answer.stored.add(str(uid))
            else:
                answer.failed[str(uid)] = code
    return answer


def body_of(parts: list[bytes]) -> tuple[bytes, str]:
    """One multipart/related body of ``parts`` and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks: list[bytes] = []
    for part in parts:
        chunks += (head, part, b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def failure(what: str, answer: Answer, sent: int) -> DicomSyncError:
    """The one line for a batch with failed instances (the first three named)."""
    shown = [f"{uid} ({reason_text(code)})" for uid, code in sorted(answer.failed.items())]
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    message = (
        f"{what}: refused {len(answer.failed)} of {sent} instances: {', '.join(shown[:3])}{more}"
    )
    if all(retryable_reason(code) for code in answer.failed.values()):
        return Unreachable(message)
    return RemoteRejected(message)


class Stow:
    """The STOW-RS sender of one place: a pool of ``in_flight`` threads, reused."""

    def __init__(self, connection: Connection, per_request: int, in_flight: int) -> None:
        self.connection = connection
        self.per_request = per_request
        self.in_flight = in_flight
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="stow")
            return self._pool

    def post(self, study_uid: str, parts: list[bytes]) -> int:
        """One STOW-RS request; the number of instances stored, or the batch's error."""
        what = f"STOW-RS of {len(parts)} instance(s) to {self.connection.url}/studies/{study_uid}"
        body, content_type = body_of(parts)
        session = self.connection.session()
        url = f"{self.connection.url}/studies/{study_uid}"
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}

        def send() -> requests.Response:
            return session.post(url, data=body, headers=headers, timeout=self.connection.timeout)

        response = self.connection.call(what, send)
        answer = read_answer(response)
        stored = len(answer.stored)
        error: DicomSyncError | None
        if answer.failed:
            error = failure(what, answer, len(parts))
        elif response.status_code >= 400:
            error = status_error(response.status_code, what, answer_detail(response))
        else:
            if answer.warnings:
                log.info("%s: stored, %d with warnings", what, answer.warnings)
            # a server that answers 200 without a body stored everything it was sent
            return stored if answer.stored else len(parts)
        assert error is not None
        error.delivered = stored  # type: ignore[attr-defined]
        raise error

    def store(self, study_uid: str, instances: Iterable[Instance]) -> int:
        """Send every instance (see the module docstring); the number stored."""
        stored = [0]
        lock = threading.Lock()

        def run(batch: list[Instance]) -> int:
            count = 0
            try:
                parts: list[bytes] = []
                size = 0
                for inst in batch:  # a body is posted early once it reaches the byte bound
                    data = inst.read()
                    if parts and size + len(data) > MAX_REQUEST_BYTES:
                        count += self.post(study_uid, parts)
                        parts, size = [], 0
                    parts.append(data)
                    size += len(data)
                count += self.post(study_uid, parts)
            except DicomSyncError as exc:
                with lock:
                    stored[0] += count + getattr(exc, "delivered", 0)
                raise
            with lock:
                stored[0] += count
            return count

        try:
            run_bounded(self._executor(), run, self._sized(instances), self.in_flight)
        except DicomSyncError as exc:
            exc.delivered = stored[0]  # type: ignore[attr-defined]
            raise
        return stored[0]

    def _sized(self, instances: Iterable[Instance]) -> Iterator[list[Instance]]:
        batch: list[Instance] = []
        for inst in instances:
            batch.append(inst)
            if len(batch) >= self.per_request:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
