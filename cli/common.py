"""Helpers shared by the command modules: config access, query resolution, output.

Output goes through ``echo`` (and ``echo_json``), which escape every non-printable
character (``dicomsync.printable.shown``): a folder name holding a newline, ``\\r``, an
ANSI escape or U+202E prints as one line that reads as what it is.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from dicomsync.config import Config, default_path
from dicomsync.errors import DicomSyncError, UnknownPlaceError
from dicomsync.places.base import Place, StudyRef
from dicomsync.printable import json_printable, shown
from dicomsync.query import StudyQuery
from dicomsync.queue.base import RetryPolicy
from dicomsync.transfer import Summary

#: The CLI's retry policy when dicomsync.json has no ``Retry`` section: 5 attempts, waits
#: of 1-2 s, 2-4 s, 4-8 s, 8-16 s between them (``RetryPolicy.delay``: equal jitter).
CLI_RETRY = RetryPolicy(base_delay=2.0, max_delay=60.0, max_attempts=5)

log = logging.getLogger(__name__)


def echo(text: object = "", *, err: bool = False, nl: bool = True) -> None:
    """Print ``text`` as one line (``click.echo``), every non-printable character escaped."""
    click.echo(shown(text), err=err, nl=nl)


def optional_module(name: str) -> ModuleType | None:
    """Import ``dicomsync.cli.<name>`` if that module exists (command groups added by issues)."""
    full = f"dicomsync.cli.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise
        return None


def config_path(ctx: click.Context) -> Path:
    obj = ctx.find_root().obj or {}
    path: Path | None = obj.get("config_path")
    return path or default_path()


def load_config(ctx: click.Context) -> Config:
    return Config.load(config_path(ctx))


def places_for(cfg: Config, query: StudyQuery) -> Iterator[Place]:
    """The configured places whose key matches the query's place glob."""
    keys = [k for k in sorted(cfg.places) if query.matches_place(k)]
    if not keys:
        if "*" in query.place:
            return
        known = ", ".join(sorted(cfg.places)) or "none"
        raise UnknownPlaceError(f"unknown place {query.place!r} (configured: {known})")
    for key in keys:
        yield cfg.place(key)


def source_items(
    cfg: Config, query: StudyQuery, destination: str, stack: ExitStack
) -> list[tuple[Place, StudyRef]]:
    """The (place, study) pairs ``send QUERY DESTINATION`` goes over (and ``compare`` too):
    every study matching the query, in every matching place but the destination itself."""
    items: list[tuple[Place, StudyRef]] = []
    for p in places_for(cfg, query):
        if p.key == destination:
            p.close()
            continue
        stack.enter_context(p)
        items.extend((p, ref) for ref in p.studies(query))
    return items


class Seconds(click.ParamType):
    """A finite number of seconds in (0, ``maximum``]: click's FloatRange lets NaN through."""

    name = "seconds"

    def __init__(self, maximum: float = 7 * 86400) -> None:
        self.maximum = maximum

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{shown(str(value))[:40]!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or not 0 < number <= self.maximum:
            self.fail(f"must be a finite number of seconds in (0, {self.maximum:g}]", param, ctx)
        return number


def retry_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--retries N``: how often a transient failure is tried again."""
    return click.option(
        "--retries",
        type=click.IntRange(0, 100),
        metavar="N",
        help="Try a transient failure (timeout, connection error, 5xx) again up to N times "
        f"[default: {CLI_RETRY.max_attempts - 1}, or the config's Retry section].",
    )(command)


def retry_policy(cfg: Config, retries: int | None) -> RetryPolicy:
    """dicomsync.json's ``Retry`` section if it has one, else ``CLI_RETRY``; ``--retries``
    sets the number of attempts (retries + 1)."""
    section = cfg.extra.get("Retry")
    policy = CLI_RETRY if section is None else RetryPolicy.from_config(section)
    if retries is not None:
        policy = dataclasses.replace(policy, max_attempts=retries + 1)
    return policy


def no_verify_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--no-verify``: the one name of every command's "do not verify TLS" flag."""
    return click.option(
        "--no-verify", is_flag=True, help="Do not verify TLS certificates (not recommended)."
    )(command)


def tls_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--ca-bundle FILE`` and ``--no-verify``, for every kind that speaks TLS."""
    command = no_verify_option(command)
    return click.option(
        "--ca-bundle",
        type=click.Path(exists=True, dir_okay=False),
        help="CA bundle to verify the server's certificate with.",
    )(command)


def tls_section(no_verify: bool, ca_bundle: str | None) -> dict[str, Any]:
    """The config options for ``tls_options`` (verification stays on unless turned off)."""
    section: dict[str, Any] = {}
    if no_verify:
        section["VerifyTls"] = False
    if ca_bundle:
        section["CaBundle"] = str(Path(ca_bundle).resolve())
    return section


def echo_table(heading: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    """Two aligned columns under a heading and a rule, as ``place list`` prints them."""
    rows = [(shown(k), shown(d)) for k, d in rows]
    width = max([len(heading[0]), *(len(k) for k, _ in rows)])
    dwidth = max([len(heading[1]), *(len(d) for _, d in rows)])
    echo(f"{heading[0]:<{width}}  {heading[1]}")
    echo(f"{'-' * width}  {'-' * dwidth}")
    for k, d in rows:
        echo(f"{k:<{width}}  {d}")


def echo_configured(cfg: Config, what: str, as_json: bool) -> None:
    """``place list`` / ``sink list``: each configured key with its description."""
    table = cfg.places if what == "place" else cfg.sinks
    build = cfg.place if what == "place" else cfg.sink
    rows = []
    for key in sorted(table):
        try:
            with build(key) as built:
                desc = built.describe()
        except DicomSyncError as exc:
            desc = f"(unusable: {exc})"
        rows.append((key, desc))
    if as_json:
        echo_json([{"key": k, what: d, "kind": table[k]["Kind"]} for k, d in rows])
    elif not rows:
        echo(f"no {what}s configured")
    else:
        echo_table(("key", what), rows)


def echo_summary(ctx: click.Context, summary: Summary) -> None:
    """One line per sent / failed / would-be-sent study, the closing counts, exit 1 on failure."""
    for o in summary.outcomes:
        if o.status == "would_send":
            echo(f"would send {o.ref} ({o.missing} instances)")
        elif o.status == "failed":
            echo(f"failed {o.ref}: {o.error}", err=True)
        elif o.status == "sent":
            echo(f"sent {o.ref} ({o.sent} instances)")
    echo(summary.line())
    log.info("finished: %s", summary.line())
    if not summary.ok:
        ctx.exit(1)


def echo_json(data: Any) -> None:
    """Indented JSON; non-printable characters in its strings as ``\\uNNNN`` (still valid JSON)."""
    click.echo(json_printable(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)))


def show_progress(ctx: click.Context) -> bool:
    import sys

    obj = ctx.find_root().obj or {}
    return not obj.get("quiet") and sys.stderr.isatty()
