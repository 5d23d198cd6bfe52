"""The ``dicomsync`` command group: global options, logging, and one-line errors.

Every error raised by a command is printed as one line, ``Error: <message>``, on
stderr with exit code 1 and no traceback (an unexpected one's traceback is logged at
debug level, shown with ``-vv``). Printed and logged text is escaped
(``dicomsync.printable``), so a name can never add a line. When the reader of our
output goes away (``dicomsync find … | head -1``) the command ends quietly with exit
code 141, as a Unix tool killed by SIGPIPE does. Command groups live in their own
modules and are attached here.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from dicomsync import __version__
from dicomsync.errors import DicomSyncError
from dicomsync.printable import PrintableFormatter, shown

log = logging.getLogger("dicomsync.cli")

#: The exit code after the reader of our output went away: 128 + SIGPIPE, what a shell
#: reports for ``yes | head -1``'s ``yes``.
EXIT_BROKEN_PIPE = 141


def error_line(exc: BaseException) -> str:
    """The one line printed for an error that ends a command."""
    if isinstance(exc, DicomSyncError):
        return f"Error: {shown(exc)}"
    if isinstance(exc, OSError):  # e.g. a --log-file in a missing folder
        text = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        return f"Error: {shown(text)}"
    return f"Error: unexpected error: {type(exc).__name__}: {shown(exc)} (-vv shows the traceback)"


def output_closed() -> int:
    """Our stdout (or stderr) pipe was closed by its reader: write nothing more, anywhere.

    Both descriptors are pointed at /dev/null, so the interpreter's last flush of the
    buffered output cannot fail again (Python would print "Exception ignored … BrokenPipeError").
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # not a real file (click's test runner), or closed
            pass
    os.close(devnull)
    return EXIT_BROKEN_PIPE


class DicomSyncGroup(click.Group):
    """A click group that turns every error into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            ctx.exit(output_closed())
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (DicomSyncError, OSError) as exc:
            click.echo(error_line(exc), err=True)
            ctx.exit(1)
        except Exception as exc:  # a bug: still one line; the traceback with -vv
            log.debug("unexpected error", exc_info=True)
            click.echo(error_line(exc), err=True)
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
    console.setFormatter(PrintableFormatter("%(name)s %(levelname)s: %(message)s"))
    console._dicomsync = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root_level = level
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(min(level, logging.INFO))
        fh.setFormatter(PrintableFormatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
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
    from dicomsync.cli import deid, find, init, place, send
    from dicomsync.cli.common import optional_module

    for module in (init, place, find, send, deid):
        module.register(cli)
    # Command groups of the plugin (queue) and tags features.
    for name in ("tags", "queue", "dose"):
        optional = optional_module(name)
        if optional is not None:
            optional.register(cli)


_attach()


def main() -> None:
    """The ``dicomsync`` console script."""
    code: Any = 0
    try:
        cli.main(prog_name="dicomsync")
    except SystemExit as exc:
        code = exc.code
    try:
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe ends quietly
    except BrokenPipeError:
        code = output_closed()
    sys.exit(code)


if __name__ == "__main__":
    main()
