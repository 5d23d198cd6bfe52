"""``dicomsync place add dicom``: a DICOM node (an AE) as a place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dicomsync.cli.common import Seconds
from dicomsync.places.dicom.options import DEFAULT_ASSOCIATIONS, DEFAULT_CALLING_AET


@click.command("dicom")
@click.argument("key")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("called_aet")
@click.option(
    "--calling-aet",
    metavar="AET",
    help=f"Our AE title towards the node [default: {DEFAULT_CALLING_AET}].",
)
@click.option(
    "--associations",
    type=click.IntRange(1, 32),
    help=f"Parallel associations for C-STORE [default: {DEFAULT_ASSOCIATIONS}].",
)
@click.option("--timeout", metavar="SECONDS", type=Seconds(86400), help="Network timeout.")
@click.option("--tls", is_flag=True, help="DICOM over TLS (the certificate is verified).")
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False),
    help="CA bundle to verify the node's certificate with (with --tls).",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Our client certificate, PEM (with --tls); the key may be in the same file.",
)
@click.option(
    "--key", "key_file", type=click.Path(exists=True, dir_okay=False), help="Its private key."
)
@click.option("--key-env", metavar="VAR", help="Environment variable with the key's password.")
@click.option(
    "--retrieve",
    type=click.Choice(["get", "move"]),
    help="How instances are read from the node: C-GET [default] or C-MOVE.",
)
@click.option("--move-aet", metavar="AET", help="With --retrieve move: our AE title.")
@click.option(
    "--listen-port",
    type=click.IntRange(1, 65535),
    help="With --retrieve move: the port our Storage SCP listens on.",
)
@click.pass_context
def add_dicom(
    ctx: click.Context,
    key: str,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str | None,
    associations: int | None,
    timeout: float | None,
    tls: bool,
    ca_bundle: str | None,
    cert: str | None,
    key_file: str | None,
    key_env: str | None,
    retrieve: str | None,
    move_aet: str | None,
    listen_port: int | None,
) -> None:
    """The DICOM node CALLED_AET at HOST:PORT (C-STORE, C-FIND, C-GET/C-MOVE).

    The node must know our AE title (--calling-aet), and for --retrieve move also
    --move-aet at this machine's address and --listen-port.
    """
    from dicomsync.cli.place import save_place

    section: dict[str, Any] = {"Kind": "dicom", "Host": host, "Port": port, "CalledAet": called_aet}
    optional = {
        "CallingAet": calling_aet,
        "Associations": associations,
        "Timeout": timeout,
        "Retrieve": retrieve,
        "MoveAet": move_aet,
        "ListenPort": listen_port,
        "KeyPasswordEnv": key_env,
    }
    section.update({k: v for k, v in optional.items() if v is not None})
    if tls:
        section["Tls"] = True
    for name, path in (("CaBundle", ca_bundle), ("Cert", cert), ("Key", key_file)):
        if path:
            section[name] = str(Path(path).resolve())
    save_place(ctx, key, section)


def register(place_add_group: click.Group) -> None:
    """Attach ``dicom`` to the ``place add`` group."""
    place_add_group.add_command(add_dicom)
