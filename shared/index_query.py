"""The index query language, and its translations to SQL (sqlite_index, postgresql_index) and SPL
(Splunk).

Used by ``dicomsync replicate --where`` to pick studies from what a sink has indexed.

Syntax::

    query      := condition ( ["AND"] condition )*
    condition  := field op value
    field      := bare-name | "double-quoted name"
    op         := "=" | "!=" | "<" | ">" | "<=" | ">="
    value      := number | "double-quoted text" | bare-text

Examples::

    Modality=SR
    SeriesDescription="Dose Record" AND StudyDate>=20240101
    "CT Dose.Mean CTDIvol">50
    Manufacturer=SIEM* AND "CT Acquisition Parameters.CT X-Ray Source Parameters{}.KVP"=140

Fields are named the way Splunk names JSON fields: nested object keys joined with
``.``, and ``{}`` after a key whose value is a list (``Sources{}.KVP``). A bare name
may contain letters, digits and ``_ . { } @ -``; anything else (spaces) needs double
quotes. Inside double quotes, ``\\"`` is a quote and ``\\\\`` a backslash.

Values:

- a bare value that looks like a number (``50``, ``-1.5``, ``1e-5``) compares as a
  number: it matches a field value that is a number or numeric text (``"50.0"``);
- anything else compares as text, case-sensitively; ``*`` in a text value is a glob
  (any run of characters) for ``=`` and ``!=``; no other character is special;
- ``<``/``>`` with text compare lexicographically.

Semantics (the same in SQLite, in PostgreSQL and in SPL, and in the HEC stand-in's search): all
conditions must hold **in the same event**; a field with several values (a list)
matches when any value matches; ``!=`` matches events that have the field and no
value equal to the given one; ``null`` values are not indexed and never match.
Dose summary and per-event events carry the study context (Modality, Manufacturer,
StudyDate, ...), so study-level and dose conditions combine in one query.

Limits: at most ``MAX_CONDITIONS`` conditions and ``MAX_LENGTH`` characters (SQLite
refuses expressions deeper than 1,000); a number must be finite (``1e999`` is refused:
quote it to compare text). The parser is a flat loop (no recursion, linear in the
text); errors quote at most the first 60 characters of the query.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dicomsync.errors import QueryError
from dicomsync.query import glob_to_regex

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
    "<=": operator.le,
    ">=": operator.ge,
}

Op = Literal["=", "!=", "<", ">", "<=", ">="]
Kind = Literal["number", "text", "glob"]
Dialect = Literal["sqlite", "postgresql"]
OPS: tuple[Op, ...] = ("!=", "<=", ">=", "=", "<", ">")

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_BARE_FIELD = re.compile(r"[A-Za-z0-9_.{}@\-]+")
_BARE_VALUE = re.compile(r"[^\s\"=<>!]+")
_WORD = re.compile(r"(?i)(AND|OR|NOT)\b")
MAX_CONDITIONS = 100
MAX_LENGTH = 10_000
USAGE = 'expected FIELD OP VALUE [AND ...], e.g. Modality=SR AND "CT Dose.Mean CTDIvol">50'


def to_number(value: Any) -> float | None:
    """A field value as a number (numbers, numeric text); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value.strip())
    return None


def value_text(value: Any) -> str:
    """A field value as the text the index stores (numbers as JSON writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def flatten_fields(obj: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(Splunk-style field name, scalar value) pairs of an event; nulls are skipped."""

    # A flat walk with its own stack, in document order: no recursion, whatever the depth.
    stack: list[Iterator[tuple[str, Any]]] = [iter([("", obj)])]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            continue
        path, value = step
        if isinstance(value, dict | list):
            stack.append(_children(path, value))
        elif value is not None:
            yield path, value


def _children(path: str, value: dict[str, Any] | list[Any]) -> Iterator[tuple[str, Any]]:
    """(field name, value) of each member of an object or list, made as they are read."""
    if isinstance(value, dict):
        return ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    return ((path + "{}", v) for v in value)


