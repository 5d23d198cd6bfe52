"""DICOMweb benchmark (issue 12), against the native path in the same run:

the plugin's route A->B to a ``dicomweb`` place (STOW-RS into B's DICOMweb plugin) vs
Orthanc's own STOW-RS client, ``POST /dicom-web/servers/b/stow`` of A's DICOMweb plugin
(target >= 1.0x), on the same instances (default 1,000 x 0.5 MB, 20 studies of 50).

A loads the dicomsync plugin and the DICOMweb plugin (for its STOW client); B loads the
DICOMweb plugin only. Each round empties B before each of: Orthanc's client with its
default chunked uploads (server ``b``), the same with ``"ChunkedTransfers": false``
(server ``b-unchunked``), and the plugin's route. A route's lane is filled by ``POST
/dicomsync/backfill``; every round backfills a place of its own (``r0``, ``r1``, … all
pointing at B, each route's filter matching no new study), so no round finds its studies
already delivered. The machine is shared, so the rounds interleave the paths and the
ratio reported is the median over rounds of plugin / the faster native path of the same
round. ``--variant PER_REQUEST:IN_FLIGHT`` adds a route with other
``InstancesPerRequest`` / ``RequestsInFlight`` values to every round.

Run: ``.venv/bin/python bench/bench_dicomweb.py [--quick] [--rounds N]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import requests
from bench_plugin import clear, count, drained, generate, upload, wait

from dicomsync.route_facts import DEFAULT_CONCURRENCY

from common import OrthancProcess, report, workdir

NATIVE = ("b", "b-unchunked")


def plugin_config(
    b: OrthancProcess, concurrency: int, places: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    return {
        "StableAge": 1,
        "DicomWeb": {
            "Servers": {
                "b": [b.dicomweb_url],
                "b-unchunked": {"Url": b.dicomweb_url, "ChunkedTransfers": False},
            }
        },
        "DicomSync": {
            "Places": {
                key: {"Kind": "dicomweb", "Url": b.dicomweb_url, **extra}
                for key, extra in places.items()
            },
            "Routes": [
                {
                    "Destination": key,
                    "Concurrency": concurrency,
                    "Filter": {"PatientID": "no-such-patient"},
                }
                for key in places
            ],
            "PollInterval": 1,
            "MetricsInterval": 5,
        },
    }


def variant_label(extra: dict[str, Any]) -> str:
    return (
        f"{extra.get('InstancesPerRequest', 10)} per request, "
        f"{extra.get('RequestsInFlight', 4)} in flight"
    )


def bench_stow(
    base: Path, files: list[Path], concurrency: int, variants: list[str], rounds: int
) -> list[tuple[str, str]]:
    kinds: list[dict[str, Any]] = [{}]
    for variant in variants:
        per, _, flight = variant.partition(":")
        kinds.append({"InstancesPerRequest": int(per), "RequestsInFlight": int(flight or 4)})
    places = {f"r{r}-{i}": kind for r in range(rounds) for i, kind in enumerate(kinds)}
    b = OrthancProcess(base / "b", "b", dicomweb=True).start()
    a = OrthancProcess(
        base / "a", "a", plugin=True, dicomweb=True, config=plugin_config(b, concurrency, places)
    ).start()
    n = len(files)
    rates: dict[str, list[float]] = {}
    try:
        upload(a.url, files, threads=4)
        studies = a.get("/studies")
        for r in range(rounds):
            for server in NATIVE:
                clear(b)
                t = time.perf_counter()
                answer = requests.post(
                    f"{a.url}/dicom-web/servers/{server}/stow",
                    json={"Resources": studies, "Synchronous": True},
                    timeout=3600,
                )
                answer.raise_for_status()
                label = f"native POST /dicom-web/servers/{server}/stow"
                rates.setdefault(label, []).append(n / (time.perf_counter() - t))
                assert count(b) == n, (count(b), n)
            for index, kind in enumerate(kinds):
                key = f"r{r}-{index}"
                clear(b)
                t = time.perf_counter()
                answer = requests.post(
                    f"{a.url}/dicomsync/backfill", json={"Destination": key}, timeout=600
                )
                answer.raise_for_status()
                wait(lambda key=key: drained(a, key, len(studies)))
                label = (
                    f"plugin route to dicomweb (Concurrency {concurrency}, {variant_label(kind)})"
                )
                rates.setdefault(label, []).append(n / (time.perf_counter() - t))
                assert count(b) == n, (count(b), n)
                assert a.get("/dicomsync/status")["Destinations"][key]["Failed"] == 0
            print(
                f"round {r + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in rates.values()), flush=True
            )
    finally:
        a.stop()
        b.stop()
    best = [
        max(rates[f"native POST /dicom-web/servers/{s}/stow"][r] for s in NATIVE)
        for r in range(rounds)
    ]
    rows = [
        (k, f"{statistics.median(v):7.1f} instances/s (rounds: {', '.join(f'{x:.0f}' for x in v)})")
        for k, v in rates.items()
    ]
    for k, v in rates.items():
        if k.startswith("plugin"):
            ratios = [x / y for x, y in zip(v, best, strict=True)]
            rows.append(
                (
                    f"{k} / faster native",
                    f"{statistics.median(ratios):.2f}x median "
                    f"({', '.join(f'{x:.2f}' for x in ratios)}) (target >= 1.0)",
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 instances, 1 round, a smoke run")
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--size", type=int, default=500_000, help="pixel bytes per instance")
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="the route's Concurrency (default: a route's default)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant", action="append", default=[], metavar="PER_REQUEST:IN_FLIGHT")
    args = p.parse_args()
    if args.quick:
        args.instances, args.rounds = 100, 1
    base = workdir("dicomweb")
    print(f"work folder: {base}", flush=True)
    files = generate(base / "data", max(1, args.instances // 50), 50, args.size, "W")
    report(
        f"dicomweb route A->B, {len(files)} instances of {args.size / 1e6:.1f} MB, "
        f"{args.rounds} rounds",
        bench_stow(base, files, args.concurrency, args.variant, args.rounds),
    )


if __name__ == "__main__":
    main()
