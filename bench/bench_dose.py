"""Dose page benchmark (issue 14): the dose page rendered over 100,000 dose events.

An embedded index (``sqlite_index``) is filled with events made from the real vendor
RDSRs of the shared test data (``rdsr/`` and ``study_petct_siemens/``): each generated
study copies one file's events (its ``instance``, ``dose_report`` and ``dose_event``
events, flattened by our own code) with new UIDs, a study date spread over a year, one
of six scanners, one of six CT protocols and CTDIvol/DLP scaled by a random factor,
until there are ``--events`` dose events (100,000 by default; ``--ct-only``: copies of
the CT reports only, so every dose event is a CT event the page counts). Image instances
are not generated: the dose page reads only dose events, dose reports and the modality of
the instances it finds.

Then the page is rendered by ``dicomsync.console.dose.render`` (what
``GET /dicomsync/ui/dose`` and ``dicomsync dose report`` call): the first read of the
index (once, on a thread in the plugin), the first request after a restart (the summary
cache is read), and warm requests (nothing new in the index) for the whole year and for
one quarter. Target: < 500 ms.

Run: ``.venv/bin/python bench/bench_dose.py [--events 100000] [--ct-only] [--keep DIR]``
(an index of 100,000 dose events is ~8 GB and takes ~20 minutes to generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import SOURCETYPE_DOSE_EVENT, Event, events_from_bytes

from common import report, workdir

SCANNERS = ["CT-ROOM-1", "CT-ROOM-2", "CT-ER", "PETCT-1", "CT-ONCO", "CT-PAEDS"]
PROTOCOLS = ["Head routine", "Chest", "Abdomen", "Thorax^TAP (Adult)", "Sinus", "CTA Neck"]


def templates() -> list[list[Event]]:
    from dicomdata import data_dir

    base = data_dir()
    files = sorted((base / "rdsr").glob("*.dcm")) + sorted(
        (base / "study_petct_siemens").glob("*RDSR*.dcm")
    )
    return [events_from_bytes(f.read_bytes(), source=str(f)) for f in files]


def _copy(value: Any, old: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v, old) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, old) for v in value]
    if isinstance(value, str) and value in old:
        return old[value]
    return value


def study(template: list[Event], n: int, rng: random.Random) -> list[Event]:
    """``template``'s events as study ``n``: new UIDs, date, scanner, protocol, doses."""
    uids: dict[str, str] = {}
    for ev in template:
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            uid = ev.fields.get(key)
            if isinstance(uid, str):
                uids.setdefault(uid, f"2.25.{n}{len(uids):02d}{rng.randrange(10**8)}")
        uid = ev.fields.get("Irradiation Event UID")
        if isinstance(uid, str):
            uids.setdefault(uid, f"2.25.9{n}{len(uids):03d}{rng.randrange(10**8)}")
    t = 1735689600 + rng.randrange(365) * 86400 + rng.randrange(86400)  # during 2025
    date = time.strftime("%Y%m%d", time.gmtime(t))
    scanner = rng.choice(SCANNERS)
    factor = rng.uniform(0.5, 2.5)
    out = []
    for ev in template:
        fields = _copy(ev.fields, uids)
        fields["StudyDate"] = date
        fields["StationName"] = scanner
        if ev.sourcetype == SOURCETYPE_DOSE_EVENT:
            if "Acquisition Protocol" in fields or "CT Dose" in fields:
                fields["Acquisition Protocol"] = rng.choice(PROTOCOLS)
            dose = fields.get("CT Dose")
            if isinstance(dose, dict):
                for key in ("Mean CTDIvol", "DLP"):
                    if isinstance(dose.get(key), float):
                        dose[key] = round(dose[key] * factor, 2)
        sop = str(fields.get("SOPInstanceUID"))
        new_id = sop + ev.id[ev.id.index(":") :]
        for old_uid, new_uid in uids.items():
            new_id = new_id.replace(old_uid, new_uid)
        out.append(Event(new_id, ev.sourcetype, t, ev.time_source, fields, "bench"))
    return out


def is_ct(template: list[Event]) -> bool:
    return any(
        e.sourcetype == SOURCETYPE_DOSE_EVENT and isinstance(e.fields.get("CT Dose"), dict)
        for e in template
    )


