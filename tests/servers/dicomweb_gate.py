"""A DICOMweb gate for tests: a forwarding proxy in front of a real DICOMweb server that
does what Orthanc's DICOMweb plugin cannot be made to do, per PS3.18 and RFC 6750.

Every request is forwarded to ``upstream`` (Orthanc's ``/dicom-web``) with its method,
path, query, body and ``Content-Type``/``Accept`` headers, and the upstream answer is
returned as is, except:

- **Bearer tokens** (``tokens``): when ``tokens`` is set, a request must carry
  ``Authorization: Bearer <t>`` with ``t`` in ``tokens``. A token in ``expired`` answers
  401 with ``WWW-Authenticate: Bearer realm="gate", error="invalid_token",
  error_description="The access token expired"`` (RFC 6750 3.1: what Google's, Azure's
  and most OAuth resource servers send); a missing or unknown token answers 401 with
  ``WWW-Authenticate: Bearer realm="gate"`` and no error code (RFC 6750 3.1: a request
  without credentials), so only ``invalid_token`` says a new token may help.
- **Basic** (``basic``: ``(user, password)``): ``Authorization: Basic`` must match, else
  401 with ``WWW-Authenticate: Basic realm="gate"``.
- **Injected answers** (``inject``): a list of ``(method, path_prefix, status, body)``;
  the first that matches answers instead of the upstream (``body`` is sent as
  ``application/dicom+json`` when it is a dict or list, as a bare ``application/dicom``
  when it is bytes). ``inject_times`` limits how often each entry fires (None: always).
- **No chunked uploads**: a request with ``Transfer-Encoding: chunked`` answers 411
  (Length Required), as a strict server or proxy does, so a test sees it.

An upstream that does not answer gives 502 (Bad Gateway). ``stowed`` lists the
SOPInstanceUID of every part of every STOW-RS request the upstream accepted (2xx), so a
test can count what reached the server, duplicates included.

``seen`` records ``(method, path, Authorization scheme, content length)`` of every request,
never the credentials themselves; ``hosts`` the ``Host`` headers seen; ``seen_tokens`` the bearer tokens offered (tests check
which were tried, the test owns them).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any

import requests


def stowed_sop_uids(content_type: str, body: bytes) -> list[str]:
    """The SOPInstanceUID of each part of a multipart/related STOW-RS body."""
    import pydicom

    boundary = ""
    for item in content_type.split(";"):
        name, _, value = item.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return []
    uids = []
    for part in body.split(b"--" + boundary.encode())[1:]:
        _head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        data = data.removesuffix(b"\r\n")
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


@dataclass
class Gate:
    upstream: str
    tokens: set[str] | None = None
    expired: set[str] = field(default_factory=set)
    basic: tuple[str, str] | None = None
    inject: list[tuple[str, str, int, Any]] = field(default_factory=list)
    inject_times: int | None = None
    seen: list[tuple[str, str, str, int]] = field(default_factory=list)
    seen_tokens: list[str] = field(default_factory=list)
    stowed: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    _fired: dict[int, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    def start(self) -> Gate:
        gate = self
        upstream = requests.Session()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                auth = self.headers.get("Authorization", "")
                length = int(self.headers.get("Content-Length") or 0)
                with gate._lock:
                    gate.seen.append((self.command, self.path, auth.split(" ")[0], length))
                    gate.hosts.add(self.headers.get("Host", ""))
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.close_connection = True
                    self._answer(411, b"chunked uploads are refused", {})
                    return
                body = self.rfile.read(length) if length else b""
                if gate.tokens is not None:
                    token = auth[7:] if auth.startswith("Bearer ") else ""
                    with gate._lock:
                        gate.seen_tokens.append(token)
                    if token in gate.expired:
                        challenge = (
                            'Bearer realm="gate", error="invalid_token", '
                            'error_description="The access token expired"'
                        )
                        self._answer(401, b"", {"WWW-Authenticate": challenge})
                        return
                    if token not in gate.tokens:
                        self._answer(401, b"", {"WWW-Authenticate": 'Bearer realm="gate"'})
                        return
                if gate.basic is not None:
                    import base64

                    want = "Basic " + base64.b64encode(":".join(gate.basic).encode()).decode()
                    if auth != want:
                        self._answer(401, b"", {"WWW-Authenticate": 'Basic realm="gate"'})
                        return
                path = self.path.removeprefix("/dicom-web")
                for i, (method, prefix, status, answer) in enumerate(gate.inject):
                    if method == self.command and path.split("?")[0].startswith(prefix):
                        with gate._lock:
                            fired = gate._fired.get(i, 0)
                            if gate.inject_times is not None and fired >= gate.inject_times:
                                continue
                            gate._fired[i] = fired + 1
                        if isinstance(answer, bytes):
                            self._answer(status, answer, {"Content-Type": "application/dicom"})
                        elif isinstance(answer, (dict, list)):
                            data = json.dumps(answer).encode()
                            self._answer(status, data, {"Content-Type": "application/dicom+json"})
                        else:
                            self._answer(status, str(answer or "").encode(), {})
                        return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")
                }
                headers["Accept-Encoding"] = "identity"
                try:
                    r = upstream.request(
                        self.command,
                        gate.upstream + path,
                        data=body or None,
                        headers=headers,
                        timeout=60,
                    )
                except requests.RequestException:
                    self._answer(502, b"upstream down", {})
                    return
                if self.command == "POST" and r.status_code < 300:
                    uids = stowed_sop_uids(self.headers.get("Content-Type", ""), body)
                    with gate._lock:
                        gate.stowed.extend(uids)
                out = {"Content-Type": r.headers.get("Content-Type", "application/octet-stream")}
                self._answer(r.status_code, r.content, out)

            do_GET = _handle
            do_POST = _handle
            do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
