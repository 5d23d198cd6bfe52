"""``HecChannel``: the HTTP side of a ``splunk_hec`` sink (one requests session, the token,
the ledger) and the one mapping of HEC's answers to the error tree.

Every request is a POST through ``_request``: no answer raises the
``dicomsync.http_errors.transport_error`` (``sink=True``: a TLS failure is ``SinkFatal``,
a timeout or a dropped connection ``SinkRetryable``); an answer that is not a success is
turned into an error by ``_failure``, through ``status_error`` (401/403/404/other 4xx
``SinkFatal``, 408/429/5xx ``SinkRetryable``). Each message says what happens to the
events (kept for a later retry, or the sink stopped). The token is read from the
environment at each send and never stored or logged.

``_Flight`` is a batch HEC accepted with an ``ackId``, kept until it is acknowledged
(the pipeline is in ``dicomsync.sinks.splunk_hec.sink``).

Thread-safety: none here; ``SplunkHec`` serialises its deliveries with ``_lock``.
"""

from __future__ import annotations

import gzip
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from dicomsync import jsonsafe
from dicomsync.errors import DicomSyncError, SinkError, SinkFatal, SinkRetryable
from dicomsync.http_errors import status_error, transport_error
from dicomsync.sinks.base import Sink, open_ledger

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
MAX_ANSWER_BYTES = 1_000_000  # a HEC answer is a few dozen bytes; anything larger is not HEC


@dataclass
class _Flight:
    """A batch HEC accepted with an ackId, waiting for its acknowledgement."""

    ack_id: int
    ids: list[str]
    body: bytes  # as POSTed (gzip-compressed when Gzip is on)
    ends: list[int]  # end offset of each envelope in the uncompressed body
    compressed: bool
    posted: float  # time.monotonic() of the answer

    def items(self) -> list[tuple[str, bytes]]:
        raw = gzip.decompress(self.body) if self.compressed else self.body
        starts = [0, *self.ends[:-1]]
        return [(i, raw[a:b]) for i, a, b in zip(self.ids, starts, self.ends, strict=True)]


class HecChannel(Sink):
    """The configuration, session and ledger of one HEC endpoint (abstract: the delivery
    is ``SplunkHec``'s)."""

    kind = "splunk_hec"

    def __init__(
        self,
        key: str,
        url: str,
        *,
        state_file: Path,
        token_env: str = "SPLUNK_HEC_TOKEN",
        index: str | None = None,
        source: str | None = None,
        host: str | None = None,
        use_gzip: bool = True,
        batch_events: int = 500,
        batch_bytes: int = 1_000_000,
        ack: bool = False,
        ack_timeout: float = 120.0,
        ack_poll: float = 0.25,
        ack_in_flight: int = 64,
        timeout: float = 30.0,
        verify: bool = True,
        ca_bundle: str | None = None,
        search_url: str | None = None,
        search_token_env: str | None = None,
        search_user_env: str | None = None,
        search_password_env: str | None = None,
        section: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(key)
        self.url = url.rstrip("/")
        self.token_env = token_env
        self.index = index
        self.source = source
        self.host = host or socket.gethostname()
        self.use_gzip = use_gzip
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.ack = ack
        self.ack_timeout = ack_timeout
        self.ack_poll = ack_poll
        self.ack_in_flight = ack_in_flight
        self.timeout = timeout
        self.verify: bool | str = ca_bundle if (verify and ca_bundle) else verify
        self.search_url = search_url.rstrip("/") if search_url else None
        self.search_token_env = search_token_env
        self.search_user_env = search_user_env
        self.search_password_env = search_password_env
        self.channel = str(uuid.uuid4())
        self.ledger = open_ledger(state_file, key)
        self._section = dict(section or {"Kind": self.kind, "Url": url})
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session_key: str | None = None
        self._flights: dict[int, _Flight] = {}  # ackId -> batch waiting for its ack
        self._resend: list[_Flight] = []  # batches whose ack timed out: posted again next call
        self._next_poll = 0.0
        self._polled = False  # polled since the last batch went in flight
        self.counters = {"sent": 0, "rejected": 0, "requests": 0, "ack_polls": 0}

    def _token(self) -> str:
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise SinkFatal(
                f"splunk_hec {self.key!r}: environment variable {self.token_env} is not set "
                "(it must hold the HEC token); events are kept"
            )
        return token

    def _record(self, ids: list[str], delivered: set[str]) -> None:
        self.ledger.add(ids)
        delivered.update(ids)
        self.counters["sent"] += len(ids)

    def _headers(self, token: str) -> dict[str, str]:
        headers = {"Authorization": f"Splunk {token}", "Content-Type": "application/json"}
        if self.ack:
            headers["X-Splunk-Request-Channel"] = self.channel
        if self.use_gzip:
            headers["Content-Encoding"] = "gzip"
        return headers

    def _what(self, path: str) -> str:
        return f"splunk_hec {self.key!r}: HEC {self.url}{path} (token from ${self.token_env})"

    def _request(self, path: str, body: bytes, token: str, *, gz: bool) -> tuple[int, Any]:
        """POST to HEC: (status, parsed JSON answer or None); no answer -> the mapped error."""
        self.counters["requests"] += 1
        headers = self._headers(token)
        if not gz:
            headers.pop("Content-Encoding", None)
        url = self.url + path + (f"?channel={self.channel}" if path == ACK_PATH else "")
        try:
            r = self._session.post(
                url, data=body, headers=headers, timeout=self.timeout, verify=self.verify
            )
        except requests.RequestException as exc:
            raise _kept(transport_error(exc, self._what(path), sink=True)) from None
        try:
            answer = jsonsafe.loads(r.content, max_bytes=MAX_ANSWER_BYTES)
        except ValueError:
            answer = None
        return r.status_code, answer

    def _failure(self, path: str, status: int, answer: Any) -> SinkError:
        """The error for an HEC answer that is not a success (``http_errors.status_error``)."""
        code = answer.get("code") if isinstance(answer, dict) else None
        detail = ""
        if code is not None:
            text = " ".join(str(answer.get("text", "")).split())[:200]
            detail = f"code {code}, {text}" if text else f"code {code}"
        err = status_error(status, self._what(path), detail, sink=True)
        if err is None:  # 1xx-3xx, or a 200 that is not HEC's answer
            err = SinkFatal(
                f"{self._what(path)}: unexpected answer (HTTP {status}"
                + (f", {detail})" if detail else ")")
                + "; is Url the HEC port (usually 8088)?"
            )
        return _kept(err)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "delivered": self.ledger.count()}

    def close(self) -> None:
        self._session.close()
        self.ledger.close()


def _kept(err: DicomSyncError) -> SinkError:
    """An ``http_errors`` sink error, saying what happens to the events."""
    if isinstance(err, SinkRetryable):
        return SinkRetryable(f"{err}; events kept for a later retry")
    return SinkFatal(f"{err}; sink stopped, events kept")
