"""``InProcessTransport``: Orthanc REST calls through ``orthanc.RestApi*``, with no HTTP hop.

Used by the plugin's workers to read the local Orthanc. ``orthanc.OrthancException``
(``args[0]`` is Orthanc's error code) is translated into dicomsync errors:
unknown resource -> ``NotFound``, bad request or file -> ``RemoteRejected``,
unauthorised -> ``AuthenticationFailed``, anything else -> ``Unreachable``
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

# Orthanc error codes (OrthancPluginErrorCode)
_NOT_FOUND = {7, 13, 17}  # INEXISTENT_ITEM, INEXISTENT_FILE, UNKNOWN_RESOURCE
_REJECTED = {
    3,
    4,
    5,
    6,
    8,
    15,
}  # PARAMETER_OUT_OF_RANGE, BAD_PARAMETER_TYPE, … BAD_REQUEST, BAD_FILE_FORMAT
_UNAUTHORIZED = {29}


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
