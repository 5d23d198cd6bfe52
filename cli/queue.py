"""``dicomsync backfill`` and ``dicomsync queue status|jobs|retry|send``: the plugin's queue, over REST.

These talk to an Orthanc running the dicomsync plugin (its ``/dicomsync/*``
endpoints), so Orthanc's own authentication applies: ``--user`` and
``--password-env VAR`` (the password is read from that environment variable).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from dicomsync.cli.common import Seconds, echo, echo_json, no_verify_option
from dicomsync.errors import ConfigError, DicomSyncError
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.printable import shown
from dicomsync.urls import has_credentials


def _client(url: str, user: str | None, password_env: str | None, no_verify: bool) -> OrthancClient:
    if has_credentials(url):
        raise ConfigError(
            "ORTHANC_URL may not hold a user or password; use --user and --password-env"
        )
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise ConfigError(f"environment variable {password_env} is not set")
    return OrthancClient(HttpTransport(url, user, password, verify=not no_verify, timeout=600))


def _connection(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = no_verify_option(fn)
    fn = click.option(
        "--password-env", metavar="VAR", help="Environment variable holding the Orthanc password."
    )(fn)
    fn = click.option("--user", help="Orthanc user name.")(fn)
    return click.argument("orthanc_url")(fn)


def _line(name: str, d: dict[str, Any]) -> str:
    age = d.get("OldestQueuedAge")
    text = shown(
        f"{name}: {d.get('Done', 0)} done, {d.get('Queued', 0)} queued, "
        f"{d.get('Sending', 0)} sending, {d.get('Failed', 0)} failed, "
        f"{d.get('Delivered', 0)} instances delivered"
    )
    if age:
        text += f", oldest waiting {age:.0f}s"
    if d.get("LastError"):
        text += f"\n    last error: {shown(d['LastError'])}"
    return text


def _sink_line(name: str, d: dict[str, Any]) -> str:
    """One tag sink of the plugin: state, queued, failed, delivered events, last error."""
    text = shown(
        f"sink {name} ({d.get('Kind', '?')}): {d.get('State', '?')}, "
        f"{d.get('Queued', 0) + d.get('Sending', 0)} queued, {d.get('Failed', 0)} failed, "
        f"{d.get('DeliveredEvents', 0)} events delivered"
    )
    if d.get("RejectedEvents"):
        text += shown(f", {d['RejectedEvents']} rejected")
    error = d.get("Error") or d.get("LastError")
    if error:
        text += f"\n    last error: {shown(error)}"
    return text


def wait_drained(
    client: OrthancClient,
    destinations: list[str] | None,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Poll /dicomsync/status until the destinations have nothing queued or sending."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    while True:
        st: dict[str, Any] = client.get_json("/dicomsync/status")
        dests = st.get("Destinations", {})
        watched = {k: v for k, v in dests.items() if destinations is None or k in destinations}
        pending = sum(v.get("Queued", 0) + v.get("Sending", 0) for v in watched.values())
        if not quiet:
            summary = "; ".join(
                f"{k} {v.get('Done', 0)} done/{v.get('Queued', 0) + v.get('Sending', 0)} to go"
                f"/{v.get('Failed', 0)} failed"
                for k, v in watched.items()
            )
            click.echo(("\r" if tty else "") + shown(summary), nl=not tty, err=True)
        if pending == 0:
            if not quiet and tty:
                click.echo("", err=True)
            return st
        if timeout is not None and time.monotonic() - started > timeout:
            if not quiet and tty:
                click.echo("", err=True)
            raise DicomSyncError(
                f"{pending} job(s) still pending after {timeout:.0f}s", retryable=True
            )
        time.sleep(interval)


def _parse_query(items: tuple[str, ...]) -> dict[str, str] | None:
    query: dict[str, str] = {}
    for item in items:
        tag, sep, value = item.partition("=")
        if not sep or not tag:
            raise click.BadParameter(
                f"{item!r}: expected TAG=VALUE, e.g. StudyDate=20240101-", param_hint="--query"
            )
        query[tag] = value
    return query or None


def _failed(st: dict[str, Any], dest: str) -> int:
    return int(st.get("Destinations", {}).get(dest, {}).get("Failed", 0))


def register(group: click.Group) -> None:
    @group.command("backfill")
    @_connection
    @click.argument("destination")
    @click.option(
        "--since",
        metavar="DATE",
        help="Only studies Orthanc received on or after DATE (2024-05-01).",
    )
    @click.option(
        "--query",
        "query",
        multiple=True,
        metavar="TAG=VALUE",
        help="Orthanc /tools/find filter, repeatable (StudyDate=20240101-, Modality=CT).",
    )
    @click.option("--no-wait", is_flag=True, help="Return once the jobs are enqueued.")
    @click.option(
        "--timeout",
        metavar="SECONDS",
        type=Seconds(),
        help="Give up waiting after this many seconds.",
    )
    @click.pass_context
    def backfill(
        ctx: click.Context,
        orthanc_url: str,
        user: str | None,
        password_env: str | None,
        no_verify: bool,
        destination: str,
        since: str | None,
        query: tuple[str, ...],
        no_wait: bool,
        timeout: float | None,
    ) -> None:
        """Route studies already in ORTHANC_URL to DESTINATION (a place of its plugin).

        Studies already delivered unchanged are skipped at almost no cost.
        Shows progress until the destination's queue drains.
        """
        client = _client(orthanc_url, user, password_env, no_verify)
        before = _failed(client.get_json("/dicomsync/status"), destination)
        body: dict[str, Any] = {"Destination": destination}
        if since:
            body["Since"] = since
        parsed = _parse_query(query)
        if parsed:
            body["Query"] = parsed
        answer = client.post_json("/dicomsync/backfill", body)
        echo(
            f"{answer['Studies']} studies: {answer['Enqueued']} enqueued, "
            f"{answer['AlreadyQueued']} already queued, "
            f"{answer['AlreadyDelivered']} already delivered ({answer['Seconds']:.2f}s)"
        )
        if no_wait:
            return
        quiet = bool((ctx.find_root().obj or {}).get("quiet"))
        st = wait_drained(client, [destination], timeout=timeout, quiet=quiet)
        click.echo(_line(destination, st["Destinations"].get(destination, {})))
        if _failed(st, destination) > before:
            raise DicomSyncError(
                f"{_failed(st, destination) - before} job(s) failed; "
                f"see 'dicomsync queue jobs {orthanc_url} --state failed'"
            )

    @group.group("queue")
    def queue() -> None:
        """The plugin's queue in an Orthanc: status, jobs, retries, sends."""

    @queue.command("status")
    @_connection
    @click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
    @click.option("--wait", is_flag=True, help="Wait until nothing is queued or sending.")
    @click.pass_context
    def status(
        ctx: click.Context,
        orthanc_url: str,
        user: str | None,
        password_env: str | None,
        no_verify: bool,
        as_json: bool,
        wait: bool,
    ) -> None:
        """Per destination: done, queued, sending, failed, delivered instances, last error.
        Per tag sink: state, queued, failed, delivered events, last error."""
        client = _client(orthanc_url, user, password_env, no_verify)
        st = (
            wait_drained(client, None, quiet=bool((ctx.find_root().obj or {}).get("quiet")))
            if wait
            else client.get_json("/dicomsync/status")
        )
        if as_json:
            echo_json(st)
            return
        if st.get("ConfigError"):
            echo(f"configuration error: {st['ConfigError']}")
        if not st.get("Configured"):
            echo("routing is off")
            return
        workers = st.get("Workers", {})
        echo(f"workers: {'running' if workers.get('running') else 'stopped'}")
        for name, d in st.get("Destinations", {}).items():
            click.echo(_line(name, d))
        for name, d in st.get("Sinks", {}).items():
            click.echo(_sink_line(name, d))
        for study, error in st.get("Unrouted", {}).items():
            echo(f"study {study}: routing failed, retrying: {error}")

    @queue.command("jobs")
    @_connection
    @click.option("--state", type=click.Choice(["queued", "sending", "done", "failed"]))
    @click.option("--destination")
    @click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
    def jobs(
        orthanc_url: str,
        user: str | None,
        password_env: str | None,
        no_verify: bool,
        state: str | None,
        destination: str | None,
        limit: int,
        as_json: bool,
    ) -> None:
        """List jobs, most recently changed first."""
        from urllib.parse import urlencode

        client = _client(orthanc_url, user, password_env, no_verify)
        params = {
            "limit": limit,
            **({"state": state} if state else {}),
            **({"destination": destination} if destination else {}),
        }
        answer = client.get_json(f"/dicomsync/jobs?{urlencode(params)}")
        if as_json:
            echo_json(answer)
            return
        for j in answer["Jobs"]:
            extra = f" retry in {j['DueIn']:.0f}s" if j.get("DueIn") else ""
            error = f"  {j['LastError']}" if j.get("LastError") else ""
            echo(
                f"{j['Id']:>6} {j['State']:<8} {j['Destination']:<12} "
                f"{j['StudyUid'] or j['Resource']} attempts={j['Attempts']}{extra}{error}"
            )

    @queue.command("retry")
    @_connection
    @click.argument("job_ids", nargs=-1, type=int)
    @click.option("--failed", "all_failed", is_flag=True, help="Requeue every failed job.")
    @click.option("--destination", help="With --failed: only this destination's.")
    def retry(
        orthanc_url: str,
        user: str | None,
        password_env: str | None,
        no_verify: bool,
        job_ids: tuple[int, ...],
        all_failed: bool,
        destination: str | None,
    ) -> None:
        """Requeue jobs by id, or every failed job (--failed)."""
        if not job_ids and not all_failed:
            raise click.UsageError("give job ids, or --failed")
        client = _client(orthanc_url, user, password_env, no_verify)
        for job_id in job_ids:
            job = client.post_json(f"/dicomsync/jobs/{job_id}/retry", {})
            echo(f"job {job_id}: {job['State']}")
        if all_failed:
            body = {"Destination": destination} if destination else {}
            n = client.post_json("/dicomsync/retry-failed", body)["Requeued"]
            echo(f"{n} failed job(s) requeued")

    @queue.command("send")
    @_connection
    @click.argument("destination")
    @click.argument("resources", nargs=-1, required=True)
    def send(
        orthanc_url: str,
        user: str | None,
        password_env: str | None,
        no_verify: bool,
        destination: str,
        resources: tuple[str, ...],
    ) -> None:
        """Enqueue studies (Orthanc IDs or StudyInstanceUIDs) for DESTINATION."""
        client = _client(orthanc_url, user, password_env, no_verify)
        answer = client.post_json(
            "/dicomsync/send", {"Destination": destination, "Resources": list(resources)}
        )
        for j in answer["Jobs"]:
            echo(f"job {j['JobId']}: {j['Resource']} ({j['Study']}) {j['Action']}")
