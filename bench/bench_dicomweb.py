"""DICOMweb benchmark (issue 12), against the native path in the same run:

the plugin's route A->B to a ``dicomweb`` place (STOW-RS into B's DICOMweb plugin) vs
Orthanc's own STOW-RS client, ``POST /dicom-web/servers/b/stow`` of A's DICOMweb plugin
(target >= 1.0x), on the same instances (default 1,000 x 0.5 MB, 20 studies of 50).

A loads the dicomsync plugin and the DICOMweb plugin (for its STOW client); B loads the
DICOMweb plugin only. The route's lane is filled by ``POST /dicomsync/backfill`` (the
route's filter matches no new study), as in bench_plugin's (a). B is emptied between
the two runs. Orthanc's client runs twice, with its default chunked uploads (server
``b``) and with ``"ChunkedTransfers": false`` (server ``b-unchunked``); the ratio is
against the faster of the two. ``--variant PER_REQUEST:IN_FLIGHT`` adds plugin runs with other
``InstancesPerRequest`` / ``RequestsInFlight`` values.

Run: ``.venv/bin/python bench/bench_dicomweb.py [--quick]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import requests
from bench_plugin import clear, count, drained, generate, upload, wait

from common import OrthancProcess, report, workdir


def plugin_config(b: OrthancProcess, concurrency: int, place: dict[str, Any]) -> dict[str, Any]:
    return {
        "StableAge": 1,
        "DicomWeb": {
            "Servers": {
                "b": [b.dicomweb_url],
                "b-unchunked": {"Url": b.dicomweb_url, "ChunkedTransfers": False},
            }
        },
        "DicomSync": {
            "Places": {"b": {"Kind": "dicomweb", "Url": b.dicomweb_url, **place}},
            "Routes": [
                {
                    "Destination": "b",
                    "Concurrency": concurrency,
                    "Filter": {"PatientID": "no-such-patient"},
                }
            ],
            "PollInterval": 1,
            "MetricsInterval": 5,
        },
    }


def run_plugin(
    base: Path,
    files: list[Path],
    b: OrthancProcess,
    concurrency: int,
    place: dict[str, Any],
    tag: str,
    native: bool,
) -> dict[str, float]:
    a = OrthancProcess(
        base / f"a-{tag}",
        "a",
        plugin=True,
        dicomweb=True,
        config=plugin_config(b, concurrency, place),
    ).start()
    rates: dict[str, float] = {}
    try:
        upload(a.url, files, threads=4)
        n = len(files)
        studies = a.get("/studies")
        for server in ("b", "b-unchunked") if native else ():
            clear(b)
            t = time.perf_counter()
            r = requests.post(
                f"{a.url}/dicom-web/servers/{server}/stow",
                json={"Resources": studies, "Synchronous": True},
                timeout=3600,
            )
            r.raise_for_status()
            rates[f"native POST /dicom-web/servers/{server}/stow"] = n / (time.perf_counter() - t)
            assert count(b) == n, (count(b), n)
        clear(b)
        t = time.perf_counter()
        r = requests.post(f"{a.url}/dicomsync/backfill", json={"Destination": "b"}, timeout=600)
        r.raise_for_status()
        wait(lambda: drained(a, "b", len(studies)))
        label = (
            f"plugin route to dicomweb (Concurrency {concurrency}, "
            f"{place.get('InstancesPerRequest', 10)} per request, "
            f"{place.get('RequestsInFlight', 4)} in flight)"
        )
        rates[label] = n / (time.perf_counter() - t)
        assert count(b) == n, (count(b), n)
        failed = a.get("/dicomsync/status")["Destinations"]["b"]["Failed"]
        assert failed == 0, f"{failed} failed jobs"
    finally:
        a.stop()
    return rates


def bench_stow(
    base: Path, files: list[Path], concurrency: int, variants: list[str]
) -> list[tuple[str, str]]:
    b = OrthancProcess(base / "b", "b", dicomweb=True).start()
    rates: dict[str, float] = {}
    try:
        rates.update(run_plugin(base, files, b, concurrency, {}, "default", native=True))
        for i, variant in enumerate(variants):
            per, _, flight = variant.partition(":")
            place: dict[str, Any] = {
                "InstancesPerRequest": int(per),
                "RequestsInFlight": int(flight or 4),
            }
            rates.update(run_plugin(base, files, b, concurrency, place, f"v{i}", native=False))
    finally:
        b.stop()
    best = max(v for k, v in rates.items() if k.startswith("native"))
    rows = [(k, f"{v:7.1f} instances/s") for k, v in rates.items()]
    for k, v in rates.items():
        if k.startswith("plugin"):
            rows.append((f"{k} / best native", f"{v / best:.2f}x (target >= 1.0)"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 instances, for a smoke run")
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--size", type=int, default=500_000, help="pixel bytes per instance")
    p.add_argument("--concurrency", type=int, default=4, help="the route's Concurrency")
    p.add_argument("--variant", action="append", default=[], metavar="PER_REQUEST:IN_FLIGHT")
    args = p.parse_args()
    if args.quick:
        args.instances = 100
    base = workdir("dicomweb")
    print(f"work folder: {base}", flush=True)
    files = generate(base / "data", max(1, args.instances // 50), 50, args.size, "W")
    report(
        f"dicomweb route A->B, {len(files)} instances of {args.size / 1e6:.1f} MB",
        bench_stow(base, files, args.concurrency, args.variant),
    )


if __name__ == "__main__":
    main()
