"""``dicomsync find`` and ``dicomsync compare``.

``compare A B`` is ``send A B --dry-run`` told per study: it runs the same decision
(``dicomsync.transfer.send`` with ``dry_run``: B's ``holds`` for each study of A), so the
two never disagree. A study of A is "in both" when ``send`` would skip it as a duplicate,
"partial" when it would send some of its instances, "only in A" when it would send them
all; "only in B" lists B's studies whose StudyInstanceUID no study of A has.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import click

from dicomsync.cli.common import (
    echo,
    echo_json,
    load_config,
    places_for,
    retry_option,
    retry_policy,
    source_items,
)
from dicomsync.config import Config
from dicomsync.errors import QueryError
from dicomsync.places.base import StudyRef
from dicomsync.query import StudyQuery
from dicomsync.transfer import send as send_studies


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
    echo(f"found {len(refs)}:")
    for r in refs:
        echo(r)


def _query(text: str) -> StudyQuery:
    """A place key alone means all of its studies."""
    return StudyQuery.parse(text if ":" in text else f"{text}:*")


def _one_place(cfg: Config, text: str, query: StudyQuery) -> str:
    keys = [k for k in sorted(cfg.places) if query.matches_place(k)]
    if len(keys) > 1:
        raise QueryError(
            f"{text!r} matches {len(keys)} places ({', '.join(keys)}); "
            "B of compare is one place, as the destination of send is"
        )
    if not keys:
        list(places_for(cfg, query))  # raises the unknown-place error
        raise QueryError(f"{text!r} matches no place")
    return keys[0]


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@retry_option
@click.pass_context
def compare(ctx: click.Context, a: str, b: str, as_json: bool, retries: int | None) -> None:
    """Compare A (places or a query) with the place B (or a query of it), study by study.

    The same decision as 'send A B --dry-run': a study of A is "in both" when send would
    skip it, "partial" when B holds some of its instances, "only in A" when send would
    send it whole. "Only in B": B's studies whose StudyInstanceUID no study of A has.
    Exit code 1 if a study could not be compared.
    """
    qa, qb = _query(a), _query(b)
    cfg = load_config(ctx)
    rows: dict[str, list[dict[str, Any]]] = {
        "only_a": [],
        "both": [],
        "partial": [],
        "empty": [],
        "failed": [],
        "only_b": [],
    }
    with ExitStack() as stack:
        dest = stack.enter_context(cfg.place(_one_place(cfg, b, qb)))
        items = source_items(cfg, qa, dest.key, stack)
        summary = send_studies(items, dest, dry_run=True, retry=retry_policy(cfg, retries))
        in_b: dict[str, list[StudyRef]] = {}  # StudyInstanceUID -> B's studies holding it
        for ref in sorted(dest.studies(qb)):
            ident = dest.identity(ref)
            if ident.sop_uids:
                in_b.setdefault(ident.study_uid, []).append(ref)
    a_uids = {o.identity.study_uid for o in summary.outcomes if o.identity is not None}
    for o in sorted(summary.outcomes, key=lambda o: str(o.ref)):
        ident = o.identity
        entry: dict[str, Any] = {"study_uid": ident.study_uid if ident else None, "a": str(o.ref)}
        same = in_b.get(ident.study_uid, []) if ident else []
        if o.status == "failed":
            rows["failed"].append({**entry, "error": o.error})
        elif o.status == "empty":
            rows["empty"].append(entry)
        elif o.status == "duplicate" or (ident and o.missing < len(ident.sop_uids)):
            entry["b"] = str(_best(same, o.ref) or dest.key)
            entry["missing_in_b"] = o.missing if o.status == "would_send" else 0
            rows["both" if o.status == "duplicate" else "partial"].append(entry)
        else:
            if same:  # B has the study, under another key: send would store it again
                entry["same_uid_in_b"] = [str(r) for r in same]
            rows["only_a"].append(entry)
    for uid, refs in sorted(in_b.items(), key=lambda kv: str(kv[1][0])):
        if uid not in a_uids:
            rows["only_b"].extend({"study_uid": uid, "b": str(r)} for r in refs)
    if as_json:
        echo_json(rows)
    else:
        _print(rows, a, b)
    if rows["failed"]:
        ctx.exit(1)


def _best(refs: list[StudyRef], ref: StudyRef) -> StudyRef | None:
    """Of B's studies with A's StudyInstanceUID, the one under A's key, else the first."""
    return next((r for r in refs if r.key == ref.key), refs[0] if refs else None)


def _print(rows: dict[str, list[dict[str, Any]]], a: str, b: str) -> None:
    def note(r: dict[str, Any]) -> str:
        elsewhere = r.get("same_uid_in_b")
        return f" (its StudyInstanceUID is at {', '.join(elsewhere)})" if elsewhere else ""

    # (row kind, heading, line per study, shown when empty)
    sections: list[tuple[str, str, Callable[[dict[str, Any]], str], bool]] = [
        ("only_a", f"only in {a}", lambda r: f"{r['a']}{note(r)}", True),
        ("both", "in both", lambda r: f"{r['a']} = {r['b']}", True),
        (
            "partial",
            f"partial in {b}",
            lambda r: f"{r['a']} ~ {r['b']} ({r['missing_in_b']} instances missing)",
            False,
        ),
        ("empty", f"no readable instances in {a}", lambda r: f"{r['a']}", False),
        ("failed", "not compared", lambda r: f"{r['a']}: {r['error']}", False),
        ("only_b", f"only in {b}", lambda r: f"{r['b']}", True),
    ]
    for kind, heading, line, always in sections:
        if rows[kind] or always:
            echo(f"{heading}: {len(rows[kind])}")
            for r in rows[kind]:
                echo(f"  {line(r)}")


def register(group: click.Group) -> None:
    group.add_command(find)
    group.add_command(compare)
