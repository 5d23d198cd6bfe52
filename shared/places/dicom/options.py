"""The options of a ``dicom`` place section, and the TLS context they describe."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from dicomsync.errors import ConfigError
from dicomsync.options import option

DEFAULT_CALLING_AET = "DICOMSYNC"
DEFAULT_ASSOCIATIONS = 4
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_PDU = 262144
RETRIEVE_MODES = ("get", "move")


@dataclass(frozen=True)
class DicomOptions:
    """The options of a ``dicom`` place section (a DICOM node, an AE)."""

    host: str = option("Host", "str", "the DICOM node's host name or address", required=True)
    port: int = option("Port", "int", "its DICOM port", required=True, low=1, high=65535)
    called_aet: str = option("CalledAet", "str", "its AE title", required=True)
    calling_aet: str = option(
        "CallingAet", "str", "our AE title towards it", default=DEFAULT_CALLING_AET
    )
    associations: int = option(
        "Associations",
        "int",
        "parallel associations for C-STORE",
        default=DEFAULT_ASSOCIATIONS,
        low=1,
        high=32,
    )
    timeout: float = option(
        "Timeout",
        "seconds",
        "seconds for connecting and for each DIMSE answer",
        default=DEFAULT_TIMEOUT,
        above=0,
    )
    max_pdu_size: int = option(
        "MaxPduSize",
        "int",
        "the largest PDU we receive (bytes; 0: no limit)",
        default=DEFAULT_MAX_PDU,
        low=0,
    )
    tls: bool = option("Tls", "bool", "DICOM over TLS", default=False)
    verify_tls: bool = option("VerifyTls", "bool", "verify the peer's certificate", default=True)
    ca_bundle: str | None = option(
        "CaBundle", "path", "CA bundle to verify the peer with", shown="system"
    )
    cert: str | None = option("Cert", "path", "our client certificate (PEM)")
    key: str | None = option("Key", "path", "its private key (PEM)", shown="in Cert")
    key_password_env: str | None = option(
        "KeyPasswordEnv", "envvar", "environment variable holding the key's password"
    )
    retrieve: str = option(
        "Retrieve", "str", "`get` (C-GET) or `move` (C-MOVE to our own SCP)", default="get"
    )
    move_aet: str | None = option(
        "MoveAet", "str", "with `move`: the AE title the peer sends to (ours)"
    )
    listen_port: int | None = option(
        "ListenPort", "int", "with `move`: the port of our Storage SCP", low=1, high=65535
    )
    listen_address: str = option(
        "ListenAddress",
        "str",
        "with `move`: the address our Storage SCP listens on (the peer must reach it)",
        default="",
        shown="every interface",
    )
    ledger_file: str | None = option(
        "LedgerFile",
        "path",
        "what the peer acknowledged, when it answers no C-FIND",
        shown="`.dicomsync/places/<key>.ledger.sqlite`",
    )


def check(opts: DicomOptions, where: str) -> None:
    """What the declarations cannot say: AE titles, the retrieve mode's companions."""
    for name, aet in (("CalledAet", opts.called_aet), ("CallingAet", opts.calling_aet)):
        check_aet(aet, f"{where}: {name}")
    if opts.retrieve not in RETRIEVE_MODES:
        raise ConfigError(f"{where}: Retrieve must be one of {', '.join(RETRIEVE_MODES)}")
    if opts.retrieve == "move":
        if not opts.move_aet or not opts.listen_port:
            raise ConfigError(f"{where}: Retrieve move needs MoveAet and ListenPort")
        check_aet(opts.move_aet, f"{where}: MoveAet")
        if opts.tls:  # our Storage SCP for C-MOVE is plain TCP: the study would be clear
            raise ConfigError(
                f"{where}: Retrieve move cannot be used with Tls (our C-MOVE Storage SCP "
                "does not serve TLS): use Retrieve get"
            )
    if not opts.tls and (opts.cert or opts.key or opts.ca_bundle or opts.key_password_env):
        raise ConfigError(f"{where}: CaBundle, Cert, Key and KeyPasswordEnv need Tls true")


def check_aet(aet: str, where: str) -> None:
    text = aet.strip()
    if not text or len(text) > 16 or not text.isascii() or "\\" in text:
        raise ConfigError(f"{where} must be 1 to 16 ASCII characters without a backslash")
    if not all(c.isprintable() for c in text):
        raise ConfigError(f"{where} must be printable")


def key_password(opts: DicomOptions, where: str) -> str | None:
    """The client key's password from ``$KeyPasswordEnv`` (asked at the first association)."""
    if not opts.key_password_env:
        return None
    value = os.environ.get(opts.key_password_env)
    if value is None:
        raise ConfigError(f"{where}: environment variable {opts.key_password_env} is not set")
    return value


def tls_context(opts: DicomOptions, base_dir: Path, where: str) -> ssl.SSLContext:
    """The client TLS context: verification on unless ``VerifyTls`` is false."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(base_dir / opts.ca_bundle) if opts.ca_bundle else None,
        )
        if not opts.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if opts.cert:
            ctx.load_cert_chain(
                str(base_dir / opts.cert),
                str(base_dir / opts.key) if opts.key else None,
                password=key_password(opts, where),
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the TLS files: {exc}") from None
    return ctx
