"""The ``dicomsync`` command group: global options, logging, and one-line errors.

Every ``DicomSyncError`` raised by a command is printed as ``Error: <message>``
on stderr with exit code 1 and no traceback. Command groups live in their own
modules and are attached here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from dicomsync import __version__
from dicomsync.errors import DicomSyncError

log = logging.getLogger("dicomsync.cli")


class DicomSyncGroup(click.Group):
    """A click group that turns dicomsync errors into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DicomSyncError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)
        except OSError as exc:  # e.g. a --log-file in a missing folder
            click.echo(f"Error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            ctx.exit(1)


def configure_logging(verbose: int, quiet: bool, log_file: Path | None) -> None:
    """Console: warnings (-v info, -vv debug, -q errors). --log-file: info and up, timestamped."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dicomsync", False):
            root.removeHandler(h)
            h.close()
    level = (
        logging.ERROR
        if quiet
        else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    )
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    console._dicomsync = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root_level = level
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(min(level, logging.INFO))
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        fh._dicomsync = True  # type: ignore[attr-defined]
        root.addHandler(fh)
        root_level = min(level, logging.INFO)
    root.setLevel(root_level)


@click.group(cls=DicomSyncGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append a timestamped log of everything done to FILE.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DICOMSYNC_CONFIG",
    help="Configuration file (default ./dicomsync.json).",
)
@click.version_option(__version__, prog_name="dicomsync")
@click.pass_context
def cli(
    ctx: click.Context, verbose: int, quiet: bool, log_file: Path | None, config_path: Path | None
) -> None:
    """Move DICOM studies between places without duplicates."""
    configure_logging(verbose, quiet, log_file)
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["quiet"] = quiet
    if log_file is not None:
        log.info("dicomsync %s: %s", __version__, " ".join(sys.argv[1:]))


def _attach() -> None:
    from dicomsync.cli import find, init, place, send
    from dicomsync.cli.common import optional_module

    for module in (init, place, find, send):
        module.register(cli)
    # Command groups of the plugin (queue) and tags features.
    for name in ("tags", "queue"):
        optional = optional_module(name)
        if optional is not None:
            optional.register(cli)


_attach()


def main() -> None:
    cli(prog_name="dicomsync")


if __name__ == "__main__":
    main()
