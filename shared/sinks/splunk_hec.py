"""``splunk_hec``: events to Splunk's HTTP Event Collector; queries through the search API.

Config (every option but ``Url`` has a default)::

    "splunk": {
      "Kind": "splunk_hec",
      "Url": "https://splunk.example.org:8088",   // HEC base URL
      "TokenEnv": "SPLUNK_HEC_TOKEN",             // env var holding the HEC token
      "Index": "dicom",                           // omitted: the token's default index
      "Source": "dicomsync", "Host": "<this host's name>",
      "Gzip": true,                               // Content-Encoding: gzip
      "BatchEvents": 500, "BatchBytes": 1000000,  // a batch ends at whichever comes first
      "Ack": false,                               // indexer acknowledgement
      "AckTimeoutSeconds": 120,
      "Retries": 6, "BackoffSeconds": 0.5, "MaxBackoffSeconds": 30,
      "TimeoutSeconds": 30,
      "VerifyTls": true, "CaBundle": "/etc/ssl/splunk-ca.pem",
      "StateFile": ".dicomsync/sinks/splunk.ledger.sqlite",
      "SearchUrl": "https://splunk.example.org:8089",   // for replicate --where
      "SearchTokenEnv": "SPLUNK_SEARCH_TOKEN",          // Bearer token, or:
      "SearchUserEnv": "SPLUNK_USER", "SearchPasswordEnv": "SPLUNK_PASSWORD"
    }

Sending: events become HEC JSON envelopes ``{"time", "host", "source", "sourcetype",
"index", "event", "fields": {"dicomsync_id", "time_source"}}`` (sourcetypes
``dicomsync:instance``, ``dicomsync:dose_report``, ``dicomsync:dose_event``),
concatenated into batches and POSTed to ``/services/collector/event`` with
``Authorization: Splunk <token>``. The token is read from the environment at each
send and never stored or logged.

Answers:

- 200 code 0: the batch is delivered (with ``Ack``: once ``/services/collector/ack``
  reports its ``ackId`` true; the channel is a GUID made per sink object and sent as
  ``X-Splunk-Request-Channel``);
- 503 (code 9 "Server is busy"), other 5xx, network errors and timeouts: retried
  with exponential backoff and jitter; after ``Retries`` attempts ``SinkRetryable``;
- 400 with ``invalid-event-number`` n and code 6/12/13: Splunk indexed the n events
  before it; they count as delivered, event n is reported in ``sink.rejected`` and
  logged, and the rest of the batch is resent;
- 401/403 (codes 1-4) and 400 code 7 (index), 10/11 (channel), 14 (ack disabled):
  ``SinkFatal`` with one clear line; undelivered events stay pending.

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
import random
import socket
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from dicomsync.config import resolve_path
from dicomsync.errors import ConfigError, SinkError, SinkFatal, SinkRetryable
from dicomsync.index_query import IndexQuery
from dicomsync.orthanc_client import short_reason
from dicomsync.sinks.base import (
    Ledger,
    Sink,
    StudyHit,
    default_state_file,
    option_bool,
    option_int,
    option_str,
    with_delivered,
)
from dicomsync.tags import Event

log = logging.getLogger(__name__)

REJECT_CODES = {6, 12, 13}  # the event itself is bad: report it, resend the rest
FATAL_400_CODES = {7, 10, 11, 14}


class SplunkHec(Sink):
    kind = "splunk_hec"
    label = "Splunk HTTP Event Collector"

    def __init__(
        self,
        key: str,
        url: str,
        *,
        state_file: Path,
        token_env: str = "SPLUNK_HEC_TOKEN",
        index: str | None = None,
        source: str = "dicomsync",
        host: str | None = None,
        use_gzip: bool = True,
        batch_events: int = 500,
        batch_bytes: int = 1_000_000,
        ack: bool = False,
        ack_timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
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
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
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
        self.counters = {"sent": 0, "retries": 0, "rejected": 0, "requests": 0}

    # --- configuration ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> SplunkHec:
        kind = cls.kind
        url = option_str(section, "Url", key, kind)
        if url is None or not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"splunk_hec sink {key!r}: option 'Url' is required (http(s)://host:8088)"
            )
        state = option_str(section, "StateFile", key, kind)
        ca = option_str(section, "CaBundle", key, kind)
        if ca is not None:
            ca_path = resolve_path(ca, base_dir)
            if not ca_path.is_file():
                raise ConfigError(f"splunk_hec sink {key!r}: CaBundle {ca_path} does not exist")
            ca = str(ca_path)
        search_url = option_str(section, "SearchUrl", key, kind)
        if search_url is not None and not search_url.startswith(("http://", "https://")):
            raise ConfigError(f"splunk_hec sink {key!r}: option 'SearchUrl' must be an http(s) URL")
        return cls(
            key,
            url,
            state_file=resolve_path(state, base_dir)
            if state
            else default_state_file(base_dir, key),
            token_env=option_str(section, "TokenEnv", key, kind, "SPLUNK_HEC_TOKEN")
            or "SPLUNK_HEC_TOKEN",
            index=option_str(section, "Index", key, kind),
            source=option_str(section, "Source", key, kind, "dicomsync") or "dicomsync",
            host=option_str(section, "Host", key, kind),
            use_gzip=option_bool(section, "Gzip", key, kind, True),
            batch_events=option_int(section, "BatchEvents", key, kind, 500),
            batch_bytes=option_int(section, "BatchBytes", key, kind, 1_000_000, minimum=1024),
            ack=option_bool(section, "Ack", key, kind, False),
            ack_timeout=_option_float(section, "AckTimeoutSeconds", key, 120.0),
            retries=option_int(section, "Retries", key, kind, 6, minimum=0),
            backoff=_option_float(section, "BackoffSeconds", key, 0.5),
            max_backoff=_option_float(section, "MaxBackoffSeconds", key, 30.0),
            timeout=_option_float(section, "TimeoutSeconds", key, 30.0),
            verify=option_bool(section, "VerifyTls", key, kind, True),
            ca_bundle=ca,
            search_url=search_url,
            search_token_env=option_str(section, "SearchTokenEnv", key, kind),
            search_user_env=option_str(section, "SearchUserEnv", key, kind),
            search_password_env=option_str(section, "SearchPasswordEnv", key, kind),
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
            "source": self.source,
            "sourcetype": event.sourcetype,
            "event": event.fields,
            "fields": {"dicomsync_id": event.id, "time_source": event.time_source},
        }
        if self.index:
            env["index"] = self.index
        return json.dumps(env, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def has(self, ids: Collection[str]) -> set[str]:
        return self.ledger.known(ids)

    def send(self, events: Sequence[Event]) -> set[str]:
        with self._lock:
            self.rejected: dict[str, str] = {}
            ids = [e.id for e in events]
            delivered = self.ledger.known(ids)
            todo = [e for e in events if e.id not in delivered]
            if not todo:
                return delivered
            token = self._token()
            pending_acks: dict[int, list[str]] = {}
            batch: list[tuple[str, bytes]] = []
            size = 0
            try:
                for event in todo:
                    data = self.envelope(event)
                    if batch and (
                        len(batch) >= self.batch_events or size + len(data) > self.batch_bytes
                    ):
                        self._post_batch(batch, token, delivered, pending_acks)
                        batch, size = [], 0
                    batch.append((event.id, data))
                    size += len(data)
                if batch:
                    self._post_batch(batch, token, delivered, pending_acks)
                if pending_acks:
                    self._wait_acks(pending_acks, token, delivered)
            except SinkError as exc:
                raise with_delivered(exc, delivered) from None
            return delivered

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

    def _sleep(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        time.sleep(delay * (0.5 + random.random() / 2))

    def _post_batch(
        self,
        batch: list[tuple[str, bytes]],
        token: str,
        delivered: set[str],
        pending_acks: dict[int, list[str]],
    ) -> None:
        pos = 0
        attempt = 0
        while pos < len(batch):
            rest = batch[pos:]
            body = b"".join(data for _, data in rest)
            if self.use_gzip:
                body = gzip.compress(body, compresslevel=5)
            status, answer, problem = self._post("/services/collector/event", body, token)
            code = answer.get("code") if isinstance(answer, dict) else None
            if status == 200 and code in (0, None):
                ids = [i for i, _ in rest]
                if self.ack:
                    ack_id = answer.get("ackId") if isinstance(answer, dict) else None
                    if not isinstance(ack_id, int):
                        raise SinkFatal(
                            f"splunk_hec {self.key!r}: Ack is on but HEC returned no ackId; "
                            'enable indexer acknowledgement on the token or set "Ack": false'
                        )
                    pending_acks[ack_id] = ids
                else:
                    self._record(ids, delivered)
                return
            if status is None or status >= 500:
                attempt += 1
                self.counters["retries"] += 1
                what = problem or _describe(status, answer)
                if attempt > self.retries:
                    raise SinkRetryable(
                        f"splunk_hec {self.key!r}: {what}; gave up after {attempt} attempts, "
                        "events kept for a later retry"
                    )
                log.info("splunk_hec %r: %s; retry %d of %d", self.key, what, attempt, self.retries)
                self._sleep(attempt)
                continue
            if status in (401, 403):
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: HEC refused the token from ${self.token_env} "
                    f"({_describe(status, answer)}); sink stopped, events kept"
                )
            bad = answer.get("invalid-event-number") if isinstance(answer, dict) else None
            if (
                status == 400
                and code in REJECT_CODES
                and isinstance(bad, int)
                and 0 <= bad < len(rest)
            ):
                indexed = [i for i, _ in rest[:bad]]
                if indexed:
                    # Splunk indexed the events before the bad one (no ackId for them).
                    self._record(indexed, delivered)
                bad_id = rest[bad][0]
                reason = _describe(status, answer)
                self.rejected[bad_id] = reason
                self.counters["rejected"] += 1
                log.warning("splunk_hec %r: event %s rejected by HEC: %s", self.key, bad_id, reason)
                pos += bad + 1
                attempt = 0
                continue
            raise SinkFatal(
                f"splunk_hec {self.key!r}: HEC refused the batch ({_describe(status, answer)})"
            )

    def _post(self, path: str, body: bytes, token: str) -> tuple[int | None, Any, str | None]:
        self.counters["requests"] += 1
        try:
            r = self._session.post(
                self.url + path,
                data=body,
                headers=self._headers(token),
                timeout=self.timeout,
                verify=self.verify,
            )
        except requests.exceptions.SSLError as exc:
            raise SinkFatal(
                f"splunk_hec {self.key!r}: TLS verification of {self.url} failed ({short_reason(exc)})"
            ) from None
        except requests.RequestException as exc:
            return None, None, f"cannot reach {self.url} ({short_reason(exc)})"
        try:
            answer = r.json()
        except ValueError:
            answer = {"text": r.text[:200]}
        return r.status_code, answer, None

    def _wait_acks(self, pending: dict[int, list[str]], token: str, delivered: set[str]) -> None:
        deadline = time.monotonic() + self.ack_timeout
        delay = 0.05
        while pending:
            body = json.dumps({"acks": sorted(pending)}).encode()
            status, answer, problem = self._post_ack(body, token)
            if status == 200 and isinstance(answer, dict) and isinstance(answer.get("acks"), dict):
                for ack_id, done in answer["acks"].items():
                    if done and int(ack_id) in pending:
                        self._record(pending.pop(int(ack_id)), delivered)
            elif status in (401, 403):
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: HEC refused the token from ${self.token_env} "
                    f"while polling acks ({_describe(status, answer)}); sink stopped, events kept"
                )
            elif status is not None and 400 <= status < 500:
                raise SinkFatal(
                    f"splunk_hec {self.key!r}: ack polling refused ({_describe(status, answer)})"
                )
            if not pending:
                return
            if time.monotonic() > deadline:
                waiting = sum(len(v) for v in pending.values())
                raise SinkRetryable(
                    f"splunk_hec {self.key!r}: {waiting} events not acknowledged within "
                    f"{self.ack_timeout:g}s ({problem or 'indexer busy'}); they will be resent"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _post_ack(self, body: bytes, token: str) -> tuple[int | None, Any, str | None]:
        headers = {
            "Authorization": f"Splunk {token}",
            "X-Splunk-Request-Channel": self.channel,
            "Content-Type": "application/json",
        }
        try:
            r = self._session.post(
                f"{self.url}/services/collector/ack?channel={self.channel}",
                data=body,
                headers=headers,
                timeout=self.timeout,
                verify=self.verify,
            )
        except requests.RequestException as exc:
            return None, None, f"cannot reach {self.url} ({short_reason(exc)})"
        try:
            return r.status_code, r.json(), None
        except ValueError:
            return r.status_code, {"text": r.text[:200]}, None

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
        try:
            r = self._session.post(
                self.search_url + path,
                data=form,
                headers=headers,
                timeout=max(self.timeout, 120.0),
                verify=self.verify,
            )
        except requests.exceptions.SSLError as exc:
            raise SinkFatal(
                f"splunk_hec {self.key!r}: TLS verification of {self.search_url} failed ({short_reason(exc)})"
            ) from None
        except requests.RequestException as exc:
            raise SinkRetryable(
                f"splunk_hec {self.key!r}: cannot reach {self.search_url} ({short_reason(exc)})"
            ) from None
        if r.status_code in (401, 403):
            raise SinkFatal(
                f"splunk_hec {self.key!r}: Splunk search refused our credentials ({r.status_code})"
            )
        if r.status_code >= 500:
            raise SinkRetryable(f"splunk_hec {self.key!r}: Splunk search failed ({r.status_code})")
        if r.status_code >= 400:
            raise SinkFatal(
                f"splunk_hec {self.key!r}: Splunk search rejected the query ({r.status_code}: {_messages(r)})"
            )
        try:
            return r.json()
        except ValueError:
            raise SinkRetryable(
                f"splunk_hec {self.key!r}: Splunk search answered non-JSON"
            ) from None

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


def _option_float(section: Mapping[str, Any], name: str, key: str, default: float) -> float:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"splunk_hec sink {key!r}: option {name!r} must be a number >= 0")
    return float(value)


def _describe(status: int | None, answer: Any) -> str:
    if isinstance(answer, dict) and "code" in answer:
        return f"{status}, code {answer['code']}: {answer.get('text', '')}"
    return f"HTTP {status}"


def _messages(r: requests.Response) -> str:
    try:
        msgs = r.json().get("messages", [])
        return "; ".join(str(m.get("text", "")) for m in msgs)[:200]
    except (ValueError, AttributeError):
        return r.text[:200]
