"""``dicomsync tags``, ``index``, ``replicate`` and ``sink``: tag and dose events, sinks, conditional replication.

- ``tags PATH...``: print the events of files or folders, one JSON object per line;
  nothing is sent.
- ``index QUERY --sink KEY``: backfill the events of every instance of the studies
  matching a StudyQuery (any place) into a sink. The sink records what it holds, so
  a repeat run sends nothing. Events go out with ``sink.submit`` (Splunk with ``Ack``
  keeps several batches in flight while the next studies are read) and a last
  ``sink.flush``. A transient sink failure (``SinkRetryable``: busy, 5xx, timeout) is
  tried again with the same bounded policy as the plugin and ``send``
  (``dicomsync.queue.base.RetryPolicy``: dicomsync.json's ``Retry`` section, or the
  CLI's default; ``--retries N``), one warning line per failed attempt; ``SinkFatal``
  stops at once. Each event's ``source`` is the instance's file path (folders) or
  ``<place>:<patient>/<study>/<file>``.
- ``replicate SOURCE DEST --where 'QUERY' [--sink KEY]``: CopyDICOM's conditional
  replicate: the studies of SOURCE that have an event matching the index query in
  the sink KEY are sent to DEST (duplicates skipped, as ``send`` does).
- ``sink add splunk_hec|sqlite_index|postgresql_index``, ``sink list``, ``sink remove``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from dicomsync.cli.common import (
    echo,
    echo_configured,
    echo_summary,
    load_config,
    places_for,
    retry_option,
    retry_policy,
    tls_options,
    tls_section,
)
from dicomsync.config import Config
from dicomsync.errors import ConfigError, DicomFileError, SinkError, UnknownSinkError
from dicomsync.index_query import IndexQuery
from dicomsync.places.base import Place, StudyRef
from dicomsync.printable import json_printable
from dicomsync.query import StudyQuery
from dicomsync.queue.base import RetryPolicy
from dicomsync.sinks.base import (
    SendResult,
    Sink,
    delivered_before,
    rejected_before,
    with_delivered,
)
from dicomsync.tags import Event, events_from_bytes, events_from_path
from dicomsync.transfer import retry_call

log = logging.getLogger(__name__)


# --- tags ----------------------------------------------------------------------------------
def _files(paths: tuple[Path, ...]) -> Iterator[tuple[Path, bool]]:
    """(file, given explicitly) for each path; folders are walked in sorted order."""
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.name != "DICOMDIR":
                    yield f, False
        elif path.exists():
            yield path, True
        else:
            raise DicomFileError(f"{path}: no such file or folder")


@click.command("tags")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--sourcetype",
    "only",
    multiple=True,
    type=click.Choice(["instance", "dose_report", "dose_event"]),
    help="Only events of this kind (repeatable).",
)
def tags_command(paths: tuple[Path, ...], only: tuple[str, ...]) -> None:
    """Print the tag and dose events of DICOM files or folders, one JSON object per line.

    Nothing is sent. Files in folders that are not DICOM are skipped with a warning;
    a file named on the command line that is not DICOM is an error.
    """
    wanted = {f"dicomsync:{o}" for o in only}
    for path, explicit in _files(paths):
        try:
            events = events_from_path(path)
        except DicomFileError as exc:
            if explicit:
                raise
            log.warning("skipped %s", exc)
            continue
        for event in events:
            if not wanted or event.sourcetype in wanted:
                echo(
                    json_printable(json.dumps(event.to_json(), ensure_ascii=False, sort_keys=False))
                )


# --- index ---------------------------------------------------------------------------------
def _instance_last(events: list[Event]) -> list[Event]:
    """The instance event goes last: when the sink holds it, it holds the others too."""
    return [e for e in events if e.sourcetype != "dicomsync:instance"] + [
        e for e in events if e.sourcetype == "dicomsync:instance"
    ]


@click.command("index")
@click.argument("query")
@click.option("--sink", "sink_key", required=True, metavar="KEY", help="The sink to fill.")
@retry_option
@click.pass_context
def index_command(ctx: click.Context, query: str, sink_key: str, retries: int | None) -> None:
    """Send the tag and dose events of the studies matching QUERY to the sink KEY.

    QUERY is a study query, e.g. 'pacs:*' or 'my_studies:patient1/*'. Instances the
    sink already holds are not read again and nothing is sent for them. A busy or
    unreachable sink is tried again (--retries) before the command fails.
    """
    q = StudyQuery.parse(query)
    cfg = load_config(ctx)
    retry = retry_policy(cfg, retries)
    counts = {
        "studies": 0,
        "instances": 0,
        "skipped": 0,
        "events": 0,
        "rejected": 0,
        "unreadable": 0,
    }
    with ExitStack() as stack:
        sink = stack.enter_context(cfg.sink(sink_key))
        for place in places_for(cfg, q):
            stack.enter_context(place)
            for ref in place.studies(q):
                counts["studies"] += 1
                _index_study(place, ref, sink, counts, retry)
        _count(sink, sink.flush, counts, retry)  # the batches still waiting for their acks
    echo(
        f"{counts['studies']} studies, {counts['instances']} instances indexed "
        f"({counts['events']} events sent), {counts['skipped']} already in {sink_key}"
        + (f", {counts['rejected']} events rejected" if counts["rejected"] else "")
        + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
    )


def _index_study(
    place: Place, ref: StudyRef, sink: Sink, counts: dict[str, int], retry: RetryPolicy
) -> None:
    batch: list[Event] = []
    for instance in place.instances(ref):
        if sink.has([f"{instance.sop_uid}:instance"]):
            counts["skipped"] += 1
            continue
        origin = str(instance.path) if instance.path is not None else f"{ref}/{instance.name}"
        try:
            events = events_from_bytes(instance.read(), source=origin)
        except DicomFileError as exc:
            log.warning("skipped %s", exc)
            counts["unreadable"] += 1
            continue
        counts["instances"] += 1
        batch += _instance_last(events)
        if len(batch) >= 500:
            _flush(sink, batch, counts, retry)
            batch = []
    if batch:
        _flush(sink, batch, counts, retry)


def _flush(sink: Sink, batch: list[Event], counts: dict[str, int], retry: RetryPolicy) -> None:
    _count(sink, lambda: sink.submit(batch), counts, retry)


def _count(
    sink: Sink, call: Callable[[], SendResult], counts: dict[str, int], retry: RetryPolicy
) -> None:
    """Run ``call`` (a submit or the flush) with retries; count what the sink confirmed
    and print the events it refused for good."""
    try:
        result = retried(call, f"sink {sink.key!r}", retry)
    except SinkError as exc:
        counts["events"] += len(delivered_before(exc))
        raise
    counts["events"] += len(result.delivered)
    counts["rejected"] += len(result.rejected)
    for event_id, reason in result.rejected.items():
        echo(f"rejected {event_id}: {reason}", err=True)


def retried(
    call: Callable[[], SendResult],
    what: str,
    retry: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> SendResult:
    """``call()``, tried again after ``retry.delay(attempt)`` seconds while it raises a
    retryable error (``SinkRetryable``), at most ``retry.max_attempts`` times in all
    (``dicomsync.transfer.retry_call``, the CLI's one retry loop). What every attempt
    confirmed and rejected is returned (and set on the last error, as ``delivered_before``
    and ``rejected_before``)."""
    done = SendResult()

    def attempt() -> SendResult:
        nonlocal done
        try:
            return done | call()
        except SinkError as exc:
            done |= SendResult(frozenset(delivered_before(exc)), rejected_before(exc))
            with_delivered(exc, done.delivered, done.rejected)
            raise

    return retry_call(attempt, what, retry, sleep)


# --- replicate -----------------------------------------------------------------------------
def _pick_sink(cfg: Config, key: str | None) -> str:
    if key:
        return key
    if len(cfg.sinks) == 1:
        return next(iter(cfg.sinks))
    if not cfg.sinks:
        raise UnknownSinkError("no sink is configured; add one with 'dicomsync sink add'")
    raise ConfigError(
        f"several sinks are configured ({', '.join(sorted(cfg.sinks))}); choose one with --sink"
    )


@click.command("replicate")
@click.argument("source")
@click.argument("destination")
@click.option(
    "--where",
    "where",
    required=True,
    metavar="QUERY",
    help="Index query, e.g. 'Modality=SR' or '\"CT Dose.Mean CTDIvol\">50'.",
)
@click.option(
    "--sink", "sink_key", metavar="KEY", help="The sink to query (default: the only one)."
)
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option(
    "--deidentify",
    metavar="PROFILE",
    help="De-identify on the way out with this profile of the Deidentify section.",
)
@click.pass_context
def replicate_command(
    ctx: click.Context,
    source: str,
    destination: str,
    where: str,
    sink_key: str | None,
    dry_run: bool,
    deidentify: str | None,
) -> None:
    """Send the studies of SOURCE that match an index query to DESTINATION.

    SOURCE is a place key or a study query ('pacs:patient1*'). The study UIDs come
    from the sink's index (fill it with 'dicomsync index' or the plugin).
    """
    from dicomsync.transfer import send as send_studies

    where_q = IndexQuery.parse(where)
    src_q = StudyQuery.parse(source if ":" in source else f"{source}:*")
    cfg = load_config(ctx)
    with ExitStack() as stack:
        sink = stack.enter_context(cfg.sink(_pick_sink(cfg, sink_key)))
        wanted = {hit.study_uid for hit in sink.query(where_q)}
        log.info("%d studies match %s in the index", len(wanted), where_q)
        dest = stack.enter_context(cfg.place(destination))
        if deidentify:
            from dicomsync.deid import for_config

            dest = for_config(cfg, dest, deidentify)
        items: list[tuple[Place, StudyRef]] = []
        if wanted:
            for place in places_for(cfg, src_q):
                if place.key == destination:
                    continue
                stack.enter_context(place)
                for ref in place.studies(src_q):
                    if place.identity(ref).study_uid in wanted:
                        items.append((place, ref))
        if not items:
            echo(f"no studies of {src_q} match {where}")
            return
        summary = send_studies(items, dest, dry_run=dry_run)
    echo_summary(ctx, summary)


# --- sink ----------------------------------------------------------------------------------
@click.group("sink")
def sink_group() -> None:
    """Manage tag sinks: Splunk HEC, the embedded SQLite index and its PostgreSQL form."""


@sink_group.group("add")
def sink_add() -> None:
    """Add a sink of a given kind."""


def _save_sink(ctx: click.Context, key: str, section: dict[str, Any]) -> None:
    cfg = load_config(ctx)
    cfg.add_sink(key, section)
    cfg.save()
    with cfg.sink(key) as sink:
        echo(f"added {section['Kind']} sink {key!r}: {sink.describe()}")


@sink_add.command("splunk_hec")
@click.argument("key")
@click.argument("url")
@click.option(
    "--token-env",
    default="SPLUNK_HEC_TOKEN",
    show_default=True,
    metavar="VAR",
    help="Environment variable that holds the HEC token (never stored).",
)
@click.option("--index", "index", metavar="INDEX", help="Splunk index (default: the token's).")
@tls_options
@click.option("--ack", is_flag=True, help="Use indexer acknowledgement.")
@click.option(
    "--search-url", metavar="URL", help="Splunk management URL (:8089) for replicate --where."
)
@click.option("--search-token-env", metavar="VAR", help="Environment variable with a search token.")
@click.pass_context
def add_splunk_hec(
    ctx: click.Context,
    key: str,
    url: str,
    token_env: str,
    index: str | None,
    ca_bundle: str | None,
    no_verify: bool,
    ack: bool,
    search_url: str | None,
    search_token_env: str | None,
) -> None:
    """A Splunk HTTP Event Collector at URL (e.g. https://splunk:8088)."""
    section: dict[str, Any] = {"Kind": "splunk_hec", "Url": url, "TokenEnv": token_env}
    if index:
        section["Index"] = index
    section.update(tls_section(no_verify, ca_bundle))
    if ack:
        section["Ack"] = True
    if search_url:
        section["SearchUrl"] = search_url
    if search_token_env:
        section["SearchTokenEnv"] = search_token_env
    _save_sink(ctx, key, section)


@sink_add.command("sqlite_index")
@click.argument("key")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def add_sqlite_index(ctx: click.Context, key: str, path: Path) -> None:
    """The embedded index in the SQLite file PATH (created if missing)."""
    _save_sink(ctx, key, {"Kind": "sqlite_index", "Path": str(path.resolve())})


@sink_add.command("postgresql_index")
@click.argument("key")
@click.argument("url")
@click.option(
    "--password-env",
    metavar="VAR",
    help="Environment variable that holds the database password (never stored).",
)
@click.option("--schema", metavar="NAME", help="Schema of the index tables (dicomsync_index).")
@click.pass_context
def add_postgresql_index(
    ctx: click.Context, key: str, url: str, password_env: str | None, schema: str | None
) -> None:
    """The index in PostgreSQL at URL (postgresql://USER@HOST:PORT/DB, no password)."""
    section: dict[str, Any] = {"Kind": "postgresql_index", "Url": url}
    if password_env:
        section["PasswordEnv"] = password_env
    if schema:
        section["Schema"] = schema
    _save_sink(ctx, key, section)


@sink_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_sinks(ctx: click.Context, as_json: bool) -> None:
    """Show the configured sinks."""
    cfg = load_config(ctx)
    echo_configured(cfg, "sink", as_json)


@sink_group.command("remove")
@click.argument("key")
@click.pass_context
def remove_sink(ctx: click.Context, key: str) -> None:
    """Forget a sink (its index file or Splunk data is not touched)."""
    cfg = load_config(ctx)
    cfg.remove_sink(key)
    cfg.save()
    echo(f"removed sink {key!r}")


def register(group: click.Group) -> None:
    """Attach ``tags``, ``index``, ``replicate`` and ``sink`` to the main group."""
    for command in (tags_command, index_command, replicate_command, sink_group):
        group.add_command(command)
