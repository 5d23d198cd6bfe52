"""``dicomsync deid map import|export``: the pseudonym map of a de-identification profile.

The map (original PatientID -> pseudonym) is the table a profile's ``PatientIds``
names: for the CLI in ``dicomsync-state/deid.sqlite`` beside ``dicomsync.json``;
``--database`` points at another file, such as a plugin's ``StateDirectory/queue.sqlite``
(stop Orthanc first, or import while it runs: SQLite serialises the writers). The CSV
is ``original_id,pseudonym_id[,pseudonym_name]``. The export is as sensitive as the
originals: it writes to stdout or to a new file made readable by its owner only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from dicomsync.cli.common import echo, load_config
from dicomsync.deid import CLI_MAP_FILE, CLI_STATE_DIR, PseudonymMap, profile_named
from dicomsync.errors import ConfigError
from dicomsync.pg import PgTarget


def database_options(fn: Any) -> Any:
    fn = click.option(
        "--schema",
        metavar="NAME",
        default=PgTarget.schema,  # the queue's default schema
        show_default=True,
        help="With a postgresql:// --database: the queue's schema.",
    )(fn)
    fn = click.option(
        "--password-env",
        metavar="VAR",
        help="With a postgresql:// --database: the variable holding its password.",
    )(fn)
    return click.option(
        "--database",
        metavar="FILE|URL",
        help="The map's SQLite file (default: dicomsync-state/deid.sqlite beside the "
        "config), or the plugin's PostgreSQL queue as postgresql://user@host/db.",
    )(fn)


def _map(
    ctx: click.Context,
    profile_name: str,
    database: str | None,
    password_env: str | None,
    schema: str,
) -> Any:
    cfg = load_config(ctx)
    profile = profile_named(cfg.deid_profiles(), profile_name, f"{cfg.path}: Deidentify")
    if not profile.patient_ids:
        raise ConfigError(
            f"profile {profile_name!r} has no PatientIds table: its pseudonyms are derived "
            "from the secret, there is no map"
        )
    if database and database.startswith(("postgresql://", "postgres://")):
        from dicomsync.deid.pseudonyms_pg import PgPseudonymMap
        from dicomsync.pg import PgTarget

        target = PgTarget.checked(database, password_env, schema, "--database")
        return PgPseudonymMap(target, profile.patient_ids)
    path = Path(database) if database else cfg.base_dir / CLI_STATE_DIR / CLI_MAP_FILE
    return PseudonymMap(path, profile.patient_ids)


@click.group("deid")
def deid_group() -> None:
    """De-identification: the pseudonym maps of the Deidentify profiles."""


@deid_group.group("map")
def map_group() -> None:
    """Import or export a profile's pseudonym map (CSV)."""


@map_group.command("import")
@click.argument("profile")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@database_options
@click.pass_context
def import_command(
    ctx: click.Context,
    profile: str,
    csv_file: click.File,
    database: str | None,
    password_env: str | None,
    schema: str,
) -> None:
    """Add the rows of CSV_FILE (original_id,pseudonym_id[,pseudonym_name]) to PROFILE's map.

    Patients already in the map keep their pseudonym; a pseudonym that another patient
    already has refuses the whole file."""
    pseudonyms = _map(ctx, profile, database, password_env, schema)
    try:
        added = pseudonyms.import_csv(csv_file)
    finally:
        pseudonyms.close()
    echo(f"{added} pseudonyms added to {pseudonyms.table} in {pseudonyms.path}")


@map_group.command("export")
@click.argument("profile")
@click.argument("output", required=False, type=click.Path(dir_okay=False, path_type=Path))
@database_options
@click.pass_context
def export_command(
    ctx: click.Context,
    profile: str,
    output: Path | None,
    database: str | None,
    password_env: str | None,
    schema: str,
) -> None:
    """Write PROFILE's map as CSV to OUTPUT (a new file, mode 0600) or to stdout."""
    pseudonyms = _map(ctx, profile, database, password_env, schema)
    try:
        if output is None:
            pseudonyms.export_csv(sys.stdout)
            return
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{output} exists; not overwriting it") from None
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            count = pseudonyms.export_csv(f)
    finally:
        pseudonyms.close()
    echo(f"{count} pseudonyms written to {output}", err=True)


def register(group: click.Group) -> None:
    group.add_command(deid_group)
