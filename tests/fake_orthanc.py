"""A stand-in for the ``orthanc`` module, to run the plugin's glue in a plain Python process.

The REST calls (``RestApiGet/Post/Delete``) are forwarded over HTTP to a REAL Orthanc,
so the glue reads real data; only the embedding (callback registration, ``RestOutput``,
logging, metrics) is imitated. ``install(url)`` puts it in ``sys.modules["orthanc"]``.
Acceptance tests use the real plugin inside Orthanc (tests/test_plugin*.py).
"""

from __future__ import annotations

import json
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests


class OrthancException(Exception):
    """Like orthanc.OrthancException: args = (error code, description)."""


class ChangeType:
    NEW_INSTANCE = 3
    STABLE_STUDY = 9
    ORTHANC_STARTED = 10
    ORTHANC_STOPPED = 11


class MetricsType:
    DEFAULT = 0
    TIMER = 1


class HttpMethod:
    GET = 1
    POST = 2
    PUT = 3
    DELETE = 4


_CODES = {404: (17, "Unknown resource"), 400: (8, "Bad request"), 401: (29, "Unauthorized")}


class RestOutput:
    """Records what the callback answered."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body: str = ""
        self.content_type = ""
        self.headers: dict[str, str] = {}
        self.allowed = ""

    def AnswerBuffer(self, body: str | bytes, content_type: str) -> None:
        self.status, self.content_type = 200, content_type
        self.body = body.decode() if isinstance(body, bytes) else body

    def SetHttpHeader(self, name: str, value: str) -> None:
        self.headers[name] = value

    def SendHttpStatus(self, status: int, body: str, size: int) -> None:
        assert size == len(body.encode())
        self.status, self.body = status, body

    def SendHttpStatusCode(self, status: int) -> None:
        self.status = status

    def SendMethodNotAllowed(self, allowed: str) -> None:
        self.status, self.allowed = 405, allowed

    def json(self) -> Any:
        return json.loads(self.body)


class FakeOrthanc(types.ModuleType):
    def __init__(self, url: str, configuration: dict[str, Any], config_path: str) -> None:
        super().__init__("orthanc")
        self.url = url.rstrip("/")
        self.configuration = configuration
        self.config_path = config_path
        self.on_change: list[Any] = []
        self.on_stored: list[Any] = []
        self.rest: dict[str, Any] = {}
        self.logs: list[tuple[str, str]] = []
        self.metrics: dict[str, float] = {}
        self.OrthancException = OrthancException
        self.ChangeType = ChangeType
        self.MetricsType = MetricsType
        self.HttpMethod = HttpMethod
        # Like orthanc-python: every change callback runs on one thread of its own
        self._changes: ThreadPoolExecutor | None = None
        self.change_thread: int | None = None  # its native thread id, once it ran

    # --- REST, forwarded to the real Orthanc ---------------------------------------------
    def _call(self, method: str, path: str, body: bytes | str | None = None) -> bytes:
        # a new connection per call: thread-safe, and immune to Orthanc's 1 s keep-alive
        r = requests.request(
            method, self.url + path, data=body, timeout=60, headers={"Accept-Encoding": "identity"}
        )
        if r.status_code >= 300:
            raise OrthancException(*_CODES.get(r.status_code, (1, f"HTTP {r.status_code}")))
        return r.content

    def RestApiGet(self, path: str) -> bytes:
        return self._call("GET", path)

    def RestApiPost(self, path: str, body: bytes | str) -> bytes:
        return self._call("POST", path, body)

    def GetDicomForInstance(self, instance_id: str) -> bytes:
        return self._call("GET", f"/instances/{instance_id}/file")

    def RestApiDelete(self, path: str) -> None:
        self._call("DELETE", path)

    # --- embedding -------------------------------------------------------------------------
    def GetConfiguration(self) -> str:
        return json.dumps(self.configuration)

    def GetConfigurationPath(self) -> str:
        return self.config_path

    def RegisterOnChangeCallback(self, fn: Any) -> None:
        self.on_change.append(fn)

    def RegisterOnStoredInstanceCallback(self, fn: Any) -> None:
        self.on_stored.append(fn)

    def RegisterRestCallback(self, pattern: str, fn: Any) -> None:
        self.rest[pattern] = fn

    def SetMetricsValue(self, name: str, value: float, kind: int) -> None:
        assert isinstance(value, float) and kind in (0, 1)
        self.metrics[name] = value

    def LogInfo(self, text: str) -> None:
        self.logs.append(("info", text))

    def LogWarning(self, text: str) -> None:
        self.logs.append(("warning", text))

    def LogError(self, text: str) -> None:
        self.logs.append(("error", text))

    # --- test drivers ----------------------------------------------------------------------
    def change(self, change_type: int, resource_id: str = "") -> None:
        """Deliver a change as orthanc-python does: on its own thread, one at a time (here
        the caller waits for the callbacks to return)."""

        def deliver() -> None:
            self.change_thread = threading.get_native_id()
            for fn in self.on_change:
                fn(change_type, 0, resource_id)

        if self._changes is None:
            self._changes = ThreadPoolExecutor(1, thread_name_prefix="orthanc-changes")
        self._changes.submit(deliver).result()

    def close(self) -> None:
        if self._changes is not None:
            self._changes.shutdown()
            self._changes = None

    def request(
        self, method: str, path: str, body: bytes | None = None, get: dict[str, str] | None = None
    ) -> RestOutput:
        """Call the callback registered for ``/dicomsync/(.*)`` as Orthanc would."""
        import re

        for pattern, fn in self.rest.items():
            m = re.fullmatch(pattern, path)
            if m:
                output = RestOutput()
                request: dict[str, Any] = {
                    "method": method,
                    "groups": m.groups(),
                    "get": get or {},
                    "headers": {},
                }
                if method in ("POST", "PUT"):
                    request["body"] = body or b""
                fn(output, path, **request)
                return output
        raise AssertionError(f"no REST callback for {path}")


def install(url: str, configuration: dict[str, Any], config_path: str) -> FakeOrthanc:
    fake = FakeOrthanc(url, configuration, config_path)
    sys.modules["orthanc"] = fake
    return fake


def uninstall() -> None:
    fake = sys.modules.pop("orthanc", None)
    if isinstance(fake, FakeOrthanc):
        fake.close()
    for name in [n for n in sys.modules if n.startswith("dicomsync.plugin")]:
        del sys.modules[name]