@dataclass(frozen=True)
class Condition:
    field: str
    op: Op
    value: str | float
    kind: Kind

    def matches_value(self, value: Any) -> bool:
        """Does one field value satisfy the condition (ignoring ``!=``'s negation)?"""
        op = "=" if self.op == "!=" else self.op
        if self.kind == "number":
            number = to_number(value)
            return number is not None and _COMPARE[op](number, float(self.value))
        text = value_text(value)
        if self.kind == "glob":
            return glob_to_regex(str(self.value)).match(text) is not None
        return _COMPARE[op](text, str(self.value))

    def matches(self, values: list[Any]) -> bool:
        if self.op == "!=":
            return bool(values) and not any(self.matches_value(v) for v in values)
        return any(self.matches_value(v) for v in values)


@dataclass(frozen=True)
class IndexQuery:
    """A parsed query: conditions that must all hold in one event."""

    text: str
    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, text: str) -> IndexQuery:
        return cls(text=text, conditions=tuple(_Parser(text).parse()))

    def matches(self, event_fields: dict[str, Any]) -> bool:
        """Evaluate against one event's fields (for tests and small in-memory use)."""
        flat: dict[str, list[Any]] = {}
        for path, value in flatten_fields(event_fields):
            flat.setdefault(path, []).append(value)
        return all(c.matches(flat.get(c.field, [])) for c in self.conditions)

    # --- SQL ---------------------------------------------------------------------------------
    def to_sql(self, dialect: Dialect = "sqlite") -> tuple[str, list[Any]]:
        """A WHERE expression over ``events e`` with a ``fields`` table, and its parameters.

        Schema assumed: ``fields(event, path, text, num)`` where ``event`` is
        ``events.rowid``. ``dialect``: ``"sqlite"`` (``?`` parameters, ``GLOB``) or
        ``"postgresql"`` (psycopg's ``%s`` parameters, ``LIKE`` with ``\\`` escapes, text
        compared ``COLLATE "C"``: by code point, as SQLite's BINARY does, whatever the
        database's locale).
        """
        mark = "?" if dialect == "sqlite" else "%s"
        parts: list[str] = []
        params: list[Any] = []
        for c in self.conditions:
            pred, pred_params = _sql_predicate(c, dialect)
            exists = (
                "EXISTS (SELECT 1 FROM fields f WHERE f.event = e.rowid AND f.path = "
                + mark
                + "{})"
            )
            if c.op == "!=":
                parts.append(f"({exists.format('')} AND NOT {exists.format(' AND ' + pred)})")
                params += [c.field, c.field, *pred_params]
            else:
                parts.append(exists.format(" AND " + pred))
                params += [c.field, *pred_params]
        return " AND ".join(parts) or ("1" if dialect == "sqlite" else "TRUE"), params

    # --- SPL ---------------------------------------------------------------------------------
    def to_spl(self, index: str | None = None, sourcetype: str = "dicomsync:*") -> str:
        """A Splunk search returning one row per matching StudyInstanceUID."""
        base = "search"
        if index:
            base += f" index={spl_string(index)}"
        base += f" sourcetype={spl_string(sourcetype)}"
        exprs = [_spl_condition(c) for c in self.conditions]
        where = f" | where {' AND '.join(exprs)}" if exprs else ""
        return f"{base}{where} | stats count by StudyInstanceUID"

    def __str__(self) -> str:
        return self.text


def _sql_predicate(c: Condition, dialect: Dialect = "sqlite") -> tuple[str, list[Any]]:
    op = "=" if c.op == "!=" else c.op
    if dialect == "postgresql":
        if c.kind == "number":
            return f"f.num {op} %s", [float(c.value)]
        if c.kind == "glob":
            return 'f.text LIKE %s COLLATE "C"', [_like_pattern(str(c.value))]
        return f'f.text COLLATE "C" {op} %s', [str(c.value)]
    if c.kind == "number":
        return f"f.num {op} ?", [float(c.value)]
    if c.kind == "glob":
        return "f.text GLOB ?", [_sqlite_glob(str(c.value))]
    return f"f.text {op} ?", [str(c.value)]


