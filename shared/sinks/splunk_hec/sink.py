"""``SplunkHec``: the ``splunk_hec`` sink, events to Splunk's HTTP Event Collector.

Sending: events become HEC JSON envelopes ``{"time", "host", "source", "sourcetype",
"index", "event", "fields": {"dicomsync_id", "time_source"}}`` (sourcetypes
``dicomsync:instance``, ``dicomsync:dose_report``, ``dicomsync:dose_event``),
concatenated into batches and POSTed to ``/services/collector/event`` with
``Authorization: Splunk <token>``. The token is read from the environment at each
send and never stored or logged. ``source`` is the instance's origin as the event
carries it (``orthanc:<instance id>`` in the plugin, the file's path for ``dicomsync
index`` of a folder), unless ``Source`` sets one value for all.

Answers (every HTTP failure goes through ``dicomsync.http_errors`` with ``sink=True``, in
``HecChannel._request``/``_failure``):

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

The class is built in layers: ``HecChannel`` (``channel``: session, token, ledger, the
error mapping), ``HecSearch`` (``search``: ``query``), and this module's delivery:
batches, partial rejections and the ack pipeline. Options: ``options.HecOptions``.

Thread-safety: ``send``, ``submit`` and ``flush`` hold the sink's lock for the whole
delivery, so lanes sharing one sink deliver one call at a time; each call's
``SendResult`` is its own. Raises only ``SinkError`` subclasses (and ``ConfigError`` at
configuration time).
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dicomsync.config import resolve_path
from dicomsync.errors import ConfigError, SinkError, SinkFatal, SinkRetryable
from dicomsync.options import parse
from dicomsync.sinks.base import SendResult, default_state_file, with_delivered
from dicomsync.sinks.splunk_hec.channel import ACK_PATH, EVENT_PATH, _Flight
from dicomsync.sinks.splunk_hec.options import DEPRECATED, HecOptions
from dicomsync.sinks.splunk_hec.search import HecSearch
from dicomsync.tags import Event

log = logging.getLogger(__name__)

REJECT_CODES = {6, 12, 13}  # the event itself is bad: report it, resend the rest
ACK_DISABLED = 14


class SplunkHec(HecSearch):
    kind = "splunk_hec"
    label = "Splunk HTTP Event Collector"
    Options = HecOptions

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


def _describe(status: int | None, answer: Any) -> str:
    """The reason recorded for an event HEC rejected (``SendResult.rejected``)."""
    if isinstance(answer, dict) and "code" in answer:
        return f"{status}, code {answer['code']}: {answer.get('text', '')}"
    return f"HTTP {status}"
