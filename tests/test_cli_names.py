"""Honest names: one flag name means one thing in every command, and the docs use real flags.

- A flag that several commands have takes the same value (same parameter name, metavar
  and type) in each: ``--index`` was a sink key in ``replicate`` but a Splunk index in
  ``sink add splunk_hec``; ``replicate`` now takes ``--sink KEY``, as ``index`` does.
- Turning TLS verification off is ``--no-verify`` everywhere (the queue commands had
  ``--insecure`` for the same thing).
- Every ``--flag`` the README and docs/ show after a ``dicomsync`` command is a flag of
  that command.
- A missing or unloadable sink raises ``UnknownSinkError``/``SinkKindUnavailable``, not
  the place errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from dicomsync.cli.main import cli as dicomsync_cli
from dicomsync.config import Config
from dicomsync.errors import (
    PlaceError,
    PlaceKindUnavailable,
    SinkKindUnavailable,
    UnknownPlaceError,
    UnknownSinkError,
)
from dicomsync.places.base import PLACES
from dicomsync.sinks.base import SINKS

from conftest import Cli
from orthanc_server import REPO_ROOT


def commands(group: click.Group, prefix: str = "dicomsync") -> Iterator[tuple[str, click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path)


ALL = dict(commands(dicomsync_cli))


def flags(cmd: click.Command) -> Iterator[tuple[str, click.Option]]:
    for param in cmd.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("--"):
                    yield name, param


def test_a_flag_means_the_same_in_every_command() -> None:
    seen: dict[str, tuple[str, tuple[object, ...]]] = {}
    clashes = []
    for path, cmd in ALL.items():
        for name, option in flags(cmd):
            meaning = (option.name, option.metavar, option.is_flag, option.type.name)
            first = seen.setdefault(name, (path, meaning))
            if first[1] != meaning:
                clashes.append(f"{name}: {first[0]} {first[1]} vs {path} {meaning}")
    assert not clashes, clashes


def test_turning_tls_verification_off_is_no_verify_everywhere() -> None:
    wrong = [
        f"{path} {name}"
        for path, cmd in ALL.items()
        for name, option in flags(cmd)
        if re.search(r"not verify", option.help or "", re.I) and name != "--no-verify"
    ]
    assert not wrong, wrong
    queue_commands = [p for p in ALL if p.startswith(("dicomsync queue ", "dicomsync backfill"))]
    assert queue_commands
    for path in queue_commands:
        if not isinstance(ALL[path], click.Group):
            assert "--no-verify" in dict(flags(ALL[path])), path


def _documented() -> Iterator[tuple[str, str]]:
    """(file, command line) for every ``dicomsync ...`` in README.md and docs/*.md."""
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for span in re.findall(r"`(dicomsync [^`]+)`", text):
            yield path.name, span
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("dicomsync "):
                yield path.name, line


def test_every_documented_flag_exists() -> None:
    unknown = []
    for source, line in _documented():
        words = line.split()
        command = None
        for n in range(len(words), 1, -1):
            candidate = ALL.get(" ".join(words[:n]))
            if candidate is not None:
                command = candidate
                break
        if command is None or isinstance(command, click.Group):
            continue
        known = {name for name, _ in flags(command)} | {"--help"}
        for found in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
            if found not in known:
                unknown.append(f"{source}: {found} in {line!r}")
    assert not unknown, unknown


# --- errors named for what they are about ---------------------------------------------------


def test_sink_errors_are_named_for_sinks(tmp_path: Path, cli: Cli) -> None:
    """An unknown sink, no sink at all, and a sink kind that cannot load raise sink errors;
    the same for places still raises the place errors."""
    cfg = Config.init(tmp_path / "dicomsync.json")
    for lookup in (cfg.sink_section, cfg.remove_sink):
        with pytest.raises(UnknownSinkError, match="unknown sink 'nope'"):
            lookup("nope")
    with pytest.raises(UnknownPlaceError, match="unknown place 'nope'"):
        cfg.place_section("nope")
    assert not issubclass(UnknownSinkError, PlaceError)
    assert not issubclass(SinkKindUnavailable, PlaceError)

    for registry, error in ((SINKS, SinkKindUnavailable), (PLACES, PlaceKindUnavailable)):
        registry.register("broken_kind", "dicomsync_no_such_module:Broken")
        try:
            for _ in range(2):  # the first import and the remembered reason
                with pytest.raises(error, match="broken_kind' is unavailable"):
                    registry.get("broken_kind")
            assert registry.availability()["broken_kind"]
        finally:
            registry._targets.pop("broken_kind")
            registry._missing.pop("broken_kind", None)

    r = cli("replicate", "src", "dest", "--where", "Modality=SR", ok=False)
    assert r.output.strip() == "Error: no sink is configured; add one with 'dicomsync sink add'"
