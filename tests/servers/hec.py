"""A protocol-faithful Splunk HTTP Event Collector (HEC) stand-in, plus a minimal search API.

Splunk cannot be installed here, so the ``splunk_hec`` sink is tested against this
server, built from Splunk's documented HEC protocol ("Format events for HTTP Event
Collector", "HTTP Event Collector REST API endpoints", "About HTTP Event Collector
Indexer Acknowledgment", and the HEC status-code table):

Event endpoint: ``POST /services/collector/event`` (also ``/services/collector`` and
``/services/collector/event/1.0``)
    - Auth: ``Authorization: Splunk <token>``. No header: 401 code 2 "Token is required";
      a header that is not ``Splunk <token>``: 401 code 3 "Invalid authorization"; an
      unknown token: 403 code 4 "Invalid token"; a disabled token: 403 code 1 "Token
      disabled".
    - Body: concatenated JSON event envelopes (``{...}{...}``, white space allowed
      between them); ``Content-Encoding: gzip`` is honoured. Empty body: 400 code 5 "No
      data". A malformed envelope at position *n* (0-based): 400 code 6 "Invalid data
      format" with ``"invalid-event-number": n``; no ``event`` key: code 12 "Event field
      is required"; an empty event: code 13 "Event field cannot be blank"; an index the
      token may not write: code 7 "Incorrect index". As Splunk does, **the events before
      the bad one are indexed**.
    - Ack (token with ``useACK``): the channel comes from ``X-Splunk-Request-Channel`` or
      ``?channel=``; missing: 400 code 10 "Data channel is missing"; not a GUID: 400 code
      11 "Invalid data channel". Success answers carry ``"ackId"`` (per channel, from 0).
      A token with indexer acknowledgement *disabled* (``use_ack=False``, Splunk's
      default) accepts a channel and ignores it: its success answers carry no
      ``ackId``, whether or not the client sent a channel.
    - Success: 200 ``{"text": "Success", "code": 0}``.
    - Codes 8 (500 "Internal server error") and 9 (503 "Server is busy") are injected
      by tests (``busy(n)``, ``fail(n)``), as is ``reject_when`` (events the server calls
      invalid, code 6, to exercise partial batches).

``POST /services/collector/ack?channel=<GUID>`` with ``{"acks": [ids]}`` answers
``{"acks": {"<id>": true|false}}``, for any number of ids in one request. As Splunk
does, an ackId answered ``true`` is then dropped: asking for it again answers
``false``, as for an unknown id. A token with ack disabled gets 400 code 14 "ACK is
disabled"; a missing or malformed channel 400 code 10/11. Tests delay the
acknowledgement with ``ack_after_polls`` (polls that answer false first) and
``ack_delay`` (seconds after the batch was accepted, the indexing latency).
``GET /services/collector/health`` answers 200 code 17 "HEC is healthy".

Search (management port semantics, same server here):
    ``POST /services/auth/login`` (form ``username``, ``password``, ``output_mode=json``)
        -> ``{"sessionKey": ...}``; 401 with Splunk's ``messages`` shape otherwise.
    ``POST /services/search/jobs`` with ``exec_mode=oneshot`` and
    ``POST /services/search/jobs/export`` (``output_mode=json``; one JSON object per
    line, ``{"preview": false, "offset": n, "result": {...}}``). Auth:
    ``Authorization: Splunk <sessionKey>`` or ``Bearer <token>``.

    Only the SPL that ``dicomsync.index_query.IndexQuery.to_spl`` writes is understood:
    ``search index="I" sourcetype="S*" [| where EXPR] | stats count by FIELD``, where
    EXPR is ``AND``/``NOT``/parentheses over ``'field' OP literal`` (``= != < > <= >=``),
    ``match('field', "regex")`` and ``isnotnull('field')``. Fields are extracted from
    the event JSON the way Splunk's JSON extraction names them (``a.b``, ``list{}.c``)
    plus ``index``, ``sourcetype``, ``source``, ``host``; a multivalue field satisfies
    a comparison when any value does (real Splunk's ``where`` on multivalue fields may
    differ); a number literal matches only numeric values; a quoted literal compares as text.
    Anything else answers 400 "Unknown search command". Nothing is time-bounded.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CODES: dict[int, tuple[int, str]] = {
    0: (200, "Success"),
    1: (403, "Token disabled"),
    2: (401, "Token is required"),
    3: (401, "Invalid authorization"),
    4: (403, "Invalid token"),
    5: (400, "No data"),
    6: (400, "Invalid data format"),
    7: (400, "Incorrect index"),
    8: (500, "Internal server error"),
    9: (503, "Server is busy"),
    10: (400, "Data channel is missing"),
    11: (400, "Invalid data channel"),
    12: (400, "Event field is required"),
    13: (400, "Event field cannot be blank"),
    14: (400, "ACK is disabled"),
    17: (200, "HEC is healthy"),
}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass
class Token:
    value: str
    indexes: tuple[str, ...] = ()  # empty: any index
    default_index: str = "main"
    use_ack: bool = False
    disabled: bool = False


@dataclass
class HecState:
    tokens: dict[str, Token] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    search_tokens: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)  # indexed envelopes
    requests: list[tuple[str, int]] = field(default_factory=list)  # (path, status)
    bodies: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes after gunzip)
    busy_left: int = 0
    fail_left: int = 0
    reject_when: Callable[[dict[str, Any]], bool] | None = None
    ack_after_polls: int = 0
    ack_delay: float = 0.0
    # channel -> ackId -> [polls so far, time.monotonic() when the batch was accepted]
    channels: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    next_ack: dict[str, int] = field(default_factory=dict)
    searches: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HecServer:
    """Start with ``HecServer(tokens=[Token("t")]).start()``; ``.url``; ``.stop()``."""

    def __init__(
        self, tokens: list[Token] | None = None, users: dict[str, str] | None = None
    ) -> None:
        self.state = HecState()
        for t in tokens or []:
            self.state.tokens[t.value] = t
        self.state.users.update(users or {})
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> HecServer:
        state = self.state

        class Handler(_Handler):
            pass

        Handler.state = state
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hec", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- test hooks --------------------------------------------------------------------------
    def busy(self, n: int) -> None:
        """Answer the next ``n`` event requests with 503 code 9."""
        with self.state.lock:
            self.state.busy_left = n

    def fail(self, n: int) -> None:
        """Answer the next ``n`` event requests with 500 code 8."""
        with self.state.lock:
            self.state.fail_left = n

    def reset(self) -> None:
        with self.state.lock:
            self.state.events.clear()
            self.state.requests.clear()
            self.state.bodies.clear()
            self.state.busy_left = self.state.fail_left = 0
            self.state.reject_when = None
            self.state.ack_after_polls = 0
            self.state.ack_delay = 0.0
            self.state.channels.clear()
            self.state.next_ack.clear()
            self.state.searches.clear()

    def event_ids(self) -> list[str]:
        """``fields.dicomsync_id`` of every indexed event, in arrival order (repeats kept)."""
        with self.state.lock:
            return [str((e.get("fields") or {}).get("dicomsync_id")) for e in self.state.events]


class _Handler(BaseHTTPRequestHandler):
    state: HecState
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out separately: avoid 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            data = gzip.decompress(data)
        return data

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        # Logged before answering: a client that has its answer sees its request logged.
        with self.state.lock:
            self.state.requests.append((urlsplit(self.path).path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _code(self, code: int, **extra: Any) -> None:
        status, text = CODES[code]
        self._send(status, {"text": text, "code": code, **extra})

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/services/collector/health":
            self._code(17)
        else:
            self._send(
                404, {"text": "The requested URL was not found on this server.", "code": 404}
            )

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")
        query = parse_qs(parts.query)
        try:
            body = self._body()
        except (OSError, gzip.BadGzipFile, EOFError):
            self._code(6)
            return
        with self.state.lock:
            self.state.bodies.append((path, len(body)))
        if path in (
            "/services/collector",
            "/services/collector/event",
            "/services/collector/event/1.0",
        ):
            self._events(body, query)
        elif path == "/services/collector/ack":
            self._ack(body, query)
        elif path == "/services/auth/login":
            self._login(body)
        elif path in ("/services/search/jobs", "/services/search/jobs/export"):
            self._search(body, export=path.endswith("export"))
        else:
            self._send(
                404, {"text": "The requested URL was not found on this server.", "code": 404}
            )

    # --- HEC ---------------------------------------------------------------------------------
    def _token(self) -> Token | None:
        header = self.headers.get("Authorization")
        if header is None:
            self._code(2)
            return None
        scheme, _, value = header.partition(" ")
        if scheme != "Splunk" or not value.strip():
            self._code(3)
            return None
        token = self.state.tokens.get(value.strip())
        if token is None:
            self._code(4)
            return None
        if token.disabled:
            self._code(1)
            return None
        return token

    def _channel(self, query: dict[str, list[str]]) -> str | None:
        return self.headers.get("X-Splunk-Request-Channel") or next(
            iter(query.get("channel") or []), None
        )

    def _events(self, body: bytes, query: dict[str, list[str]]) -> None:
        token = self._token()
        if token is None:
            return
        channel = self._channel(query)
        if token.use_ack:
            if not channel:
                self._code(10)
                return
            if not _GUID.match(channel):
                self._code(11)
                return
        with self.state.lock:
            if self.state.busy_left > 0:
                self.state.busy_left -= 1
                busy = True
            else:
                busy = False
            if not busy and self.state.fail_left > 0:
                self.state.fail_left -= 1
                fail = True
            else:
                fail = False
        if busy:
            self._code(9)
            return
        if fail:
            self._code(8)
            return
        text = body.decode("utf-8", "replace")
        if not text.strip():
            self._code(5)
            return
        decoder = json.JSONDecoder()
        pos, n, accepted = 0, 0, []
        error: tuple[int, int] | None = None
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            try:
                envelope, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                error = (6, n)
                break
            code = self._check(envelope, token)
            if code:
                error = (code, n)
                break
            envelope.setdefault("index", token.default_index)
            accepted.append(envelope)
            n += 1
        with self.state.lock:
            self.state.events.extend(accepted)  # events before a bad one are indexed
            ack_id = None
            if token.use_ack and channel and not error:
                ack_id = self.state.next_ack.get(channel, 0)
                self.state.next_ack[channel] = ack_id + 1
                self.state.channels.setdefault(channel, {})[ack_id] = [0, time.monotonic()]
        if error:
            self._code(error[0], **{"invalid-event-number": error[1]})
        elif ack_id is not None:
            self._code(0, ackId=ack_id)
        else:
            self._code(0)

    def _check(self, envelope: Any, token: Token) -> int:
        if not isinstance(envelope, dict):
            return 6
        if "event" not in envelope:
            return 12
        if envelope["event"] in ("", {}, None):
            return 13
        index = envelope.get("index")
        if index is not None and token.indexes and index not in token.indexes:
            return 7
        reject = self.state.reject_when
        if reject is not None and reject(envelope):
            return 6
        return 0

    def _ack(self, body: bytes, query: dict[str, list[str]]) -> None:
        token = self._token()
        if token is None:
            return
        if not token.use_ack:
            self._code(14)
            return
        channel = self._channel(query)
        if not channel:
            self._code(10)
            return
        if not _GUID.match(channel):
            self._code(11)
            return
        try:
            asked = json.loads(body.decode() or "{}").get("acks", [])
            asked = [int(a) for a in asked]
        except (ValueError, AttributeError, TypeError):
            self._code(6)
            return
        out: dict[str, bool] = {}
        now = time.monotonic()
        with self.state.lock:
            pending = self.state.channels.get(channel, {})
            for a in asked:
                entry = pending.get(a)
                if entry is None:  # unknown, or already answered true: Splunk says false
                    out[str(a)] = False
                    continue
                entry[0] += 1
                done = entry[0] > self.state.ack_after_polls and (
                    now - entry[1] >= self.state.ack_delay
                )
                out[str(a)] = done
                if done:
                    del pending[a]
        self._send(200, {"acks": out})

    # --- search ------------------------------------------------------------------------------
    def _login(self, body: bytes) -> None:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        user, password = form.get("username", ""), form.get("password", "")
        if not user or self.state.users.get(user) != password:
            self._send(401, {"messages": [{"type": "WARN", "text": "Login failed"}]})
            return
        key = uuid.uuid4().hex
        with self.state.lock:
            self.state.sessions.add(key)
        self._send(200, {"sessionKey": key})

    def _search_auth(self) -> bool:
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        value = value.strip()
        ok = (scheme == "Splunk" and value in self.state.sessions) or (
            scheme == "Bearer" and value in self.state.search_tokens
        )
        if not ok:
            self._send(
                401, {"messages": [{"type": "WARN", "text": "call not properly authenticated"}]}
            )
        return ok

    def _search(self, body: bytes, *, export: bool) -> None:
        if not self._search_auth():
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        spl = form.get("search", "")
        if not export and form.get("exec_mode") != "oneshot":
            self._send(
                400,
                {"messages": [{"type": "FATAL", "text": "only exec_mode=oneshot is supported"}]},
            )
            return
        if form.get("output_mode") != "json":
            self._send(
                400, {"messages": [{"type": "FATAL", "text": "only output_mode=json is supported"}]}
            )
            return
        with self.state.lock:
            self.state.searches.append(spl)
            events = list(self.state.events)
        try:
            rows = run_spl(spl, events)
        except SplError as exc:
            self._send(400, {"messages": [{"type": "FATAL", "text": str(exc)}]})
            return
        if export:
            lines = [
                json.dumps(
                    {
                        "preview": False,
                        "offset": i,
                        "lastrow": i == len(rows) - 1 or None,
                        "result": r,
                    }
                )
                for i, r in enumerate(rows)
            ]
            self._send(200, ("\n".join(lines) + "\n").encode(), "application/json")
        else:
            self._send(
                200,
                {"preview": False, "init_offset": 0, "messages": [], "fields": [], "results": rows},
            )


# --- a tiny SPL evaluator ------------------------------------------------------------------------
class SplError(Exception):
    pass


def extract_fields(envelope: dict[str, Any]) -> dict[str, list[Any]]:
    """Splunk-style field extraction of one indexed envelope."""
    out: dict[str, list[Any]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, path + "{}")
        elif value is not None:
            out.setdefault(path, []).append(value)

    event = envelope.get("event")
    if isinstance(event, dict):
        walk(event, "")
    for meta in ("index", "sourcetype", "source", "host"):
        if envelope.get(meta) is not None:
            out[meta] = [envelope[meta]]
    for k, v in (envelope.get("fields") or {}).items():
        out.setdefault(k, []).append(v)
    return out


_TOKEN = re.compile(
    r"""\s*(?:(?P<field>'(?:[^'\\]|\\.)*')|(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<op>!=|<=|>=|=|<|>)|(?P<paren>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""",
    re.VERBOSE,
)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m:
            raise SplError(f"Error in 'where' command: cannot parse at {expr[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(str(v))
    except ValueError:
        return None


def _compare(left: Any, op: str, right: float) -> bool:
    """A numeric literal: the value must be numeric too (else no match)."""
    a = _num(left)
    if a is None:
        return False
    b = right
    return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def _compare_text(a: str, op: str, b: str) -> bool:
    return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


class _Where:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise SplError("Error in 'where' command: unexpected end")
        self.i += 1
        return tok

    def parse(self) -> Callable[[dict[str, list[Any]]], bool]:
        node = self.conj()
        if self.peek() is not None:
            raise SplError(f"Error in 'where' command: unexpected {self.peek()}")
        return node

    def conj(self) -> Callable[[dict[str, list[Any]]], bool]:
        parts = [self.unary()]
        while self.peek() == ("word", "AND"):
            self.take()
            parts.append(self.unary())
        return lambda f: all(p(f) for p in parts)

    def unary(self) -> Callable[[dict[str, list[Any]]], bool]:
        tok = self.peek()
        if tok == ("word", "NOT"):
            self.take()
            inner = self.unary()
            return lambda f: not inner(f)
        if tok == ("paren", "("):
            self.take()
            inner = self.conj()
            if self.take() != ("paren", ")"):
                raise SplError("Error in 'where' command: expected )")
            return inner
        if tok is not None and tok[0] == "word" and tok[1] in ("match", "isnotnull"):
            self.take()
            if self.take() != ("paren", "("):
                raise SplError("Error in 'where' command: expected (")
            kind, name = self.take()
            if kind != "field":
                raise SplError("Error in 'where' command: expected a field")
            field_name = _unescape(name)
            if tok[1] == "isnotnull":
                if self.take() != ("paren", ")"):
                    raise SplError("Error in 'where' command: expected )")
                return lambda f: bool(f.get(field_name))
            if self.take() != ("paren", ","):
                raise SplError("Error in 'where' command: expected ,")
            kind, regex = self.take()
            if kind != "string" or self.take() != ("paren", ")"):
                raise SplError("Error in 'where' command: match needs a string")
            pattern = re.compile(_unescape(regex))
            return lambda f: any(pattern.search(str(v)) for v in f.get(field_name, []))
        kind, name = self.take()
        if kind != "field":
            raise SplError(f"Error in 'where' command: expected a field, got {name!r}")
        field_name = _unescape(name)
        kind, op = self.take()
        if kind != "op":
            raise SplError("Error in 'where' command: expected an operator")
        kind, lit = self.take()
        if kind == "string":  # a quoted literal compares as text
            text = _unescape(lit)
            return lambda f: any(_compare_text(str(v), op, text) for v in f.get(field_name, []))
        if kind == "number":
            value = float(lit)
        else:
            raise SplError("Error in 'where' command: expected a literal")
        return lambda f: any(_compare(v, op, value) for v in f.get(field_name, []))


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$", re.IGNORECASE
    )


