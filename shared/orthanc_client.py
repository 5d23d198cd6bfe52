"""A small Orthanc REST client over a pluggable transport.

Two transports implement ``Transport``:
- ``HttpTransport`` (here): ``requests`` keep-alive sessions, for the CLI and for
  remote Orthanc places. It sends ``Accept-Encoding: identity`` because Orthanc
  otherwise gzips every DICOM file on the fly (measured: 26 vs 92 instances/s).
- ``dicomsync.plugin.inprocess.InProcessTransport``: ``orthanc.RestApi*`` calls,
  inside the plugin, with no HTTP hop.

Transports raise only ``dicomsync.errors``, by the rule of ``dicomsync.http_errors``:
``NotFound`` for 404, ``AuthenticationFailed`` for 401/403, ``RemoteRejected`` for other
4xx, ``Unreachable`` (retryable) for network errors, 408, 429 and 5xx, and ``Unreachable``
*not* retryable for a TLS/certificate failure (a wrong CA bundle does not heal). A 500
whose body names one of the Orthanc error codes that are final (``ORTHANC_FINAL``: an
unknown tag in a query, a corrupted file, ...) is ``RemoteRejected``, as it is in-process.

Every answer is parsed with ``dicomsync.jsonsafe`` (nesting measured without recursion
before ``json.loads``): the client runs on Orthanc's REST threads inside the plugin,
whose C stack is small, and a remote Orthanc's answers are not ours to trust.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import requests

from dicomsync import jsonsafe
from dicomsync.errors import NotFound, RemoteRejected
from dicomsync.http_errors import (
    is_tls_failure,
    orthanc_answer_status,
    short_reason,
    status_error,
    transport_error,
)

__all__ = ["HttpTransport", "OrthancClient", "Transport", "raise_for_status", "short_reason"]

log = logging.getLogger(__name__)


class Transport(ABC):
    """Raw REST calls against one Orthanc. Paths start with ``/``."""

    description: str = "orthanc"

    @abstractmethod
    def get(self, path: str) -> bytes: ...

    @abstractmethod
    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes: ...

    @abstractmethod
    def delete(self, path: str) -> None: ...

    def get_stream(self, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream a large body; transports without streaming return it whole."""
        yield self.get(path)

    def instance_file(self, instance_id: str) -> bytes:
        """An instance's DICOM file as stored (``GET /instances/{id}/file``); a transport
        with a quicker way to it overrides this."""
        return self.get(f"/instances/{instance_id}/file")

    def close(self) -> None:  # noqa: B027
        pass


def raise_for_status(status: int, what: str, detail: str = "") -> None:
    """Translate an HTTP status into a dicomsync error (no-op for 2xx), by the one rule of
    ``dicomsync.http_errors``; a 3xx that was not followed is a rejection."""
    if status < 300:
        return
    error = status_error(status, what, detail)
    raise error if error is not None else RemoteRejected(f"{what}: rejected ({status})")


