"""Helpers shared by the command modules: config access, query resolution, output."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from dicomsync.config import Config, default_path
from dicomsync.errors import DicomSyncError, UnknownPlaceError
from dicomsync.places.base import Place
from dicomsync.query import StudyQuery
from dicomsync.transfer import Summary

log = logging.getLogger(__name__)


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


def tls_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--ca-bundle FILE`` and ``--no-verify``, for every kind that speaks TLS."""
    command = click.option(
        "--no-verify", is_flag=True, help="Do not verify TLS certificates (not recommended)."
    )(command)
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
    width = max([len(heading[0]), *(len(k) for k, _ in rows)])
    dwidth = max([len(heading[1]), *(len(d) for _, d in rows)])
    click.echo(f"{heading[0]:<{width}}  {heading[1]}")
    click.echo(f"{'-' * width}  {'-' * dwidth}")
    for k, d in rows:
        click.echo(f"{k:<{width}}  {d}")


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
        click.echo(f"no {what}s configured")
    else:
        echo_table(("key", what), rows)


def echo_summary(ctx: click.Context, summary: Summary) -> None:
    """One line per sent / failed / would-be-sent study, the closing counts, exit 1 on failure."""
    for o in summary.outcomes:
        if o.status == "would_send":
            click.echo(f"would send {o.ref} ({o.missing} instances)")
        elif o.status == "failed":
            click.echo(f"failed {o.ref}: {o.error}", err=True)
        elif o.status == "sent":
            click.echo(f"sent {o.ref} ({o.sent} instances)")
    click.echo(summary.line())
    log.info("finished: %s", summary.line())
    if not summary.ok:
        ctx.exit(1)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))


def show_progress(ctx: click.Context) -> bool:
    import sys

    obj = ctx.find_root().obj or {}
    return not obj.get("quiet") and sys.stderr.isatty()
