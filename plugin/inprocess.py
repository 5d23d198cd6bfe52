"""``InProcessTransport``: Orthanc REST calls through ``orthanc.RestApi*``, with no HTTP hop.

Used by the plugin's workers to read the local Orthanc. ``orthanc.OrthancException``
(``args[0]`` is Orthanc's error code) is translated into dicomsync errors:
unknown resource -> ``NotFound``, bad request or bad/corrupted file ->
``RemoteRejected``, unauthorised -> ``AuthenticationFailed``, anything else
(out of memory, database busy, storage full, timeouts) -> ``Unreachable``
(retryable). Once ``close()`` is called (Orthanc is stopping) every call raises
``Unreachable`` instead of reaching into a server that is shutting down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orthanc

from dicomsync.errors import (
    AuthenticationFailed,
    DicomSyncError,
    NotFound,
    RemoteRejected,
    Unreachable,
)
from dicomsync.orthanc_client import Transport

# Orthanc error codes (orthanc.ErrorCode, OrthancPluginErrorCode). Only errors that say
# "this request or this file is wrong" are final; everything else (NOT_ENOUGH_MEMORY,
# DATABASE, TIMEOUT, FULL_STORAGE, DATABASE_UNAVAILABLE, …) may heal: Unreachable.
_NOT_FOUND = {7, 13, 17}  # INEXISTENT_ITEM, INEXISTENT_FILE, UNKNOWN_RESOURCE
_REJECTED = {
    3,  # PARAMETER_OUT_OF_RANGE
    5,  # BAD_PARAMETER_TYPE
    6,  # BAD_SEQUENCE_OF_CALLS
    8,  # BAD_REQUEST
    12,  # URI_SYNTAX
    15,  # BAD_FILE_FORMAT
    20,  # CORRUPTED_FILE
    21,  # INEXISTENT_TAG
    27,  # UNKNOWN_DICOM_TAG (a /tools/find query naming no tag)
    28,  # BAD_JSON
    33,  # EMPTY_REQUEST
}
_UNAUTHORIZED = {29}  # UNAUTHORIZED


def translate(exc: Exception, what: str) -> DicomSyncError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
    detail = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if code in _NOT_FOUND:
        return NotFound(f"{what}: not found ({detail})")
    if code in _UNAUTHORIZED:
        return AuthenticationFailed(f"{what}: not authorised ({detail})")
    if code in _REJECTED:
        return RemoteRejected(f"{what}: rejected ({detail})")
    return Unreachable(f"{what}: Orthanc error {code} ({detail})")


class InProcessTransport(Transport):
    description = "this Orthanc (in-process)"

    def __init__(self) -> None:
        self.closed = False

    def _call(self, fn: Callable[..., Any], what: str, *args: Any) -> Any:
        if self.closed:
            raise Unreachable(f"{what}: Orthanc is stopping")
        try:
            return fn(*args)
        except orthanc.OrthancException as exc:
            raise translate(exc, what) from None

    def get(self, path: str) -> bytes:
        data: bytes = self._call(orthanc.RestApiGet, f"GET {path}", path)
        return data

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        data: bytes = self._call(orthanc.RestApiPost, f"POST {path}", path, body)
        return data

    def delete(self, path: str) -> None:
        self._call(orthanc.RestApiDelete, f"DELETE {path}", path)

    def close(self) -> None:
        self.closed = True

    def reopen(self) -> None:
        """Orthanc started again in the same process: calls reach it again."""
        self.closed = False
