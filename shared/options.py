"""One declarative description of every configuration option, and its checks and docs.

Every place kind, sink kind, route, the retry policy and the plugin's ``DicomSync``
section declares its options ONCE, as a frozen dataclass whose fields are made with
``option(...)``, next to the class that uses them::

    @dataclass(frozen=True)
    class XnatOptions:
        server: str = option("Server", "url", "the XNAT base URL", required=True)
        timeout: float = option("Timeout", "seconds", "seconds per request", default=60.0,
                                above=0)

    opts = parse(XnatOptions, section, "xnat_pre_archive place 'x'")   # typed, validated

A place or sink class names its dataclass as ``Options`` (a class attribute), which is
how ``tables()`` finds every kind through the registries.

Contract
--------
``parse(cls, section, where, problems=None)``
    The section's options as a ``cls`` instance: each value checked against its
    declared type and limits; ``null`` is the same as leaving the option out (its
    default). Raises ``ConfigError`` at the first bad option, unless ``problems`` is a
    list: then every problem is appended and the bad option takes its default (how
    ``routing.validate`` lists every problem at once). Pure: no I/O, no environment,
    thread-safe.
``declared(cls)``
    The ``Option`` records of ``cls``, in declaration order.
``tables()`` / ``write_readme(path)`` / ``python -m dicomsync.options --write README.md``
    The README's configuration tables, generated from the declarations, between
    ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->`` markers.

One error style
---------------
``<where>: option 'Name' is required (<what it is>)`` when a required option is
missing or empty, and ``<where>: Name must be <what it is>`` when a value is wrong,
where ``<what it is>`` is derived from the type and limits (``a positive number of
seconds``, ``an integer from 1 to 64``, ``true or false``, ...). ``<where>`` names the
section: ``orthanc place 'pacs'``, ``splunk_hec sink 's'``, ``Retry``,
``DicomSync.Routes[0]``.

Why a small table and not jsonschema
------------------------------------
jsonschema would be a new dependency inside Orthanc's interpreter, its messages are
generic (``'abc' is not of type 'number'``, without the section or the option's
meaning), and it knows nothing of this project's number rule (``True`` is not a number,
neither is ``NaN`` nor a 400-digit integer: ``config.is_finite_number``). The table is
smaller than the schema would be, gives messages in the project's own style, builds
the typed objects the code uses, and generates the README tables from the same records.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dicomsync.config import is_finite_number
from dicomsync.errors import ConfigError

T = TypeVar("T")

TYPES = ("str", "url", "envvar", "path", "bool", "int", "seconds", "any")
"""``str``: a non-empty string; ``url``: an http:// or https:// URL with a host;
``envvar``: an environment variable's name; ``path``: a non-empty string (the caller
resolves it); ``bool``; ``int``: an integer (``3.0`` is 3); ``seconds``: a finite
number; ``any``: a structure the owner checks itself (``Places``, ``Routes``)."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Option:
    """One option: its JSON name, type, default, limits and the help the README shows."""

    name: str
    type: str
    help: str
    default: Any = None
    required: bool = False
    low: float | None = None  # inclusive minimum
    above: float | None = None  # exclusive minimum
    high: float | None = None  # inclusive maximum
    shown: str | None = None  # the default as the docs show it, when it is computed

    def noun(self) -> str:
        """What a valid value is, for messages: ``a positive number of seconds``."""
        if self.type == "bool":
            return "true or false"
        if self.type == "url":
            return "an http:// or https:// URL"
        if self.type == "envvar":
            return "an environment variable name"
        if self.type == "path":
            return "a non-empty string, a path"
        if self.type == "int":
            if self.low is not None and self.high is not None:
                return f"an integer from {_num(self.low)} to {_num(self.high)}"
            return f"an integer >= {_num(self.low if self.low is not None else 1)}"
        if self.type == "seconds":
            if self.above == 0:
                return "a positive number of seconds"
            if self.above is not None:
                return f"a number of seconds above {_num(self.above)}"
            if self.low is not None:
                return f"a number of seconds >= {_num(self.low)}"
            return "a finite number of seconds"
        return "a non-empty string"

    def check(self, value: Any) -> Any:
        """``value`` converted (``int``, ``float``); ``ValueError`` when it is not valid."""
        t = self.type
        if t == "any":
            return value
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t in ("int", "seconds"):
            if not is_finite_number(value):
                raise ValueError
            if t == "int":
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ValueError
                    value = int(value)
            else:
                value = float(value)
            if (self.low is not None and value < self.low) or (
                self.above is not None and value <= self.above
            ):
                raise ValueError
            if self.high is not None and value > self.high:
                raise ValueError
            return value
        if not isinstance(value, str) or not value:
            raise ValueError
        if t == "url":
            parts = urlsplit(value)  # ValueError for a broken [IPv6] host
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError
        if t == "envvar" and not _ENV_NAME.fullmatch(value):
            raise ValueError
        return value

    def meaning(self) -> str:
        """The help, with the limits a reader cannot guess: ``(1 to 64)``, ``(>= 1024)``."""
        if self.high is not None:
            return f"{self.help} ({_num(self.low or 0)} to {_num(self.high)})"
        if self.type == "int" and self.low not in (None, 1):
            return f"{self.help} (>= {_num(self.low or 0)})"
        return self.help

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.required:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, str):
            return f"`{self.default}`"
        return _num(self.default)


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def option(
    name: str,
    type: str,
    help: str,
    *,
    default: Any = None,
    required: bool = False,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
    shown: str | None = None,
) -> Any:
    """A dataclass field that declares option ``name`` (see ``Option``)."""
    if type not in TYPES:
        raise ValueError(f"unknown option type {type!r}")
    record = Option(name, type, help, default, required, low, above, high, shown)
    return dataclasses.field(default=default, metadata={"option": record})