class HttpTransport(Transport):
    """HTTP to a remote Orthanc with ``requests``; one keep-alive session per thread."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | Callable[[], str] | None = None,
        *,
        verify: bool | str = True,
        timeout: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.description = self.url
        self._user = user
        self._password = password  # a callable is asked at the first connection
        self._verify = verify
        self._timeout = timeout
        self._local = threading.local()
        self._sessions: dict[threading.Thread, requests.Session] = {}
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        """This thread's keep-alive session; sessions of threads that ended are closed."""
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            auth = self._credentials()
            s = requests.Session()
            # requests reads the environment again on every request (proxy variables, the
            # CA bundle variables, ~/.netrc: about a tenth of a small request's CPU); all
            # of this session's requests go to one URL, so it is read once, here
            env = s.merge_environment_settings(self.url, {}, None, self._verify, None)
            s.proxies.update(env["proxies"])
            # a bundle path makes requests stat it on every request, even over plain HTTP
            # (a system call that gives the GIL away); plain HTTP verifies nothing
            plain = self.url.lower().startswith("http://") and not env["proxies"]
            s.verify = True if plain and env["verify"] is not False else env["verify"]
            s.auth = auth if auth is not None else requests.utils.get_netrc_auth(self.url)
            s.trust_env = False
            s.headers["Accept-Encoding"] = "identity"
            self._local.session = s
            with self._lock:
                for thread in [t for t in self._sessions if not t.is_alive()]:
                    self._sessions.pop(thread).close()
                self._sessions[threading.current_thread()] = s
        return s

    def _credentials(self) -> tuple[str, str] | None:
        if not self._user:
            return None
        password = self._password() if callable(self._password) else self._password
        return (self._user, password or "")

    def _call(self, method: str, path: str, **kw: Any) -> requests.Response:
        what = f"{method} {self.url}{path}"
        try:
            r = self._session().request(method, self.url + path, timeout=self._timeout, **kw)
        except requests.RequestException as exc:
            # a certificate failure is final (Unreachable, not retryable), the rest transient
            where = what if is_tls_failure(exc) else f"cannot reach Orthanc at {self.url}"
            raise transport_error(exc, where) from None
        if r.status_code >= 300:
            detail, code = _detail(r)
            raise_for_status(orthanc_answer_status(r.status_code, code), what, detail)
        return r

    def get(self, path: str) -> bytes:
        return self._call("GET", path).content

    def get_stream(self, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        r = self._call("GET", path, stream=True)
        try:
            yield from r.iter_content(chunk_size)
        finally:
            r.close()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        return self._call("POST", path, data=body, headers={"Content-Type": content_type}).content

    def delete(self, path: str) -> None:
        self._call("DELETE", path)

    def close(self) -> None:
        with self._lock:
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()
        self._local = threading.local()


def _detail(r: requests.Response) -> tuple[str, object]:
    """Orthanc's own reason in an error answer, short, and its ``OrthancStatus`` (None if
    the body does not say; the body is read with bounded depth)."""
    try:
        body = jsonsafe.loads(r.content, max_bytes=1 << 20)
        if isinstance(body, dict):
            reason = str(body.get("Details") or body.get("Message") or "")[:200]
            return reason, body.get("OrthancStatus")
    except ValueError:
        pass
    return (" ".join(r.text[:200].split()) if r.text else ""), None


def _answer(data: bytes, what: str) -> Any:
    """An Orthanc answer as JSON; depth checked first (no recursion on a small stack)."""
    try:
        return jsonsafe.loads(data)
    except ValueError as exc:  # JsonRejected, or an integer of more than 4300 digits
        raise RemoteRejected(f"{what}: the answer is not usable JSON ({exc})") from None


class OrthancClient:
    """The Orthanc REST calls dicomsync needs, over any ``Transport``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def get_json(self, path: str) -> Any:
        return _answer(self.transport.get(path), f"GET {path}")

    def post_json(self, path: str, payload: Any) -> Any:
        body = self.transport.post(path, json.dumps(payload).encode())
        return _answer(body, f"POST {path}") if body.strip() else None

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def studies_expanded(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get_json("/studies?expand")
        return result

    def study(self, study_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/studies/{study_id}")
        return result

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get_json(f"/studies/{study_id}/instances")
        return result

    def study_sop_uids(self, study_id: str) -> dict[str, str]:
        """SOPInstanceUID -> Orthanc instance ID for one study (empty if absent)."""
        try:
            instances = self.study_instances(study_id)
        except NotFound:
            return {}
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}

    def lookup_studies(self, study_uid: str) -> list[str]:
        """Orthanc study IDs whose StudyInstanceUID is ``study_uid``."""
        found = self.transport.post("/tools/lookup", study_uid.encode(), "text/plain")
        answer = _answer(found, "POST /tools/lookup")
        if not isinstance(answer, list):
            raise RemoteRejected("POST /tools/lookup: the answer is not a list")
        return [r["ID"] for r in answer if isinstance(r, dict) and r.get("Type") == "Study"]

    def instance_file(self, instance_id: str) -> bytes:
        return self.transport.instance_file(instance_id)

    def store_instance(self, data: bytes) -> dict[str, Any]:
        result = _answer(self.transport.post("/instances", data, "application/dicom"), "store")
        if not isinstance(result, dict):
            raise RemoteRejected("POST /instances: the answer is not a JSON object")
        return result

    def close(self) -> None:
        self.transport.close()
