"""``HecSearch``: the query side of a ``splunk_hec`` sink, Splunk's search REST API.

Querying: ``IndexQuery.to_spl`` is run as a oneshot search
(``POST /services/search/jobs``, ``exec_mode=oneshot``, ``output_mode=json``) on
``SearchUrl``, authenticated with ``Authorization: Bearer <token>`` from
``SearchTokenEnv`` or a session key from ``/services/auth/login`` with the user and
password from ``SearchUserEnv``/``SearchPasswordEnv``.

Failures go through ``dicomsync.http_errors`` with ``sink=True``, as every other HEC
request does; an answer that is not JSON is ``SinkRetryable``; a missing search option is
``ConfigError``, an unset variable ``SinkFatal``. The session key of a login is cached on
the sink (not thread-safe: one query at a time per sink, as the CLI runs them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import requests

from dicomsync import jsonsafe
from dicomsync.errors import ConfigError, SinkFatal, SinkRetryable
from dicomsync.http_errors import status_error, transport_error
from dicomsync.index_query import IndexQuery
from dicomsync.sinks.base import StudyHit
from dicomsync.sinks.splunk_hec.channel import HecChannel


class HecSearch(HecChannel):
    """``query`` through ``SearchUrl`` (abstract: ``SplunkHec`` is the sink)."""

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


def _messages(answer: Any) -> str:
    """The text of a Splunk REST answer's ``messages``, on one short line."""
    msgs = answer.get("messages") if isinstance(answer, dict) else None
    if not isinstance(msgs, list):
        return ""
    text = "; ".join(str(m.get("text", "")) for m in msgs if isinstance(m, dict))
    return " ".join(text.split())[:200]
