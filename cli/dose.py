"""``dicomsync dose report``: the console's dose page as one self-contained HTML file.

::

    dicomsync dose report --sink KEY [--since DATE] [--until DATE] --out report.html
        [--levels levels.json]

``KEY`` is an index sink of dicomsync.json (``sqlite_index`` or ``postgresql_index``);
with one index configured it may be left out. The file is written by the same code as
``/dicomsync/ui/dose`` (``dicomsync.console.dose.report``): charts drawn by Debian's
Chart.js, inlined with the stylesheet and our script, CSV exports as ``data:`` links, so
it opens offline, without Orthanc. Reference levels: dicomsync.json's ``Dose`` section
(``dicomsync.console.dose_levels``), or ``--levels FILE`` (a JSON ``Dose`` object), else
the defaults. What the reader extracted is kept in the cache folder
(``$DICOMSYNC_CACHE_DIR``), so a second report over the same index reads only what is
new. The file is written atomically. Errors are one line (``Error: …``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from dicomsync.cli.common import echo, load_config
from dicomsync.config import atomic_write_text, parse_json
from dicomsync.errors import ConfigError, UnknownSinkError


def register(cli: click.Group) -> None:
    cli.add_command(dose)


@click.group()
def dose() -> None:
    """Dose reports over an index: CTDIvol and DLP by protocol and scanner, outliers."""


@dose.command("report")
@click.option(
    "--sink", "sink_key", metavar="KEY", help="The index sink to read (default: the only index)."
)
@click.option("--since", metavar="DATE", help="First study date, YYYY-MM-DD (default: the first).")
@click.option("--until", metavar="DATE", help="Last study date, YYYY-MM-DD (default: the last).")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The HTML file to write.",
)
@click.option(
    "--levels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Reference levels: a JSON "Dose" object (default: dicomsync.json\'s, else built in).',
)
@click.pass_context
def report_cmd(
    ctx: click.Context,
    sink_key: str | None,
    since: str | None,
    until: str | None,
    out: Path,
    levels: Path | None,
) -> None:
    """Write the dose page of the index sink KEY as one HTML file that opens offline."""
    from dicomsync.console.dose import INDEX_KINDS, reader_for, report
    from dicomsync.console.dose_levels import Levels
    from dicomsync.console.dose_view import DoseFilter, parse_date
    from dicomsync.header_cache import default_cache_dir

    cfg = load_config(ctx)
    try:
        flt = DoseFilter(parse_date(since, "--since"), parse_date(until, "--until"))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    indexes = [k for k, s in sorted(cfg.sinks.items()) if s.get("Kind") in INDEX_KINDS]
    key = sink_key
    if key is None:
        if len(indexes) != 1:
            known = ", ".join(indexes) or "none"
            raise ConfigError(f"--sink is needed: name one of the index sinks ({known})")
        key = indexes[0]
    section = cfg.sink_section(key)
    if section.get("Kind") not in INDEX_KINDS:
        raise UnknownSinkError(
            f"sink {key!r} is a {section.get('Kind')} sink, not an index"
            f" (index sinks: {', '.join(indexes) or 'none'})"
        )
    if levels is not None:
        dose_section = parse_json(levels.read_text(encoding="utf-8"), str(levels))
        where = str(levels)
    else:
        dose_section, where = cfg.extra.get("Dose"), f"{cfg.path}: Dose"
    level_set = Levels.from_section(dose_section, where)
    ident = hashlib.sha256(f"{cfg.base_dir}:{key}".encode()).hexdigest()[:16]
    cache = default_cache_dir() / "dose" / f"{key[:40]}-{ident}.sqlite"
    reader = reader_for(str(section["Kind"]), section, cfg.base_dir, cache=cache, shared=False)
    try:
        html = report(reader, flt, level_set, index=key)
    finally:
        reader.close()
    atomic_write_text(out, html)
    echo(f"wrote {out} ({len(html.encode()) // 1024} KiB): index {key}, {flt.text()}")
