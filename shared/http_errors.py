"""HTTP statuses and transport failures, mapped to the error tree in one place.

Every HTTP client of ours (the Orthanc client, the XNAT place, the HEC sink) turns a
failed request into a ``dicomsync.errors`` type here, so one rule holds everywhere:

=====================================  ===================  ====================
what happened                          a place raises       a sink raises
=====================================  ===================  ====================
TLS/certificate failure                ``Unreachable``,     ``SinkFatal``
                                       not retryable
timeout, refused, reset, DNS failure   ``Unreachable``      ``SinkRetryable``
                                       (retryable)
401, 403                               ``AuthenticationFailed``  ``SinkFatal``
404                                    ``NotFound``         ``SinkFatal``
408, 429, 5xx                          ``Unreachable``      ``SinkRetryable``
                                       (retryable)
any other 4xx                          ``RemoteRejected``   ``SinkFatal``
=====================================  ===================  ====================

A certificate failure is never transient: a wrong CA bundle or a self-signed server
does not fix itself, so retrying only hides the cause. Timeouts and dropped
connections are transient. ``what`` names the request without credentials (URLs
with ``user:pass@`` are refused at config time, see ``dicomsync.urls``).

Orthanc's error codes (``orthanc.OrthancException`` inside the plugin, whose ``args[0]``
is the code) go through the same rule: ``orthanc_error`` takes the HTTP status Orthanc
itself answers for that code over REST (``ORTHANC_STATUSES``, from Orthanc's
``ErrorCodes.json``; an unlisted code is 500) and hands it to ``status_error``. Four
codes that Orthanc answers with 500 say that the request or the stored file is wrong
(``ORTHANC_FINAL``: retrying gives the same answer), so they count as 400, over HTTP too:
``orthanc_answer_status`` reads the ``OrthancStatus`` of a 500 answer's body.

Every function here is pure (no I/O, no shared state): thread-safe, and none raises; each
returns the error for the caller to raise.
"""

from __future__ import annotations

import re
import ssl

import requests

from dicomsync.errors import (
    AuthenticationFailed,
    DicomSyncError,
    NotFound,
    RemoteRejected,
    SinkFatal,
    SinkRetryable,
    Unreachable,
)

RETRYABLE_STATUSES = frozenset({408, 429})

#: The HTTP status Orthanc answers for its error codes (OrthancFramework/Resources/
#: CodeGeneration/ErrorCodes.json); every other code (-1 internal, 4 memory, 9 network,
#: 11 database, 14 cannot write, 16 timeout, 19 full storage, ...) answers 500.
ORTHANC_STATUSES = {
    3: 400,  # PARAMETER_OUT_OF_RANGE
    5: 400,  # BAD_PARAMETER_TYPE
    7: 404,  # INEXISTENT_ITEM
    8: 400,  # BAD_REQUEST
    12: 400,  # URI_SYNTAX
    13: 404,  # INEXISTENT_FILE
    15: 400,  # BAD_FILE_FORMAT
    17: 404,  # UNKNOWN_RESOURCE
    21: 404,  # INEXISTENT_TAG
    28: 400,  # BAD_JSON
    29: 401,  # UNAUTHORIZED
    34: 406,  # NOT_ACCEPTABLE
    36: 503,  # DATABASE_UNAVAILABLE
    41: 416,  # BAD_RANGE
    42: 503,  # DATABASE_CANNOT_SERIALIZE
    43: 409,  # REVISION
    45: 403,  # FORBIDDEN_ACCESS
    46: 409,  # DUPLICATE_RESOURCE
}

#: Codes Orthanc answers with 500 that are final all the same: the request or the file is
#: wrong, and sending it again gives the same answer.
ORTHANC_FINAL = {
    6: 400,  # BAD_SEQUENCE_OF_CALLS
    20: 400,  # CORRUPTED_FILE
    27: 400,  # UNKNOWN_DICOM_TAG (a /tools/find query naming no tag)
    33: 400,  # EMPTY_REQUEST
}


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def short_reason(exc: BaseException) -> str:
    """The most specific, human part of a requests/urllib3 error, on one line."""
    text = str(exc)
    found = _ERRNO.findall(text)
    if found:
        return str(found[-1]).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    text = " ".join(text.split())
    return text[:200] or type(exc).__name__


def tls_error_in(exc: BaseException) -> BaseException | None:
    """The TLS error inside ``exc``: itself, or one found through the causes, contexts,
    urllib3's ``reason`` and the ``args`` that requests and urllib3 wrap it in; an
    ``ssl.SSLError`` (whose text says what failed) before a requests ``SSLError``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    wrapper: BaseException | None = None
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        if wrapper is None and isinstance(cur, requests.exceptions.SSLError):
            wrapper = cur
        inner = (getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args)
        todo.extend(x for x in inner if isinstance(x, BaseException))
    return wrapper


def is_tls_failure(exc: BaseException) -> bool:
    """True for certificate and TLS handshake failures, at any depth (``tls_error_in``);
    the text test is the last resort for a wrapper that kept only the message."""
    if tls_error_in(exc) is not None:
        return True
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in text


def transport_error(exc: BaseException, what: str, *, sink: bool = False) -> DicomSyncError:
    """The error for a request that got no HTTP answer (``exc`` from requests or urllib3)."""
    if is_tls_failure(exc):
        message = f"{what}: TLS verification failed ({short_reason(exc)})"
        return SinkFatal(message) if sink else Unreachable(message, retryable=False)
    timed_out = isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc)
    reason = "timed out" if timed_out else short_reason(exc)
    message = f"{what}: no answer ({reason})"
    return SinkRetryable(message) if sink else Unreachable(message)


def status_error(
    status: int, what: str, detail: str = "", *, sink: bool = False
) -> DicomSyncError | None:
    """The error for an HTTP status, or None for 1xx-3xx. ``detail`` is already short."""
    if status < 400:
        return None
    reason = f" ({status}: {detail})" if detail else f" ({status})"
    if status in (401, 403):
        message = f"{what}: not authorised{reason}; check the credentials"
        return SinkFatal(message) if sink else AuthenticationFailed(message)
    if status == 404:
        message = f"{what}: not found{reason}"
        return SinkFatal(message) if sink else NotFound(message)
    if status >= 500 or status in RETRYABLE_STATUSES:
        message = f"{what}: server busy or failing{reason}"
        return SinkRetryable(message) if sink else Unreachable(message)
    message = f"{what}: rejected{reason}"
    return SinkFatal(message) if sink else RemoteRejected(message)


def orthanc_status(code: int) -> int:
    """The HTTP status our rule reads for Orthanc error ``code`` (see the module docstring)."""
    return ORTHANC_FINAL.get(code) or ORTHANC_STATUSES.get(code, 500)


def orthanc_answer_status(status: int, code: object) -> int:
    """The status our rule reads for an error answer of Orthanc's REST API: its HTTP
    status, except a 500 whose ``OrthancStatus`` (``code``) is one of ``ORTHANC_FINAL``
    (over HTTP as in-process, a query naming an unknown tag is final, not retried)."""
    if status == 500 and isinstance(code, int) and not isinstance(code, bool):
        return ORTHANC_FINAL.get(code, status)
    return status


def orthanc_error(code: int, what: str, detail: str = "") -> DicomSyncError:
    """The error for an Orthanc error code, by ``status_error`` of ``orthanc_status(code)``;
    the message names the code (``Orthanc error 4: Not enough memory``)."""
    text = f"Orthanc error {code}: {detail}" if detail else f"Orthanc error {code}"
    error = status_error(orthanc_status(code), what, text)
    return error if error is not None else Unreachable(f"{what}: {text}")