def run_spl(spl: str, envelopes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the SPL subset described in the module docstring."""
    stages = [
        s.strip()
        for s in re.split(r"\|(?=(?:[^\"']|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')*$)", spl)
    ]
    if not stages or not stages[0].startswith("search "):
        raise SplError("Unknown search command: the search must start with 'search'")
    terms = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', stages[0][len("search ") :])
    filters = []
    for name, value in terms:
        if name not in ("index", "sourcetype"):
            raise SplError(f"Unknown search term {name!r}")
        text = _unescape(value) if value.startswith('"') else value
        filters.append((name, _wildcard(text)))
    rows = [extract_fields(e) for e in envelopes]
    rows = [r for r in rows if all(any(p.match(str(v)) for v in r.get(n, [])) for n, p in filters)]
    out: list[dict[str, Any]] = []
    for stage in stages[1:]:
        if stage.startswith("where "):
            predicate = _Where(_tokens(stage[len("where ") :])).parse()
            rows = [r for r in rows if predicate(r)]
        elif m := re.fullmatch(r"stats count by (\w+)", stage):
            by = m.group(1)
            counts: dict[str, int] = {}
            for r in rows:
                for v in r.get(by, [])[:1]:
                    counts[str(v)] = counts.get(str(v), 0) + 1
            out = [{by: k, "count": str(n)} for k, n in sorted(counts.items())]
            return out
        else:
            raise SplError(f"Unknown search command {stage.split(' ')[0]!r}")
    return [{k: (v[0] if len(v) == 1 else v) for k, v in r.items()} for r in rows]
