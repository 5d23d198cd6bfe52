"""``dicomsync init`` and ``dicomsync status``."""

from __future__ import annotations

import click

from dicomsync import __version__
from dicomsync.cli.common import config_path, echo, echo_json, load_config
from dicomsync.config import Config
from dicomsync.errors import DicomSyncError
from dicomsync.places.base import PLACES


@click.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create an empty dicomsync.json here (never overwrites one)."""
    cfg = Config.init(config_path(ctx))
    echo(f"created {cfg.path}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the configuration, its places and sinks, and which kinds are available."""
    cfg = load_config(ctx)
    places = []
    for key in sorted(cfg.places):
        entry: dict[str, object] = {"key": key, "kind": cfg.places[key].get("Kind")}
        try:
            with cfg.place(key) as built:
                entry["description"] = built.describe()
                probe = built.probe()  # C-ECHO for a DICOM node
                if probe:
                    entry["probe"] = probe
        except DicomSyncError as exc:
            entry["error"] = str(exc)
        places.append(entry)
    sinks = [{"key": k, "kind": v.get("Kind")} for k, v in sorted(cfg.sinks.items())]
    kinds = PLACES.availability()
    if as_json:
        echo_json(
            {
                "version": __version__,
                "config": str(cfg.path),
                "places": places,
                "sinks": sinks,
                "place_kinds": kinds,
            }
        )
        return
    echo(f"dicomsync {__version__}, config {cfg.path}")
    echo(f"places: {len(places)}")
    for p in places:
        echo(f"  {p['key']:<16} {p.get('description') or 'error: ' + str(p.get('error'))}")
        if p.get("description") and (p.get("probe") or p.get("error")):
            echo(f"  {'':<16} {p.get('probe') or 'error: ' + str(p.get('error'))}")
    echo(f"sinks: {len(sinks)}")
    for s in sinks:
        echo(f"  {s['key']:<16} {s['kind']}")
    for kind, why in kinds.items():
        if why:
            echo(f"place kind {kind} unavailable: {why}")


def register(group: click.Group) -> None:
    group.add_command(init)
    group.add_command(status)
