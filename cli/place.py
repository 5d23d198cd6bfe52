"""``dicomsync place``: add, list, remove and look into places."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from dicomsync.cli.common import (
    echo,
    echo_configured,
    echo_json,
    load_config,
    optional_module,
    tls_options,
    tls_section,
)
from dicomsync.errors import ConfigError
from dicomsync.query import StudyQuery


@click.group()
def place() -> None:
    """Manage places: folders, zip folders, Orthanc servers, XNAT projects."""


@place.group()
def add() -> None:
    """Add a place of a given kind."""


def save_place(ctx: click.Context, key: str, section: dict[str, Any]) -> None:
    """Validate and store a new place section; used by every ``place add`` kind."""
    cfg = load_config(ctx)
    cfg.add_place(key, section)
    cfg.save()
    echo(f"added {section['Kind']} place {key!r}: {cfg.place(key).describe()}")


@add.command("dicom_root")
@click.argument("key")
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_context
def add_dicom_root(ctx: click.Context, key: str, path: Path) -> None:
    """A folder of DICOM files laid out as PATH/<patient>/<study>/**."""
    if not path.is_dir():
        raise ConfigError(f"folder {path} does not exist")
    save_place(ctx, key, {"Kind": "dicom_root", "Path": str(path.resolve())})


@add.command("zipped_root")
@click.argument("key")
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_context
def add_zipped_root(ctx: click.Context, key: str, path: Path) -> None:
    """A folder of zipped studies, PATH/<patient>/<study>.zip (created if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create folder {path}: {exc.strerror}") from None
    save_place(ctx, key, {"Kind": "zipped_root", "Path": str(path.resolve())})


@add.command("orthanc")
@click.argument("key")
@click.argument("url")
@click.option("--user", help="HTTP user name.")
@click.option(
    "--password-env",
    metavar="VAR",
    help="Environment variable that holds the password (never stored).",
)
@tls_options
@click.pass_context
def add_orthanc(
    ctx: click.Context,
    key: str,
    url: str,
    user: str | None,
    password_env: str | None,
    no_verify: bool,
    ca_bundle: str | None,
) -> None:
    """An Orthanc server at URL."""
    section: dict[str, Any] = {"Kind": "orthanc", "Url": url}
    if user:
        section["User"] = user
    if password_env:
        section["PasswordEnv"] = password_env
    section.update(tls_section(no_verify, ca_bundle))
    save_place(ctx, key, section)


@add.command("dicomweb")
@click.argument("key")
@click.argument("url")
@click.option("--user", help="HTTP basic-auth user (with --password-env).")
@click.option("--password-env", metavar="VAR", help="Variable that holds the password.")
@click.option("--token-env", metavar="VAR", help="Variable that holds a bearer token.")
@click.option(
    "--token-command",
    metavar="ARGV",
    help="Command that prints a bearer token, split like a shell line but run without one "
    "(e.g. 'gcloud auth print-access-token'); run again when a 401 says the token expired.",
)
@tls_options
@click.pass_context
def add_dicomweb(
    ctx: click.Context,
    key: str,
    url: str,
    user: str | None,
    password_env: str | None,
    token_env: str | None,
    token_command: str | None,
    no_verify: bool,
    ca_bundle: str | None,
) -> None:
    """A DICOMweb service at URL (QIDO-RS, WADO-RS, STOW-RS), e.g. http://host/dicom-web."""
    section: dict[str, Any] = {"Kind": "dicomweb", "Url": url}
    if user:
        section["User"] = user
    if password_env:
        section["PasswordEnv"] = password_env
    if token_env:
        section["TokenEnv"] = token_env
    if token_command:
        try:
            section["TokenCommand"] = shlex.split(token_command)
        except ValueError as exc:
            raise ConfigError(f"--token-command: {exc}") from None
    section.update(tls_section(no_verify, ca_bundle))
    save_place(ctx, key, section)


@place.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_places(ctx: click.Context, as_json: bool) -> None:
    """Show the configured places."""
    cfg = load_config(ctx)
    echo_configured(cfg, "place", as_json)


@place.command("remove")
@click.argument("key")
@click.pass_context
def remove_place(ctx: click.Context, key: str) -> None:
    """Forget a place (its data is not touched)."""
    cfg = load_config(ctx)
    cfg.remove_place(key)
    cfg.save()
    echo(f"removed place {key!r}")


@place.command("ls")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls_place(ctx: click.Context, key: str, as_json: bool) -> None:
    """List a place's studies with their StudyInstanceUID and instance count."""
    cfg = load_config(ctx)
    with cfg.place(key) as p:
        probe = p.probe()  # C-ECHO for a DICOM node: a wrong AE title is one line here
        if probe and not as_json:
            echo(probe)
        rows = []
        for ref in p.studies(StudyQuery(key)):
            ident = p.identity(ref)
            rows.append(
                {"key": ref.key, "study_uid": ident.study_uid, "instances": len(ident.sop_uids)}
            )
    if as_json:
        echo_json(rows)
        return
    echo(f"{len(rows)} studies in {key}:")
    for r in rows:
        echo(f"{r['key']}  {r['study_uid']}  {r['instances']} instances")


def register(group: click.Group) -> None:
    for name in ("xnat", "dicom"):
        module = optional_module(name)
        if module is not None:
            module.register(add)
    group.add_command(place)