def _like_pattern(pattern: str) -> str:
    """Our glob (only ``*`` special) as a PostgreSQL LIKE pattern (``%``, ``_`` and the
    escape ``\\`` escaped; ``*`` becomes ``%``)."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        else:
            out.append(ch)
    return "".join(out)


def _sqlite_glob(pattern: str) -> str:
    """Our glob (only ``*`` special) as an SQLite GLOB pattern (``?`` and ``[`` escaped)."""
    out = []
    for ch in pattern:
        if ch == "?":
            out.append("[?]")
        elif ch == "[":
            out.append("[[]")
        else:
            out.append(ch)
    return "".join(out)


def spl_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def spl_field(name: str) -> str:
    if "'" in name:
        raise QueryError(f"field {name!r}: a field name with a single quote cannot be used in SPL")
    return f"'{name}'"


def _spl_number(value: float) -> str:
    return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _spl_condition(c: Condition) -> str:
    field = spl_field(c.field)
    op = "=" if c.op == "!=" else c.op
    if c.kind == "number":
        expr = f"{field}{op}{_spl_number(float(c.value))}"
    elif c.kind == "glob":
        expr = f"match({field}, {spl_string(glob_to_regex(str(c.value)).pattern)})"
    else:
        expr = f"{field}{op}{spl_string(str(c.value))}"
    if c.op == "!=":
        return f"(isnotnull({field}) AND NOT ({expr}))"
    return expr


def _clip(text: str, limit: int = 60) -> str:
    """``repr`` of at most ``limit`` characters of ``text`` (errors never echo a long query)."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


class _Parser:
    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"empty index query; {USAGE}")
        self.text = text
        self.pos = 0
        if len(text) > MAX_LENGTH:
            raise QueryError(
                f"invalid index query {_clip(text)}: longer than {MAX_LENGTH} characters"
            )

    def error(self, what: str) -> QueryError:
        return QueryError(
            f"invalid index query {_clip(self.text)}: {what} at column {self.pos + 1}"
        )

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def parse(self) -> list[Condition]:
        conditions = [self.condition()]
        while True:
            self.skip_ws()
            if self.pos >= len(self.text):
                return conditions
            word = _WORD.match(self.text, self.pos)
            if word and word.group(1).upper() == "AND":
                self.pos += 3
                self.skip_ws()
                if self.pos >= len(self.text):
                    raise self.error("expected a condition after AND")
            elif word:
                raise self.error(f"{word.group(1).upper()} is not supported (only AND)")
            if len(conditions) >= MAX_CONDITIONS:
                raise self.error(f"more than {MAX_CONDITIONS} conditions")
            conditions.append(self.condition())

    def quoted(self) -> str:
        assert self.text[self.pos] == '"'
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] in '"\\':
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == '"':
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        self.pos = start
        raise self.error("unterminated quote")

    def condition(self) -> Condition:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.error(f"expected a field; {USAGE}")
        if self.text[self.pos] == '"':
            field = self.quoted()
            if not field:
                raise self.error("empty field name")
        else:
            m = _BARE_FIELD.match(self.text, self.pos)
            if not m:
                raise self.error(f"expected a field name, found {self.text[self.pos]!r}")
            field = m.group(0)
            self.pos = m.end()
        self.skip_ws()
        op = next((o for o in OPS if self.text.startswith(o, self.pos)), None)
        if op is None:
            raise self.error(f"expected an operator (=, !=, <, >, <=, >=) after {field!r}")
        self.pos += len(op)
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.error(f"expected a value after {field!r}{op}")
        if self.text[self.pos] == '"':
            raw = self.quoted()
            kind: Kind = "glob" if "*" in raw else "text"
            value: str | float = raw
        else:
            m = _BARE_VALUE.match(self.text, self.pos)
            if not m:
                raise self.error(f"expected a value after {field!r}{op}")
            raw = m.group(0)
            self.pos = m.end()
            if _NUMBER.match(raw):
                kind, value = "number", float(raw)
                if not math.isfinite(value):
                    self.pos = m.start()
                    raise self.error(f"number {_clip(raw)} is out of range (quote it for text)")
            else:
                kind = "glob" if "*" in raw else "text"
                value = raw
        if kind == "glob" and op not in ("=", "!="):
            raise self.error(f"'*' globs work only with = and !=, not {op}")
        return Condition(field=field, op=op, value=value, kind=kind)


EVENT_COLUMNS = "id, sourcetype, time, time_source, source, body"  # of an index's events table


def event_row(row: Sequence[Any] | None) -> dict[str, Any] | None:
    """A row of ``EVENT_COLUMNS`` as ``Event.to_json()`` prints it (None for no row)."""
    if row is None:
        return None
    keys = ("id", "sourcetype", "time", "time_source", "source")
    return {**dict(zip(keys, row[:5], strict=True)), "event": json.loads(row[5])}
