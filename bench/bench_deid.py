"""De-identification benchmarks (issue 13), each against the plain path in the same run:

(a) a de-identifying route A->B (``"Deidentify"``: the issue's example profile, the Basic
    Profile with modified dates and the device identity kept, a pseudonym map) vs the same route without, on the same instances in one run: three
    pairs of passes, alternating which goes first, the median ratio (target: >= 0.8x);
(b) de-identification alone, on one core: instances/s of ``Deidentifier.instance`` for
    small (1 KB of pixels) and large (0.5 MB) CT instances, with pydicom's own read + write
    of the same bytes as the floor.

Data: pydicom-generated CT instances with noisy pixels and the usual identifying tags.
Run: ``.venv/bin/python bench/bench_deid.py [--quick]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pydicom
import requests
from bench_plugin import COUNTER, PYTHON_PLUGIN, clear, count, drained, noisy_pixels, upload, wait
from pydicom.uid import generate_uid

from common import OrthancProcess, report, workdir
from dicomdata import make_ct

SECRET_ENV = "DICOMSYNC_BENCH_DEID_SECRET"
PROFILE = {  # the example profile
    "Profile": "basic",
    "Options": ["retain-longitudinal-modified-dates", "retain-device-identity"],
    "SecretEnv": SECRET_ENV,
    "PatientIds": "bench_pseudonyms",
    "Keep": ["StudyDescription"],
}


def ct_instance(patient: str, study_uid: str, series_uid: str, size: int) -> bytes:
    ds = make_ct(patient, study_uid, series_uid, pixel_bytes=size)
    if size > 64:
        ds.PixelData = noisy_pixels(len(ds.PixelData))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(folder: Path, studies: int, per_study: int, size: int) -> list[Path]:
    files = []
    for s in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        for i in range(per_study):
            path = folder / f"D{s:05d}" / f"im{i:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ct_instance(f"D{s:05d}", study_uid, series_uid, size))
            files.append(path)
    return files


def bench_route(
    base: Path, files: list[Path], concurrency: int, pairs: int
) -> list[tuple[str, str]]:
    """``pairs`` passes of each route over the same instances, alternating which goes
    first (plain, deid; deid, plain; ...), each to a destination key of its own (a key's
    done jobs would make a second backfill a no-op); B is emptied between passes. An
    untimed plain pass warms B first: a fresh Orthanc's first 1,000 instances cost it up
    to twice the CPU of later ones (measured: 5.4-6.1 against 2.9-3.1 ms each), which
    would flatter whichever route went first. The ratio is the median of the pairs':
    the machine is shared, so one pass can meet a load spike the other did not."""
    b = OrthancProcess(
        base / "route-b", "b", config={"Plugins": [PYTHON_PLUGIN], "PythonScript": str(COUNTER)}
    ).start()
    never = {"PatientID": "no-such-patient"}  # lanes fed by backfill only
    keys = [("warm-up", "plain")]
    keys += [(f"{kind}{i}", kind) for i in range(pairs) for kind in ("plain", "deid")]
    places = {key: {"Kind": "orthanc", "Url": b.url} for key, _ in keys}
    routes: list[dict[str, Any]] = [
        {"Destination": key, "Concurrency": concurrency, "Filter": never}
        | ({"Deidentify": "research"} if kind == "deid" else {})
        for key, kind in keys
    ]
    sync: dict[str, Any] = {
        "Places": places,
        "Routes": routes,
        "Deidentify": {"research": PROFILE},
        "PollInterval": 1,
        "MetricsInterval": 5,
    }
    a = OrthancProcess(
        base / "route-a",
        "a",
        plugin=True,
        config={"StableAge": 1, "DicomSync": sync},
        env={SECRET_ENV: "bench secret, not a real one"},
    ).start()
    rates: dict[str, float] = {}
    try:
        upload(a.url, files, threads=4)
        n, studies = len(files), len(a.get("/studies"))
        backfill(a, b, "warm-up", studies, n)
        for i in range(pairs):
            order = ("plain", "deid") if i % 2 == 0 else ("deid", "plain")
            for kind in order:
                dest = f"{kind}{i}"
                rates[dest] = n / backfill(a, b, dest, studies, n)
    finally:
        a.stop()
        b.stop()
    ratios = [rates[f"deid{i}"] / rates[f"plain{i}"] for i in range(pairs)]
    rows = [
        (
            f"pair {i + 1}: without / with Deidentify",
            f"{rates[f'plain{i}']:7.1f} / {rates[f'deid{i}']:7.1f} instances/s = {ratios[i]:.2f}x",
        )
        for i in range(pairs)
    ]
    rows.append(
        (
            f"de-identifying / plain (Concurrency {concurrency}), median of {pairs}",
            f"{statistics.median(ratios):.2f}x (target >= 0.8)",
        )
    )
    return rows


def backfill(a: OrthancProcess, b: OrthancProcess, dest: str, studies: int, n: int) -> float:
    """One pass: A's studies backfilled to ``dest`` until drained; B checked, then emptied.
    Returns its seconds."""
    t = time.perf_counter()
    r = requests.post(f"{a.url}/dicomsync/backfill", json={"Destination": dest}, timeout=600)
    r.raise_for_status()
    wait(lambda: drained(a, dest, studies))
    seconds = time.perf_counter() - t
    assert count(b) == n, f"{dest}: B holds {count(b)} of {n}"
    clear(b)
    return seconds


def bench_alone(small: int, large: int) -> list[tuple[str, str]]:
    from dicomsync.deid.keys import Keys
    from dicomsync.deid.options import parse_profiles
    from dicomsync.deid.transform import Deidentifier, StudyKeys

    profile = parse_profiles({"p": {**PROFILE, "PatientIds": None}})["p"]
    engine = Deidentifier(profile, Keys(b"bench"))
    study = StudyKeys("DSBENCH", "DSBENCH", 42)
    rows = []
    for label, size, n in (("1 KB", 1024, small), ("0.5 MB", 500_000, large)):
        raws = [ct_instance(f"P{i}", generate_uid(), generate_uid(), size) for i in range(20)]
        t = time.process_time()
        for i in range(n):
            engine.instance(raws[i % len(raws)], study)
        deid = n / (time.process_time() - t)
        t = time.process_time()
        for i in range(n):
            ds = pydicom.dcmread(io.BytesIO(raws[i % len(raws)]))
            ds.save_as(io.BytesIO(), enforce_file_format=False)
        floor = n / (time.process_time() - t)
        rows.append((f"de-identify, {label} instances", f"{deid:8.0f} instances/s (one core)"))
        rows.append((f"pydicom read + write, {label}", f"{floor:8.0f} instances/s (floor)"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--size", type=int, default=500_000, help="pixel bytes per instance")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--pairs", type=int, default=3, help="passes of each route in (a)")
    p.add_argument("--only", choices=["a", "b"], action="append")
    args = p.parse_args()
    if args.quick:
        args.instances = 100
    only = set(args.only or "ab")
    base = workdir("deid")
    print(f"work folder: {base}; CPUs: {os.cpu_count()}", flush=True)
    if "a" in only:
        files = generate(base / "data", max(1, args.instances // 50), 50, args.size)
        report(
            f"(a) route A->B, {len(files)} instances of {args.size / 1e6:.1f} MB",
            bench_route(base, files, args.concurrency, args.pairs),
        )
    if "b" in only:
        small, large = (500, 50) if args.quick else (5000, 500)
        report("(b) de-identification alone, one core", bench_alone(small, large))


if __name__ == "__main__":
    main()