def generate(path: Path, dose_events: int, seed: int = 14, ct_only: bool = False) -> dict[str, int]:
    """Fill the index at ``path`` until it holds ``dose_events`` dose events (copies of
    the CT reports only, with ``ct_only``)."""
    rng = random.Random(seed)
    tmpl = [t for t in templates() if is_ct(t) or not ct_only]
    index = SqliteIndex("bench", path)
    made = n = 0
    batch: list[Event] = []
    while made < dose_events:
        events = study(rng.choice(tmpl), n, rng)
        n += 1
        dose = [e for e in events if e.sourcetype == SOURCETYPE_DOSE_EVENT]
        if made + len(dose) > dose_events:  # exactly the requested number
            keep = set(e.id for e in dose[: dose_events - made])
            events = [e for e in events if e.sourcetype != SOURCETYPE_DOSE_EVENT or e.id in keep]
            dose = dose[: dose_events - made]
        made += len(dose)
        batch.extend(events)
        if len(batch) >= 2000:
            index.send(batch)
            batch = []
    if batch:
        index.send(batch)
    stats = index.stats()
    index.close()
    return {"studies": n, **{k.split(":")[1]: v for k, v in stats["events"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="reuse/keep the index in this folder")
    parser.add_argument("--ct-only", action="store_true", help="copy only the CT dose reports")
    parser.add_argument(
        "--keep-cache", action="store_true", help="keep the summary cache (no first-read figure)"
    )
    args = parser.parse_args()

    from dicomsync.console.dose import render
    from dicomsync.console.dose_levels import Levels
    from dicomsync.console.dose_query import DoseReader
    from dicomsync.console.dose_view import DoseFilter

    base = args.keep or workdir("dose")
    base.mkdir(parents=True, exist_ok=True)
    name = f"{args.events}{'-ct' if args.ct_only else ''}"
    path = base / f"index-{name}.sqlite"
    if not path.exists():
        start = time.perf_counter()
        counts = generate(path, args.events, ct_only=args.ct_only)
        print(f"generated {counts} in {time.perf_counter() - start:.0f} s", flush=True)
    size = path.stat().st_size
    cache = base / f"dose-cache-{name}.sqlite"
    if not args.keep_cache:
        cache.unlink(missing_ok=True)
    levels = Levels()

    cpu: dict[int, list[float]] = {}  # id of a list of wall times -> CPU times beside it

    def timed_render(reader: DoseReader, flt: DoseFilter) -> tuple[float, int]:
        start, start_cpu = time.perf_counter(), time.process_time()
        page = render(reader, flt, levels, root="")  # what GET /dicomsync/ui/dose renders
        timed_render.cpu = time.process_time() - start_cpu  # type: ignore[attr-defined]
        return time.perf_counter() - start, len(page)

    def series(n: int, reader: Any, flt: DoseFilter) -> list[float]:
        walls, cpus = [], []
        for _ in range(n):
            walls.append(timed_render(reader, flt)[0])
            cpus.append(timed_render.cpu)  # type: ignore[attr-defined]
        cpu[id(walls)] = cpus
        return walls

    def shown(walls: list[float]) -> str:
        wall = statistics.median(walls) * 1000
        return f"{wall:.0f} ms (CPU {statistics.median(cpu[id(walls)]) * 1000:.0f} ms)"

    whole = DoseFilter()
    quarter = DoseFilter(since="20250401", until="20250630")
    reader = DoseReader.sqlite(path, cache=cache)
    first, _ = timed_render(reader, whole)  # reads the index's fields once, fills the cache
    reader.close()
    restart = []
    for _ in range(3):  # a new process: the summary cache is read, the index only for news
        reader = DoseReader.sqlite(path, cache=cache)
        restart.append(timed_render(reader, whole)[0])
        reader.close()
    reader = DoseReader.sqlite(path, cache=cache)
    timed_render(reader, whole)
    warm = series(5, reader, whole)
    warm_q = series(5, reader, quarter)
    _, length = timed_render(reader, whole)
    snap = reader.snapshot()
    reader.close()
    # the warm page over as many CT events as dose events: the index's CT events copied
    # (new study UIDs) into a snapshot of args.events CT events, rendered the same way
    copies = [
        dataclasses.replace(e, study_uid=f"{e.study_uid}.{i}")
        for i in range(args.events // max(len(snap.events), 1) + 1)
        for e in snap.events
    ][: args.events]
    scaled = dataclasses.replace(snap, events=tuple(copies))
    stub = SimpleNamespace(snapshot=lambda: scaled)
    warm_ct = series(5, stub, whole)
    ms = 1000.0
    report(
        f"Dose page over {args.events:,} dose events ({len(snap.events):,} CT events after"
        f" dedup, {len(snap.totals):,} studies; index {size / 1e9:.1f} GB; target < 500 ms)",
        [
            ("first read of the index (once)", f"{first:.1f} s" if not args.keep_cache else "-"),
            (
                "after a restart (summary cache), median of 3",
                f"{statistics.median(restart) * ms:.0f} ms",
            ),
            ("warm, whole year, median of 5", shown(warm)),
            ("warm, one quarter, median of 5", shown(warm_q)),
            (
                f"warm, {len(copies):,} CT events (copies), median of 5",
                shown(warm_ct),
            ),
            ("page size", f"{length / 1e3:.0f} kB"),
            ("summary cache size", f"{cache.stat().st_size / 1e6:.1f} MB"),
        ],
    )


if __name__ == "__main__":
    main()
