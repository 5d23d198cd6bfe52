"""``InProcessTransport``: Orthanc REST calls through ``orthanc.RestApi*`` (instance files by
``GetDicomForInstance``), with no HTTP hop; thread-safe as they are. An
``orthanc.OrthancException`` (``args``: Orthanc's error code, its description) is raised as
``dicomsync.http_errors.orthanc_error``: the rule every HTTP client of ours follows, applied
to the status Orthanc gives that code. Once ``close()`` is called (Orthanc is stopping)
every call raises ``Unreachable`` instead of reaching into a stopping server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import orthanc

from dicomsync.errors import DicomSyncError, Unreachable
from dicomsync.http_errors import orthanc_error
from dicomsync.orthanc_client import Transport


def translate(exc: Exception, what: str) -> DicomSyncError:
    """The dicomsync error for an ``OrthancException`` (a code that is not an int is -1)."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
    return orthanc_error(code, what, str(exc.args[1]) if len(exc.args) > 1 else str(exc))


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
        return cast(bytes, self._call(orthanc.RestApiGet, f"GET {path}", path))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored file without the REST layer: 80 us, against 120-280 for ``/file``."""
        what = f"GET /instances/{instance_id}/file"
        return cast(bytes, self._call(orthanc.GetDicomForInstance, what, instance_id))

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        return cast(bytes, self._call(orthanc.RestApiPost, f"POST {path}", path, body))

    def delete(self, path: str) -> None:
        self._call(orthanc.RestApiDelete, f"DELETE {path}", path)

    def close(self) -> None:
        self.closed = True

    def reopen(self) -> None:
        """Orthanc started again in the same process: calls reach it again."""
        self.closed = False
