"""``dicom`` place benchmarks (issue 12), each against the native path in the same run.

(a) route A->B over C-STORE (and, for reference, ``dicomsync send`` of the same
    studies from the CLI process, whose threads are not lowered to nice 10 as the
    plugin's workers are): the plugin's ``dicom`` route (backfill of the studies, the
    queue's workers, ``Associations`` parallel associations with TCP_NODELAY) vs
    Orthanc's own ``POST /modalities/B/store`` (one association), with and without
    ``TCP_NODELAY=1`` in both Orthancs' environment (DCMTK reads it; see
    ../shared/ORTHANC_NOTES.md). Targets: >= 1.0x native in both, and >= 5x a single
    association without TCP_NODELAY (native, variant without the variable).
(b) the C-FIND duplicate check: ``send`` of 1,000 studies B already holds, from a
    folder (header cache warm), ms per study (target < 20 ms).

Data: pydicom-generated instances, 20 studies x 50 x 0.5 MB by default.
Run: ``.venv/bin/python bench/bench_dicom.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import requests
from bench_plugin import clear, count, drained, generate, upload, wait

from common import OrthancProcess, generate_root, report, workdir

DICOM_PEER = {
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowGet": True,
    "DicomAlwaysAllowMove": True,
}


def section(b: OrthancProcess, **extra: Any) -> dict[str, Any]:
    return {"Kind": "dicom", "Host": "127.0.0.1", "Port": b.dicom_port, "CalledAet": "B", **extra}


def bench_route(base: Path, files: list[Path], nodelay: bool) -> dict[str, float]:
    env = {"TCP_NODELAY": "1"} if nodelay else {}
    tag = "nodelay" if nodelay else "nagle"
    b = OrthancProcess(base / f"b-{tag}", "b", config=DICOM_PEER, env=env).start()
    config = {
        "StableAge": 1,
        "DicomModalities": {"b": ["B", "127.0.0.1", b.dicom_port]},
        "DicomSync": {
            "Places": {"b": section(b)},
            # a lane for "b" without automatic routing: only the backfill enqueues
            "Routes": [{"Destination": "b", "Filter": {"PatientID": "no-such-patient"}}],
            "PollInterval": 1,
            "MetricsInterval": 5,
        },
    }
    a = OrthancProcess(base / f"a-{tag}", "a", plugin=True, config=config, env=env).start()
    rates: dict[str, float] = {}
    try:
        upload(a.url, files, threads=4)
        n = len(files)
        studies = a.get("/studies")
        t = time.perf_counter()
        r = requests.post(
            f"{a.url}/modalities/b/store",
            json={"Resources": studies, "Synchronous": True},
            timeout=3600,
        )
        r.raise_for_status()
        rates["native"] = n / (time.perf_counter() - t)
        assert count(b) == n
        clear(b)
        t = time.perf_counter()
        r = requests.post(f"{a.url}/dicomsync/backfill", json={"Destination": "b"}, timeout=600)
        r.raise_for_status()
        wait(lambda: drained(a, "b", len(studies)))
        rates["route"] = n / (time.perf_counter() - t)
        assert count(b) == n
        clear(b)
        from dicomsync import transfer
        from dicomsync.places.base import PLACES

        src = PLACES.build("a", {"Kind": "orthanc", "Url": a.url}, base)
        dst = PLACES.build("b", section(b), base)
        with src, dst:
            t = time.perf_counter()
            summary = transfer.send([(src, ref) for ref in src.studies()], dst)
            rates["cli"] = n / (time.perf_counter() - t)
        held = wait_count(b, n)
        for o in summary.outcomes:
            if o.error:
                print(f"  dicomsync send: {o.ref}: {o.error}")
        assert summary.sent == len(studies), summary.line()
        if held != n:
            print(f"  dicomsync send: B counts {held} instances, not {n}")
    finally:
        a.stop()
        b.stop()
    return rates


def wait_count(b: OrthancProcess, n: int, seconds: float = 10) -> int:
    """B's instance count once it reaches ``n`` (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while (held := count(b)) != n and time.monotonic() < deadline:
        time.sleep(0.2)
    return held


def bench_duplicates(base: Path, studies: int) -> float:
    """ms per study of a send whose every study B already holds (C-FIND IMAGE level)."""
    from dicomsync import transfer
    from dicomsync.places.base import PLACES
    from dicomsync.queue.base import RetryPolicy

    b = OrthancProcess(base / "dup-b", "b", config=DICOM_PEER).start()
    root = base / "dup-root"
    generate_root(root, studies, instances=1)
    try:
        src = PLACES.build("src", {"Kind": "dicom_root", "Path": str(root)}, base)
        dst = PLACES.build("b", section(b), base)
        with src, dst:
            items = [(src, ref) for ref in src.studies()]
            first = transfer.send(items, dst, retry=RetryPolicy(1, 4, 5))
            for o in first.outcomes:
                if o.error:
                    print(f"  first send: {o.ref}: {o.error}")
            assert first.sent + first.duplicates == studies, first.line()
            t = time.perf_counter()
            again = transfer.send(items, dst)
            seconds = time.perf_counter() - t
            assert again.duplicates == studies, again.line()
    finally:
        b.stop()
    return seconds * 1000 / studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 instances, 100 studies")
    parser.add_argument("--size", type=int, default=512 * 1024, help="pixel bytes")
    parser.add_argument("--only", choices=["route", "duplicates"], help="run one part")
    args = parser.parse_args()
    base = workdir("bench-dicom")
    per_study, n_studies, dup = (10, 10, 100) if args.quick else (50, 20, 1000)
    if args.only != "duplicates":
        bench_routes(base, n_studies, per_study, args.size)
    if args.only != "route":
        ms = bench_duplicates(base, dup)
        report(
            f"C-FIND duplicate check, {dup} studies already delivered",
            [("send, all duplicates", f"{ms:.1f} ms per study (target < 20)")],
        )


def bench_routes(base: Path, n_studies: int, per_study: int, size: int) -> None:
    files = generate(base / "data", n_studies, per_study, size, "DIC")
    nagle = bench_route(base, files, nodelay=False)
    nodelay = bench_route(base, files, nodelay=True)
    single = nagle["native"]
    rows = [
        ("native /modalities/b/store, no TCP_NODELAY", f"{nagle['native']:7.1f} instances/s"),
        ("dicom route, Orthancs without TCP_NODELAY", f"{nagle['route']:7.1f} instances/s"),
        ("native /modalities/b/store, TCP_NODELAY=1", f"{nodelay['native']:7.1f} instances/s"),
        ("dicom route, Orthancs with TCP_NODELAY=1", f"{nodelay['route']:7.1f} instances/s"),
        (
            "dicomsync send A->B (CLI process, not niced), without",
            f"{nagle['cli']:7.1f} instances/s",
        ),
        (
            "dicomsync send A->B (CLI process, not niced), with",
            f"{nodelay['cli']:7.1f} instances/s",
        ),
        ("route / native, without", f"{nagle['route'] / nagle['native']:.2f}x (target >= 1.0)"),
        ("route / native, with", f"{nodelay['route'] / nodelay['native']:.2f}x (target >= 1.0)"),
        (
            "route / single association without TCP_NODELAY",
            f"{nagle['route'] / single:.2f}x (without), {nodelay['route'] / single:.2f}x "
            "(with) (target >= 5)",
        ),
    ]
    report(f"dicom route A->B, {len(files)} instances in {n_studies} studies", rows)


if __name__ == "__main__":
    main()
