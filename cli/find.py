"""``dicomsync find`` and ``dicomsync compare``."""

from __future__ import annotations

import click

from dicomsync.cli.common import echo_json, load_config, places_for
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import StudyRef
from dicomsync.query import StudyQuery


@click.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def find(ctx: click.Context, query: str, as_json: bool) -> None:
    """Show the studies matching QUERY, <place>:<patient>/<study> ('*' matches anything)."""
    q = StudyQuery.parse(query)
    cfg = load_config(ctx)
    refs: list[StudyRef] = []
    for p in places_for(cfg, q):
        with p:
            refs.extend(p.studies(q))
    refs.sort(key=str)
    if as_json:
        echo_json(
            [{"place": r.place, "patient": r.patient, "study": r.study, "key": r.key} for r in refs]
        )
        return
    click.echo(f"found {len(refs)}:")
    for r in refs:
        click.echo(str(r))


def _identities(ctx: click.Context, text: str) -> dict[str, tuple[str, StudyIdentity]]:
    """StudyInstanceUID -> (ref text, identity) for every study matching ``text``."""
    q = StudyQuery.parse(text if ":" in text else f"{text}:*")
    cfg = load_config(ctx)
    out: dict[str, tuple[str, StudyIdentity]] = {}
    for p in places_for(cfg, q):
        with p:
            for ref in p.studies(q):
                ident = p.identity(ref)
                if ident.sop_uids:
                    out[ident.study_uid] = (str(ref), ident)
    return out


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def compare(ctx: click.Context, a: str, b: str, as_json: bool) -> None:
    """Compare two places (or queries) by content: only in A, in both, only in B.

    A study is "in both" when B holds every SOP instance of it; "partial" when B
    holds some.
    """
    left, right = _identities(ctx, a), _identities(ctx, b)
    rows: dict[str, list[dict[str, object]]] = {
        "only_a": [],
        "both": [],
        "partial": [],
        "only_b": [],
    }
    for uid, (ref, ident) in sorted(left.items(), key=lambda kv: kv[1][0]):
        other = right.get(uid)
        if other is None:
            rows["only_a"].append({"study_uid": uid, "a": ref})
            continue
        missing = ident.missing_from(other[1].sop_uids)
        entry = {"study_uid": uid, "a": ref, "b": other[0], "missing_in_b": len(missing)}
        rows["partial" if missing else "both"].append(entry)
    for uid, (ref, _) in sorted(right.items(), key=lambda kv: kv[1][0]):
        if uid not in left:
            rows["only_b"].append({"study_uid": uid, "b": ref})
    if as_json:
        echo_json(rows)
        return
    click.echo(f"only in {a}: {len(rows['only_a'])}")
    for r in rows["only_a"]:
        click.echo(f"  {r['a']}")
    click.echo(f"in both: {len(rows['both'])}")
    for r in rows["both"]:
        click.echo(f"  {r['a']} = {r['b']}")
    if rows["partial"]:
        click.echo(f"partial in {b}: {len(rows['partial'])}")
        for r in rows["partial"]:
            click.echo(f"  {r['a']} ~ {r['b']} ({r['missing_in_b']} instances missing)")
    click.echo(f"only in {b}: {len(rows['only_b'])}")
    for r in rows["only_b"]:
        click.echo(f"  {r['b']}")


def register(group: click.Group) -> None:
    group.add_command(find)
    group.add_command(compare)
