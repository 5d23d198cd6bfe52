"""``dicomsync place add xnat_pre_archive``: an XNAT project's prearchive as a place."""

from __future__ import annotations

from typing import Any

import click

from dicomsync.cli.common import Seconds, tls_options, tls_section
from dicomsync.places.xnat import DEFAULT_PASSWORD_ENV, DEFAULT_TIMEOUT


@click.command("xnat_pre_archive")
@click.argument("key")
@click.argument("server")
@click.argument("project")
@click.argument("user")
@click.option(
    "--password-env",
    metavar="VAR",
    default=DEFAULT_PASSWORD_ENV,
    show_default=True,
    help="Environment variable that holds the password (the password is never stored).",
)
@click.option(
    "--timeout",
    metavar="SECONDS",
    type=Seconds(86400),
    help=f"Seconds to wait for one XNAT request, uploads included [default: {DEFAULT_TIMEOUT:g}].",
)
@tls_options
@click.pass_context
def add_xnat_pre_archive(
    ctx: click.Context,
    key: str,
    server: str,
    project: str,
    user: str,
    password_env: str,
    timeout: float | None,
    no_verify: bool,
    ca_bundle: str | None,
) -> None:
    """The prearchive of XNAT project PROJECT at SERVER, logging in as USER.

    Studies are uploaded as <subject>/<session> from the source key
    <patient>/<study>, in labels of letters, digits, '_' and '-'.
    Set the password in the environment before sending, e.g.  export XNAT_PASS=...
    """
    from dicomsync.cli.place import save_place

    section: dict[str, Any] = {
        "Kind": "xnat_pre_archive",
        "Server": server,
        "Project": project,
        "User": user,
        "PasswordEnv": password_env,
    }
    if timeout is not None:
        section["Timeout"] = timeout
    section.update(tls_section(no_verify, ca_bundle))
    save_place(ctx, key, section)


def register(place_add_group: click.Group) -> None:
    """Attach ``xnat_pre_archive`` to the ``place add`` group."""
    place_add_group.add_command(add_xnat_pre_archive)