def declared(cls: type) -> tuple[Option, ...]:
    """The options ``cls`` declares, in order."""
    return tuple(f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata)


def names(cls: type) -> frozenset[str]:
    return frozenset(o.name for o in declared(cls))


def parse(
    cls: type[T],
    section: Mapping[str, Any],
    where: str,
    problems: list[str] | None = None,
) -> T:
    """``section`` checked against ``cls``'s options and built as a ``cls`` (see above)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        opt: Option | None = f.metadata.get("option")
        if opt is None:
            continue
        value = section.get(opt.name)
        if value is None or (opt.required and value == ""):
            if opt.required:
                _problem(f"{where}: option {opt.name!r} is required ({opt.noun()})", problems)
            continue
        try:
            values[f.name] = opt.check(value)
        except ValueError:
            _problem(f"{where}: {opt.name} must be {opt.noun()}", problems)
    return cls(**values)


def unknown(section: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    """The section's option names that are not in ``known``, sorted."""
    allowed = set(known)
    return sorted(str(k) for k in section if k not in allowed)


def _problem(message: str, problems: list[str] | None) -> None:
    if problems is None:
        raise ConfigError(message)
    problems.append(message)


# --- the README's tables -----------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def kind_table(rows: Iterable[tuple[str, type]], what: str) -> str:
    """A ``| kind | option | meaning | default |`` table of (kind, options class) pairs."""
    pairs = list(rows)
    kinds = ", ".join(f"`{k}`" for k, _ in pairs)
    lines = [
        "| kind | option | meaning | default |",
        "|---|---|---|---|",
        f"| all | `Kind` | the {what} kind: {kinds} | required |",
    ]
    for kind, cls in pairs:
        for o in declared(cls):
            lines.append(
                f"| `{kind}` | `{o.name}` | {_cell(o.meaning())} | {_cell(o.default_text())} |"
            )
    return "\n".join(lines)


def section_table(groups: Iterable[tuple[str, type]]) -> str:
    """A ``| option | meaning | default |`` table; each group's names get its prefix."""
    lines = ["| option | meaning | default |", "|---|---|---|"]
    for prefix, cls in groups:
        for o in declared(cls):
            lines.append(
                f"| `{prefix}{o.name}` | {_cell(o.meaning())} | {_cell(o.default_text())} |"
            )
    return "\n".join(lines)


def _kinds(registry: Any) -> list[tuple[str, type]]:
    return [(kind, registry.get(kind).Options) for kind in registry.kinds()]


def tables() -> dict[str, str]:
    """Block name -> the Markdown table generated from the declarations."""
    from dicomsync.console.dose_levels import DoseOptions
    from dicomsync.deid.options import ProfileOptions
    from dicomsync.places.base import PLACES
    from dicomsync.queue.base import RetryOptions
    from dicomsync.queue.config import QueueOptions
    from dicomsync.routing import RouteOptions, SyncOptions
    from dicomsync.sinks.base import SINKS

    return {
        "places": kind_table(_kinds(PLACES), "place"),
        "sync": section_table(
            [
                ("", SyncOptions),
                ("Routes[].", RouteOptions),
                ("Retry.", RetryOptions),
                ("Queue.", QueueOptions),
                ("Dose.", DoseOptions),
                ("Deidentify.<name>.", ProfileOptions),
            ]
        ),
        "sinks": kind_table(_kinds(SINKS), "sink"),
    }


def render(text: str, blocks: Mapping[str, str]) -> str:
    """``text`` with each ``<!-- options:NAME -->`` block replaced by ``blocks[NAME]``."""
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- options:{re.escape(name)} -->\n).*?(\n<!-- /options:{re.escape(name)} -->)",
            re.S,
        )
        text = pattern.sub(_between(body), text)
    return text


def _between(body: str) -> Callable[[re.Match[str]], str]:
    def keep_markers(m: re.Match[str]) -> str:
        return m.group(1) + body + m.group(2)

    return keep_markers


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks found in ``text``, by name."""
    found = re.finditer(r"<!-- options:([a-z]+) -->\n(.*?)\n<!-- /options:\1 -->", text, re.S)
    return {m.group(1): m.group(2) for m in found}


def write_readme(path: Path) -> bool:
    """Regenerate the blocks in ``path``; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    new = render(text, tables())
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dicomsync.options", description="the configuration tables"
    )
    parser.add_argument("--write", type=Path, help="regenerate the tables in this README")
    args = parser.parse_args(argv)
    if args.write is None:
        for name, body in tables().items():
            print(f"<!-- options:{name} -->\n{body}\n<!-- /options:{name} -->\n")
        return 0
    changed = write_readme(args.write)
    print(f"{args.write}: {'updated' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
