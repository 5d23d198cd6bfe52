"""Helpers shared by the command modules: config access, query resolution, output."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from dicomsync.config import Config, default_path
from dicomsync.errors import UnknownPlaceError
from dicomsync.places.base import Place
from dicomsync.query import StudyQuery


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


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True))


def show_progress(ctx: click.Context) -> bool:
    import sys

    obj = ctx.find_root().obj or {}
    return not obj.get("quiet") and sys.stderr.isatty()
