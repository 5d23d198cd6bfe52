"""An HTTP proxy that fails a share of requests at random, for chaos tests.

``FaultyProxy(target, rate).start()`` listens on a free loopback port and forwards every
request to ``target`` (an Orthanc, say). With probability ``rate`` a request fails, in
one of three ways a flaky network or an overloaded server shows:

- ``503`` before forwarding (the destination never saw it);
- the connection closed before forwarding, with no answer;
- ``503`` *after* forwarding: the destination did the work (stored the instance), the
  client is told it failed. A client that then sends it again makes a duplicate.

``counts`` says how many requests were forwarded and how many failed each way.
"""

from __future__ import annotations

import http.server
import random
import threading
from typing import Any

import requests

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _proxy(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = proxy.draw()
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "503":
            self._send(503, b'{"Message": "injected fault"}', {})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            r = proxy.session().request(
                self.command, proxy.target + self.path, data=body, headers=headers, timeout=60
            )
        except requests.RequestException:
            self._send(502, b'{"Message": "target unreachable"}', {})
            return
        proxy.count("forwarded")
        if fault == "503-after":
            self._send(503, b'{"Message": "injected fault after forwarding"}', {})
            return
        out = {
            k: v
            for k, v in r.headers.items()
            if k.lower() not in HOP_HEADERS | {"content-encoding"}
        }
        self._send(r.status_code, r.content, out)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _proxy


class FaultyProxy:
    def __init__(self, target: str, rate: float, seed: int = 9) -> None:
        self.target = target.rstrip("/")
        self.rate = rate
        self.enabled = True
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.counts = {"forwarded": 0, "503": 0, "drop": 0, "503-after": 0}
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
            s.headers["Accept-Encoding"] = "identity"
        return s

    def draw(self) -> str | None:
        with self._lock:
            if not self.enabled or self._random.random() >= self.rate:
                return None
            fault = self._random.choices(["503", "drop", "503-after"], [6, 2, 2])[0]
            self.counts[fault] += 1
            return fault

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def start(self) -> FaultyProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
