"""Keep the README honest: every command is documented, every documented command exists."""

from __future__ import annotations

import re

import click

from dicomsync.cli.main import cli

from orthanc_server import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def command_paths(group: click.Group, prefix: str = "dicomsync") -> list[str]:
    paths = []
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            paths.extend(command_paths(cmd, path))
        else:
            paths.append(path)
    return paths


def test_every_command_is_in_the_readme() -> None:
    missing = [p for p in command_paths(cli) if f"`{p}" not in README and f"$ {p}" not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def test_every_documented_command_exists() -> None:
    known = set(command_paths(cli))
    groups = {p.rsplit(" ", 1)[0] for p in known}
    for match in re.finditer(r"`(dicomsync(?: [a-z_]+)+)", README):
        words = match.group(1).split()
        # The longest prefix that is a command or group must be a command.
        for n in range(len(words), 1, -1):
            candidate = " ".join(words[:n])
            if candidate in known or candidate in groups:
                break
        else:
            raise AssertionError(f"README mentions unknown command {match.group(1)!r}")


def test_readme_quick_start_is_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make run", "make test"]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
