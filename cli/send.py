"""``dicomsync send``: send the studies matching a query to a place, skipping duplicates."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

import click
from click.termui import progressbar

from dicomsync.cli.common import (
    echo,
    echo_summary,
    load_config,
    retry_option,
    retry_policy,
    show_progress,
    source_items,
)
from dicomsync.query import StudyQuery
from dicomsync.transfer import StudyOutcome
from dicomsync.transfer import send as send_studies

log = logging.getLogger(__name__)


@click.command()
@click.argument("query")
@click.argument("destination")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option(
    "--deidentify",
    metavar="PROFILE",
    help="De-identify on the way out with this profile of the Deidentify section.",
)
@retry_option
@click.pass_context
def send(
    ctx: click.Context,
    query: str,
    destination: str,
    dry_run: bool,
    deidentify: str | None,
    retries: int | None,
) -> None:
    """Send every study matching QUERY to the place DESTINATION.

    Studies the destination already holds completely are skipped; partial ones get
    only their missing instances. A transient failure is tried again (--retries). One
    study's failure does not stop the others; the exit code is 1 if any study failed.
    """
    q = StudyQuery.parse(query)
    cfg = load_config(ctx)
    policy = retry_policy(cfg, retries)
    with ExitStack() as stack:
        dest = stack.enter_context(cfg.place(destination))
        if deidentify:
            from dicomsync.deid import for_config

            dest = for_config(cfg, dest, deidentify)
        items = source_items(cfg, q, destination, stack)
        log.info("sending %d studies matching %s to %s", len(items), q, destination)
        if not items:
            echo(f"no studies match {q}")
            return
        if show_progress(ctx):
            with progressbar(length=len(items), label="sending", file=sys.stderr) as bar:

                def advance(_: StudyOutcome) -> None:
                    bar.update(1)

                summary = send_studies(items, dest, dry_run=dry_run, progress=advance, retry=policy)
        else:
            summary = send_studies(items, dest, dry_run=dry_run, retry=policy)
    echo_summary(ctx, summary)


def register(group: click.Group) -> None:
    group.add_command(send)
