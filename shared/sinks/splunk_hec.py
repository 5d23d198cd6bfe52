"""``splunk_hec``: events to Splunk's HTTP Event Collector; queries through the search API.

Config (every option but ``Url`` has a default)::

    "splunk": {
      "Kind": "splunk_hec",
      "Url": "https://splunk.example.org:8088",   // HEC base URL (no user:pass@, see dicomsync.urls)
      "TokenEnv": "SPLUNK_HEC_TOKEN",             // env var holding the HEC token
      "Index": "dicom",                           // omitted: the token's default index
      "Source": "...",                            // omitted: each instance's origin (below)
      "Host": "<this host's name>",
      "Gzip": true,                               // Content-Encoding: gzip
      "BatchEvents": 500, "BatchBytes": 1000000,  // a batch ends at whichever comes first
      "Ack": false,                               // indexer acknowledgement
      "AckTimeoutSeconds": 120, "AckPollSeconds": 0.25, "AckInFlight": 64,
      "TimeoutSeconds": 30,
      "VerifyTls": true, "CaBundle": "/etc/ssl/splunk-ca.pem",
      "StateFile": ".dicomsync/sinks/splunk.ledger.sqlite",
      "SearchUrl": "https://splunk.example.org:8089",   // for replicate --where
      "SearchTokenEnv": "SPLUNK_SEARCH_TOKEN",          // Bearer token, or:
      "SearchUserEnv": "SPLUNK_USER", "SearchPasswordEnv": "SPLUNK_PASSWORD"
    }

``Retries``, ``BackoffSeconds`` and ``MaxBackoffSeconds`` are accepted and ignored
(deprecated, with one warning): the sink does not retry. A transient failure raises
``SinkRetryable`` at once and the caller retries in one layer with
``dicomsync.queue.base.RetryPolicy`` (the plugin's queue; ``dicomsync index``).

Sending: events become HEC JSON envelopes ``{"time", "host", "source", "sourcetype",
"index", "event", "fields": {"dicomsync_id", "time_source"}}`` (sourcetypes
``dicomsync:instance``, ``dicomsync:dose_report``, ``dicomsync:dose_event``),
concatenated into batches and POSTed to ``/services/collector/event`` with
``Authorization: Splunk <token>``. The token is read from the environment at each
send and never stored or logged. ``source`` is the instance's origin as the event
carries it (``orthanc:<instance id>`` in the plugin, the file's path for ``dicomsync
index`` of a folder), unless ``Source`` sets one value for all.

Answers (every HTTP failure goes through ``dicomsync.http_errors`` with ``sink=True``):

- 200 code 0: the batch is delivered. With ``Ack``, the answer's ``ackId`` is put "in
  flight" instead, and the batch is delivered once ``/services/collector/ack`` reports
  it true (the channel is a GUID made per sink object and sent as
  ``X-Splunk-Request-Channel``);
- 200 *without* ``ackId`` while ``Ack`` is on: the token has indexer acknowledgement
  off. HEC accepted the batch, so it is recorded as delivered (a rerun does not send
  it again), and ``SinkFatal`` stops the sink with one line before anything else is
  sent. ``/services/collector/ack`` answering 400 code 14 ("ACK is disabled") is the
  same case for batches already in flight;
- 503 (code 9 "Server is busy"), 408, 429, other 5xx, timeouts, refused or reset
  connections: ``SinkRetryable`` at once, events kept;
- a TLS or certificate failure: ``SinkFatal`` (it does not fix itself);
- 400 with ``invalid-event-number`` n and code 6/12/13: Splunk indexed the n events
  before it; they count as delivered, event n is reported in the call's
  ``SendResult.rejected`` and logged, and the rest of the batch is resent;
- 401/403 (codes 1-4), 400 code 7 (index), 10/11 (channel), other 4xx: ``SinkFatal``
  with one clear line; undelivered events stay pending.

Acknowledgements are pipelined: up to ``AckInFlight`` batches wait for their ack on
the channel at once, and one ``/services/collector/ack`` request (every ``AckPollSeconds``)
asks for all of them. ``send`` posts its batches and then waits until every batch in
flight is acknowledged. ``submit`` (used by ``dicomsync index``) returns as soon as its
batches are posted, so the next study's batches go out while earlier ones wait for
their acks; ``flush`` waits for the rest. A batch not acknowledged within
``AckTimeoutSeconds`` raises ``SinkRetryable`` and is posted again by the next call.

Delivered ids go to the ledger (``dicomsync.sinks.base.Ledger``), so a repeat sends
nothing. With ``Ack`` off, an event whose 200 answer was lost in transit can reach
Splunk twice on retry; with ``Ack`` on, only an ack timeout can do that.

Querying: ``IndexQuery.to_spl`` is run as a oneshot search
(``POST /services/search/jobs``, ``exec_mode=oneshot``, ``output_mode=json``) on
``SearchUrl``, authenticated with ``Authorization: Bearer <token>`` from
``SearchTokenEnv`` or a session key from ``/services/auth/login`` with the user and
password from ``SearchUserEnv``/``SearchPasswordEnv``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from dicomsync import jsonsafe
from dicomsync.config import resolve_path
from dicomsync.errors import (
    ConfigError,
    DicomSyncError,
    SinkError,
    SinkFatal,
    SinkRetryable,
)
from dicomsync.http_errors import status_error, transport_error
from dicomsync.index_query import IndexQuery
from dicomsync.options import option, parse
from dicomsync.sinks.base import (
    Ledger,
    SendResult,
    Sink,
    StudyHit,
    default_state_file,
    with_delivered,
)
from dicomsync.tags import Event

log = logging.getLogger(__name__)

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
REJECT_CODES = {6, 12, 13}  # the event itself is bad: report it, resend the rest
ACK_DISABLED = 14
MAX_ANSWER_BYTES = 1_000_000  # a HEC answer is a few dozen bytes; anything larger is not HEC
DEPRECATED = ("Retries", "BackoffSeconds", "MaxBackoffSeconds")


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


@dataclass(frozen=True)
class HecOptions:
    """The options of a ``splunk_hec`` sink section."""

    url: str = option("Url", "url", "HEC base URL (`/services/collector/event`)", required=True)
    token_env: str = option(
        "TokenEnv", "envvar", "environment variable with the HEC token", default="SPLUNK_HEC_TOKEN"
    )
    index: str | None = option("Index", "str", "the envelope's `index`", shown="the token's index")
    source: str | None = option(
        "Source",
        "str",
        "the envelope's `source`: one value for every event, instead of each instance's "
        "origin (`orthanc:<instance id>` in the plugin, the file path for `dicomsync index`)",
        shown="the origin",
    )
    host: str | None = option("Host", "str", "the envelope's `host`", shown="host name")
    gzip: bool = option("Gzip", "bool", "gzip request bodies", default=True)
    batch_events: int = option(
        "BatchEvents", "int", "most events in one request", default=500, low=1
    )
    batch_bytes: int = option(
        "BatchBytes", "int", "most bytes in one request", default=1_000_000, low=1024
    )
    ack: bool = option(
        "Ack",
        "bool",
        "indexer acknowledgement: events count as delivered only once acked",
        default=False,
    )
    ack_timeout: float = option(
        "AckTimeoutSeconds",
        "seconds",
        "how long a batch waits for its ack before it is posted again",
        default=120.0,
        low=0,
    )
    ack_poll: float = option(
        "AckPollSeconds",
        "seconds",
        "one `/services/collector/ack` request, for every batch in flight, this often",
        default=0.25,
        above=0,
    )
    ack_in_flight: int = option(
        "AckInFlight", "int", "batches that wait for their ack together", default=64, low=1
    )
    timeout: float = option("TimeoutSeconds", "seconds", "per request", default=30.0, low=0)
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option("CaBundle", "path", "CA bundle file to verify with")
    state_file: str | None = option(
        "StateFile",
        "path",
        "the ledger of delivered event ids",
        shown="`.dicomsync/sinks/<key>.ledger.sqlite`",
    )
    search_url: str | None = option(
        "SearchUrl", "url", "Splunk's management URL, for `replicate --where`"
    )
    search_token_env: str | None = option(
        "SearchTokenEnv", "envvar", "environment variable with a search token"
    )
    search_user_env: str | None = option(
        "SearchUserEnv",
        "envvar",
        "environment variable with a search user (with `SearchPasswordEnv`)",
    )
    search_password_env: str | None = option(
        "SearchPasswordEnv", "envvar", "environment variable with that user's password"
    )


class SplunkHec(Sink):
    kind = "splunk_hec"
    label = "Splunk HTTP Event Collector"
    Options = HecOptions

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
        self.ledger = Ledger(state_file)
        self._section = dict(section or {"Kind": self.kind, "Url": url})
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session_key: str | None = None
        self._flights: dict[int, _Flight] = {}  # ackId -> batch waiting for its ack
        self._resend: list[_Flight] = []  # batches whose ack timed out: posted again next call
        self._next_poll = 0.0
        self._polled = False  # polled since the last batch went in flight
        self.counters = {"sent": 0, "rejected": 0, "requests": 0, "ack_polls": 0}

    # --- configuration ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> SplunkHec:
        where = f"{cls.kind} sink {key!r}"
        opts = parse(HecOptions, section, where)
        ca = opts.ca_bundle
        if ca is not None:
            ca_path = resolve_path(ca, base_dir)
            if not ca_path.is_file():
                raise ConfigError(f"{where}: CaBundle {ca_path} does not exist")
            ca = str(ca_path)
        ignored = [name for name in DEPRECATED if name in section]
        if ignored:
            log.warning(
                "splunk_hec sink %r: %s ignored (deprecated): the sink no longer retries "
                "by itself; failed sends are retried with the Retry policy",
                key,
                ", ".join(ignored),
            )
        return cls(
            key,
            opts.url,
            state_file=resolve_path(opts.state_file, base_dir)
            if opts.state_file
            else default_state_file(base_dir, key),
            token_env=opts.token_env,
            index=opts.index,
            source=opts.source,
            host=opts.host,
            use_gzip=opts.gzip,
            batch_events=opts.batch_events,
            batch_bytes=opts.batch_bytes,
            ack=opts.ack,
            ack_timeout=opts.ack_timeout,
            ack_poll=opts.ack_poll,
            ack_in_flight=opts.ack_in_flight,
            timeout=opts.timeout,
            verify=opts.verify_tls,
            ca_bundle=ca,
            search_url=opts.search_url,
            search_token_env=opts.search_token_env,
            search_user_env=opts.search_user_env,
            search_password_env=opts.search_password_env,
            section=section,
        )

    def to_config(self) -> dict[str, Any]:
        return dict(self._section)

    def describe(self) -> str:
        extras = [
            f"index={self.index}" if self.index else "token's index",
            f"token from ${self.token_env}",
        ]
        if self.ack:
            extras.append("ack")
        if self.verify is False:
            extras.append("TLS NOT VERIFIED")
        return f"splunk_hec {self.url} ({', '.join(extras)})"

    # --- sending ---------------------------------------------------------------------------
    def _token(self) -> str:
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise SinkFatal(
                f"splunk_hec {self.key!r}: environment variable {self.token_env} is not set "
                "(it must hold the HEC token); events are kept"
            )
        return token

    def envelope(self, event: Event) -> bytes:
        env: dict[str, Any] = {
            "time": round(event.time, 3),
            "host": self.host,
            "source": self.source or event.source or "dicomsync",
            "sourcetype": event.sourcetype,
            "event": event.fields,
            "fields": {"dicomsync_id": event.id, "time_source": event.time_source},
        }
        if self.index:
            env["index"] = self.index
        return json.dumps(env, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def has(self, ids: Collection[str]) -> set[str]:
        return self.ledger.known(ids)

    def send(self, events: Sequence[Event]) -> SendResult:
        """Deliver ``events`` and wait for every acknowledgement (see ``Sink.send``)."""
        return self._deliver(events, wait=True)

    def submit(self, events: Sequence[Event]) -> SendResult:
        """Post ``events`` and return without waiting for their acks (see ``Sink.submit``)."""
        return self._deliver(events, wait=False)

    def flush(self) -> SendResult:
        """Wait for every batch still in flight (see ``Sink.flush``)."""
        return self._deliver([], wait=True)

    def _deliver(self, events: Sequence[Event], *, wait: bool) -> SendResult:
        rejected: dict[str, str] = {}  # this call's: HEC refused these events for good
        with self._lock:
            ids = [e.id for e in events]
            delivered = self.ledger.known(ids) if ids else set()
            pending = self._pending_ids()
            todo = [e for e in events if e.id not in delivered and e.id not in pending]
            if not todo and not self._resend and not (wait and self._flights):
                return SendResult(frozenset(delivered))
            token = self._token()
            try:
                while self._resend:
                    flight = self._resend[0]
                    known = self.ledger.known(flight.ids)
                    again = [(i, d) for i, d in flight.items() if i not in known]
                    if again:
                        self._post_batch(again, token, delivered, rejected)
                    self._resend.pop(0)
                    self._after_post(token, delivered)
                for batch in self._batches(todo):
                    self._post_batch(batch, token, delivered, rejected)
                    self._after_post(token, delivered)
                if wait:
                    self._wait_acks(token, delivered, keep=0)
            except SinkError as exc:
                raise with_delivered(exc, delivered, rejected) from None
            return SendResult(frozenset(delivered), rejected)

    def _pending_ids(self) -> set[str]:
        out: set[str] = set()
        for flight in [*self._flights.values(), *self._resend]:
            out.update(flight.ids)
        return out

    def _batches(self, events: Sequence[Event]) -> Iterator[list[tuple[str, bytes]]]:
        batch: list[tuple[str, bytes]] = []
        size = 0
        for event in events:
            data = self.envelope(event)
            if batch and (len(batch) >= self.batch_events or size + len(data) > self.batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append((event.id, data))
            size += len(data)
        if batch:
            yield batch

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

    def _post_batch(
        self,
        batch: list[tuple[str, bytes]],
        token: str,
        delivered: set[str],
        rejected: dict[str, str],
    ) -> None:
        pos = 0
        while pos < len(batch):
            rest = batch[pos:]
            raw = b"".join(data for _, data in rest)
            body = gzip.compress(raw, compresslevel=5) if self.use_gzip else raw
            status, answer = self._request(EVENT_PATH, body, token, gz=self.use_gzip)
            code = answer.get("code") if isinstance(answer, dict) else None
            ids = [i for i, _ in rest]
            if status == 200 and code == 0:
                if not self.ack:
                    self._record(ids, delivered)
                    return
                ack_id = answer.get("ackId")
                if isinstance(ack_id, bool) or not isinstance(ack_id, int):
                    # HEC accepted the batch (as it would with Ack off): record it, so a
                    # rerun does not send it twice, and stop before sending more.
                    self._record(ids, delivered)
                    raise self._ack_disabled(len(ids))
                self._fly(ack_id, rest, body)
                return
            bad = answer.get("invalid-event-number") if isinstance(answer, dict) else None
            if (
                status == 400
                and code in REJECT_CODES
                and isinstance(bad, int)
                and not isinstance(bad, bool)
                and 0 <= bad < len(rest)
            ):
                if bad:
                    # Splunk indexed the events before the bad one (no ackId for them).
                    self._record(ids[:bad], delivered)
                reason = _describe(status, answer)
                rejected[ids[bad]] = reason
                self.counters["rejected"] += 1
                log.warning(
                    "splunk_hec %r: event %s rejected by HEC: %s", self.key, ids[bad], reason
                )
                pos += bad + 1
                continue
            raise self._failure(EVENT_PATH, status, answer)

    def _fly(self, ack_id: int, rest: list[tuple[str, bytes]], body: bytes) -> None:
        ends, offset = [], 0
        for _, data in rest:
            offset += len(data)
            ends.append(offset)
        now = time.monotonic()
        if not self._flights:
            self._next_poll = now + self.ack_poll
        self._polled = False  # a wait starts with one poll at once (a fast indexer)
        old = self._flights.pop(ack_id, None)
        if old is not None:  # HEC reused an ackId (its channel was reset): send it again
            self._resend.append(old)
        self._flights[ack_id] = _Flight(
            ack_id, [i for i, _ in rest], body, ends, self.use_gzip, now
        )

    def _ack_disabled(self, accepted: int) -> SinkFatal:
        return SinkFatal(
            f'splunk_hec {self.key!r}: "Ack" is on, but HEC {self.url} has indexer '
            f"acknowledgement off for the token from ${self.token_env} (no ackId); enable "
            'indexer acknowledgement on the token in Splunk, or set "Ack": false. Sink '
            f"stopped; the {accepted} events HEC accepted are recorded, the rest are kept"
        )

    def _after_post(self, token: str, delivered: set[str]) -> None:
        """Keep at most ``AckInFlight`` batches waiting; poll when a poll is due."""
        if not self._flights:
            return
        if len(self._flights) >= self.ack_in_flight:
            self._wait_acks(token, delivered, keep=self.ack_in_flight - 1)
        elif time.monotonic() >= self._next_poll:
            self._poll_acks(token, delivered)

    def _wait_acks(self, token: str, delivered: set[str], *, keep: int) -> None:
        """Poll every ``AckPollSeconds`` until at most ``keep`` batches are in flight; the
        first poll after a new batch went in flight is at once."""
        while len(self._flights) > keep:
            pause = self._next_poll - time.monotonic()
            if pause > 0 and self._polled:
                time.sleep(pause)
            self._poll_acks(token, delivered)

    def _poll_acks(self, token: str, delivered: set[str]) -> None:
        """One ``/services/collector/ack`` request for every batch in flight."""
        self._next_poll = time.monotonic() + self.ack_poll
        self._polled = True
        self.counters["ack_polls"] += 1
        body = json.dumps({"acks": sorted(self._flights)}).encode()
        status, answer = self._request(ACK_PATH, body, token, gz=False)
        acks = answer.get("acks") if isinstance(answer, dict) else None
        if status == 200 and isinstance(acks, dict):
            for key, done in acks.items():
                try:
                    ack_id = int(key)
                except (TypeError, ValueError):
                    continue
                if done is True and ack_id in self._flights:
                    self._record(self._flights.pop(ack_id).ids, delivered)
        elif status == 400 and isinstance(answer, dict) and answer.get("code") == ACK_DISABLED:
            # HEC accepted these batches with an ackId, then the token lost its ack:
            # they count as delivered, as they would with Ack off.
            accepted = [*self._flights.values(), *self._resend]
            for flight in accepted:
                self._record(flight.ids, delivered)
            self._flights.clear()
            self._resend.clear()
            raise self._ack_disabled(sum(len(f.ids) for f in accepted))
        else:
            raise self._failure(ACK_PATH, status, answer)
        now = time.monotonic()
        late = [f for f in self._flights.values() if now - f.posted > self.ack_timeout]
        if late:
            for flight in late:
                del self._flights[flight.ack_id]
            self._resend.extend(late)
            waiting = sum(len(f.ids) for f in late)
            raise SinkRetryable(
                f"splunk_hec {self.key!r}: {waiting} events not acknowledged within "
                f"{self.ack_timeout:g}s (indexer busy?); they will be sent again"
            )

    # --- querying --------------------------------------------------------------------------
    def _search_auth(self) -> dict[str, str]:
        if self.search_token_env:
            token = os.environ.get(self.search_token_env, "").strip()
            if not token:
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: environment variable {self.search_token_env} is not set"
                )
            return {"Authorization": f"Bearer {token}"}
        if self._session_key is None:
            if not (self.search_user_env and self.search_password_env):
                raise ConfigError(
                    f"splunk_hec sink {self.key!r}: to query Splunk set SearchTokenEnv, or "
                    "SearchUserEnv and SearchPasswordEnv"
                )
            user = os.environ.get(self.search_user_env, "")
            password = os.environ.get(self.search_password_env, "")
            if not user or not password:
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: environment variables {self.search_user_env} and "
                    f"{self.search_password_env} must hold the Splunk user and password"
                )
            r = self._search_call(
                "/services/auth/login",
                {"username": user, "password": password, "output_mode": "json"},
                {},
            )
            key = r.get("sessionKey") if isinstance(r, dict) else None
            if not isinstance(key, str):
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: Splunk login answered without a sessionKey"
                )
            self._session_key = key
        return {"Authorization": f"Splunk {self._session_key}"}

    def _search_call(self, path: str, form: dict[str, str], headers: dict[str, str]) -> Any:
        assert self.search_url is not None
        what = f"splunk_hec {self.key!r}: Splunk search {self.search_url}{path}"
        try:
            r = self._session.post(
                self.search_url + path,
                data=form,
                headers=headers,
                timeout=max(self.timeout, 120.0),
                verify=self.verify,
            )
        except requests.RequestException as exc:
            raise transport_error(exc, what, sink=True) from None
        try:
            answer = jsonsafe.loads(r.content)
        except ValueError:
            answer = None
        err = status_error(r.status_code, what, _messages(answer), sink=True)
        if err is not None:
            raise err
        if answer is None:
            raise SinkRetryable(f"{what}: answered something that is not JSON")
        return answer

    def query(self, where: IndexQuery) -> Iterator[StudyHit]:
        if not self.search_url:
            raise ConfigError(
                f'splunk_hec sink {self.key!r}: set "SearchUrl" (the management port, e.g. :8089) to query Splunk'
            )
        spl = where.to_spl(index=self.index)
        headers = self._search_auth()
        form = {"search": spl, "exec_mode": "oneshot", "output_mode": "json", "count": "0"}
        answer = self._search_call("/services/search/jobs", form, headers)
        rows = answer.get("results", []) if isinstance(answer, dict) else []
        hits = []
        for row in rows:
            uid = row.get("StudyInstanceUID")
            if isinstance(uid, str) and uid:
                try:
                    count = int(row.get("count", 0))
                except (TypeError, ValueError):
                    count = 0
                hits.append(StudyHit(uid, count))
        yield from sorted(hits)

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


def _describe(status: int | None, answer: Any) -> str:
    """The reason recorded for an event HEC rejected (``SendResult.rejected``)."""
    if isinstance(answer, dict) and "code" in answer:
        return f"{status}, code {answer['code']}: {answer.get('text', '')}"
    return f"HTTP {status}"


def _messages(answer: Any) -> str:
    """The text of a Splunk REST answer's ``messages``, on one short line."""
    msgs = answer.get("messages") if isinstance(answer, dict) else None
    if not isinstance(msgs, list):
        return ""
    text = "; ".join(str(m.get("text", "")) for m in msgs if isinstance(m, dict))
    return " ".join(text.split())[:200]
