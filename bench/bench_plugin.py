"""Plugin benchmarks (issue 3), each against the native path in the same run:

(a) replication A->B: the plugin's route worker vs Orthanc's native ``POST /peers/B/store``
    vs a CopyDICOM-style ``requests`` loop with default headers
    (targets: >= 0.95x native, >= 5x the loop);
(b) ingest into A with the plugin and a route on vs plugin off (target >= 0.95x); the same
    with the tag sinks on (an sqlite_index and a splunk_hec to the HEC stand-in, indexing
    during the upload; issue 4's target >= 0.95x), and, for reference, what a no-op
    OnStoredInstance callback alone costs;
(c) backfill of already-delivered studies, ms per study (target < 5 ms);
(d) Orthanc's RSS growth over routed instances (target < 100 MB over 10,000);
(e) Orthanc's RSS over many small routed studies, one tiny instance each, with Orthanc's
    storage cache off (issue 9: flat within 50 MB over 100,000 studies), against
    Orthanc alone ingesting the same studies.

Data: pydicom-generated instances (``--size`` bytes of pixel data, default 0.5 MB).
Run: ``.venv/bin/python bench/bench_plugin.py [--quick]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from common import OrthancProcess, make_instance, report, workdir

PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
COUNTER = Path(__file__).resolve().parent.parent / "tests" / "orthanc_counter.py"
HEC_TOKEN = "0b0b0b0b-1111-4222-8333-444444444444"
HEC_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from servers.hec import HecServer, Token
server = HecServer(tokens=[Token({token!r})]).start()
print(server.url, flush=True)
while True:
    time.sleep(3600)
"""
STORED_NOOP = """
import orthanc
def on_stored(dicom, instance_id):
    pass
orthanc.RegisterOnStoredInstanceCallback(on_stored)
"""


def noisy_pixels(n: int) -> bytes:
    """12-bit noise in 16-bit words, like CT pixels: as hard to gzip as real images, unlike
    the repeated pattern of make_instance (which would flatter Orthanc's on-the-fly gzip)."""
    n -= n % 2
    mask = int.from_bytes(b"\xff\x0f" * (n // 2), "little")
    return (int.from_bytes(os.urandom(n), "little") & mask).to_bytes(n, "little")


def generate(folder: Path, studies: int, per_study: int, size: int, prefix: str) -> list[Path]:
    from pydicom.uid import generate_uid

    files = []
    for s in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        for i in range(per_study):
            path = folder / f"{prefix}{s:05d}" / f"im{i:04d}.dcm"
            ds = make_instance(
                None,
                patient_id=f"{prefix}{s:05d}",
                study_uid=study_uid,
                series_uid=series_uid,
                pixel_bytes=size,
            )
            if size > 64:
                ds.PixelData = noisy_pixels(len(ds.PixelData))
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def upload(url: str, files: list[Path], threads: int = 1) -> float:
    """Keep-alive uploads (identity encoding); returns seconds."""

    def run(chunk: list[Path]) -> None:
        with requests.Session() as s:
            s.headers.update({"Accept-Encoding": "identity", "Content-Type": "application/dicom"})
            for f in chunk:
                s.post(url + "/instances", data=f.read_bytes(), timeout=120).raise_for_status()

    start = time.perf_counter()
    chunks = [files[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, chunks))
    return time.perf_counter() - start


def clear(server: OrthancProcess) -> None:
    for pid in server.get("/patients"):
        requests.delete(f"{server.url}/patients/{pid}", timeout=120).raise_for_status()


def count(server: OrthancProcess) -> int:
    return int(server.get("/statistics")["CountInstances"])


def drained(server: OrthancProcess, dest: str, done: int) -> bool:
    d = server.get("/dicomsync/status")["Destinations"].get(dest, {})
    return d.get("Done", 0) >= done and d.get("Queued", 1) == 0 and d.get("Sending", 1) == 0


def wait(cond: Any, timeout: float = 1800, interval: float = 0.05) -> float:
    start = time.perf_counter()
    while not cond():
        if time.perf_counter() - start > timeout:
            raise RuntimeError("benchmark timed out")
        time.sleep(interval)
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def plugin_config(b: OrthancProcess, routed: bool, concurrency: int, **sync: Any) -> dict[str, Any]:
    route: dict[str, Any] = {"Destination": "b", "Concurrency": concurrency}
    if not routed:  # a lane for "b" without automatic routing: only backfill/send enqueue
        route["Filter"] = {"PatientID": "no-such-patient"}
    return {
        "StableAge": 1,
        "OrthancPeers": {"b": {"Url": b.url}},
        "DicomSync": {
            "Places": {"b": {"Kind": "orthanc", "Url": b.url}},
            "Routes": [route],
            "PollInterval": 1,
            "MetricsInterval": 5,
            **sync,
        },
    }


def bench_replication(base: Path, files: list[Path], concurrency: int) -> list[tuple[str, str]]:
    b = OrthancProcess(
        base / "rep-b", "b", config={"Plugins": [PYTHON_PLUGIN], "PythonScript": str(COUNTER)}
    ).start()
    a = OrthancProcess(
        base / "rep-a", "a", plugin=True, config=plugin_config(b, False, concurrency)
    ).start()
    try:
        upload(a.url, files, threads=4)
        n = len(files)
        studies = a.get("/studies")
        rates: dict[str, float] = {}

        t = time.perf_counter()
        r = requests.post(
            f"{a.url}/peers/b/store", json={"Resources": studies, "Synchronous": True}, timeout=3600
        )
        r.raise_for_status()
        rates["native POST /peers/b/store"] = n / (time.perf_counter() - t)
        assert count(b) == n
        clear(b)

        t = time.perf_counter()
        with requests.Session() as src, requests.Session() as dst:  # default headers (gzip)
            for iid in a.get("/instances"):
                data = src.get(f"{a.url}/instances/{iid}/file", timeout=120).content
                dst.post(f"{b.url}/instances", data=data, timeout=120).raise_for_status()
        rates["CopyDICOM-style requests loop"] = n / (time.perf_counter() - t)
        assert count(b) == n
        clear(b)

        posted_before = b.get("/counter")["PostInstances"]
        t = time.perf_counter()
        r = requests.post(f"{a.url}/dicomsync/backfill", json={"Destination": "b"}, timeout=600)
        r.raise_for_status()
        wait(lambda: drained(a, "b", len(studies)))
        rates[f"plugin route (Concurrency {concurrency})"] = n / (time.perf_counter() - t)
        assert count(b) == n and b.get("/counter")["PostInstances"] - posted_before == n
    finally:
        a.stop()
        b.stop()
    native = rates["native POST /peers/b/store"]
    loop = rates["CopyDICOM-style requests loop"]
    plugin = rates[f"plugin route (Concurrency {concurrency})"]
    rows = [(k, f"{v:7.1f} instances/s") for k, v in rates.items()]
    rows += [
        ("plugin / native", f"{plugin / native:.2f}x (target >= 0.95)"),
        ("plugin / CopyDICOM loop", f"{plugin / loop:.2f}x (target >= 5)"),
    ]
    return rows


def start_hec() -> tuple[subprocess.Popen[str], str]:
    """The HEC stand-in in its own process (its threads must not share the uploader's GIL)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    proc = subprocess.Popen(
        [sys.executable, "-c", HEC_SERVER.format(tests=tests, token=HEC_TOKEN)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def sinks_config(hec_url: str) -> dict[str, Any]:
    return {
        "index": {"Kind": "sqlite_index", "Path": "index.sqlite"},
        "splunk": {"Kind": "splunk_hec", "Url": hec_url, "TokenEnv": "BENCH_HEC_TOKEN"},
    }


def sinks_done(server: OrthancProcess, n: int) -> bool:
    sinks = server.get("/dicomsync/status")["Sinks"]
    return all(s["Done"] >= n and s["Queued"] == s["Sending"] == 0 for s in sinks.values())


INGEST_VARIANTS: list[tuple[str, str]] = [
    ("plugin off", "off"),
    ("Python plugin with an empty script", "empty"),
    ("Python plugin, a no-op OnStoredInstance only", "stored"),
    ("plugin on, routes fire after the upload", "deferred"),
    ("plugin on, routing to B during the upload", "routing"),
    ("plugin off, B receiving the same instances meanwhile", "off-b"),
    ("plugin on, tag sinks indexing during the upload", "sinks"),
]


def bench_ingest(
    base: Path, files: list[Path], rounds: int, kinds: set[str] | None = None
) -> list[tuple[str, str]]:
    """Upload rate into A: plugin off; plugin on with routing deferred past the upload
    (StableAge 60: the callbacks' own cost); plugin on with routing to B during the upload
    (StableAge 1: A's workers and B's ingest share the machine's CPUs with the upload);
    tag sinks indexing during the upload (routes deferred); a bare no-op OnStoredInstance;
    and the control for routing: plugin off while another client uploads the same
    instances to B (B's ingest then takes the same share of this machine as when A routes
    to it, so the ratio of the two is the plugin's own cost)."""
    empty = base / "empty.py"
    empty.write_text("")
    stored_noop = base / "stored_noop.py"
    stored_noop.write_text(STORED_NOOP)
    variants = [v for v in INGEST_VARIANTS if v[1] == "off" or not kinds or v[1] in kinds]
    rates: dict[str, list[float]] = {label: [] for label, _ in variants}
    drain: list[tuple[float, float]] = []  # (fraction indexed when the upload ended, s to drain)
    b = OrthancProcess(base / "ing-b", "b").start()
    hec, hec_url = start_hec()
    try:
        for i in range(rounds):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]  # no order bias
            for k, (label, kind) in enumerate(order):
                folder = base / f"ing-a-{i}-{k}"
                config: dict[str, Any] = {"StableAge": 1}
                plugin, env = False, {}
                if kind in ("empty", "stored"):
                    script = empty if kind == "empty" else stored_noop
                    config.update(Plugins=[PYTHON_PLUGIN], PythonScript=str(script))
                elif kind != "off":
                    plugin = True
                    config = plugin_config(b, True, 4)
                    config["StableAge"] = 1 if kind == "routing" else 60
                    if kind == "sinks":
                        config["DicomSync"]["Sinks"] = sinks_config(hec_url)
                        env = {"BENCH_HEC_TOKEN": HEC_TOKEN}
                a = OrthancProcess(folder, "a", plugin=plugin, config=config, env=env).start()
                try:
                    with ThreadPoolExecutor(1) as other:
                        to_b = other.submit(upload, b.url, files) if kind == "off-b" else None
                        rates[label].append(len(files) / upload(a.url, files))
                        if to_b is not None:
                            to_b.result()
                    if kind == "sinks":
                        st = a.get("/dicomsync/status")["Sinks"]
                        indexed = min(s["Done"] for s in st.values()) / len(files)
                        drain.append((indexed, wait(lambda a=a: sinks_done(a, len(files)))))
                finally:
                    a.stop()
                    shutil.rmtree(folder, ignore_errors=True)  # 0.5 GB of storage per round
                clear(b)
    finally:
        hec.kill()
        hec.wait()
        b.stop()
    med = {label: statistics.median(v) for label, v in rates.items()}
    off = med["plugin off"]
    rows = [
        (
            label,
            f"{rate:7.1f} instances/s (median of {rounds}, {min(rates[label]):.0f}-"
            f"{max(rates[label]):.0f}), {rate / off:.2f}x off",
        )
        for label, rate in med.items()
    ]
    control = "plugin off, B receiving the same instances meanwhile"
    routing = "plugin on, routing to B during the upload"
    if control in med and routing in med:
        rows.append(
            (
                "routing to B vs its control (B as busy)",
                f"{med[routing] / med[control]:.2f}x: the plugin's own cost while routing",
            )
        )
    rows.append(("target", ">= 0.95x off (routes: issue 3 (b); tag sinks: issue 4)"))
    if drain:
        rows.append(
            (
                "tag sinks: indexed when the upload ended",
                f"{statistics.median(d[0] for d in drain):.0%} of the instances, the rest "
                f"{statistics.median(d[1] for d in drain):.1f} s later (median)",
            )
        )
    return rows


def bench_backfill(base: Path, studies: int) -> list[tuple[str, str]]:
    files = generate(base / "bf-data", studies, 1, 64, "BF")
    b = OrthancProcess(base / "bf-b", "b").start()
    a = OrthancProcess(base / "bf-a", "a", plugin=True, config=plugin_config(b, True, 8)).start()
    try:
        upload(a.url, files, threads=4)
        wait(lambda: drained(a, "b", studies))
        timings = []
        for _ in range(3):
            r = requests.post(f"{a.url}/dicomsync/backfill", json={"Destination": "b"}, timeout=600)
            r.raise_for_status()
            answer = r.json()
            assert answer["AlreadyDelivered"] == studies, answer
            timings.append(answer["Seconds"])
        t = time.perf_counter()
        requests.post(
            f"{a.url}/dicomsync/backfill", json={"Destination": "b"}, timeout=600
        ).raise_for_status()
        wall = time.perf_counter() - t
    finally:
        a.stop()
        b.stop()
    best = min(timings)
    return [
        (
            f"backfill of {studies} delivered studies",
            f"{best * 1000 / studies:.2f} ms/study "
            f"in the plugin, {wall * 1000 / studies:.2f} ms/study wall (target < 5)",
        )
    ]


def bench_memory(
    base: Path, total: int, size: int, storage_cache: int | None = None
) -> list[tuple[str, str]]:
    """RSS of A sampled after each batch of 1,000 instances, once with the plugin routing
    every study to B and once without the plugin (Orthanc's own growth, for reference).
    ``storage_cache`` sets Orthanc's MaximumStorageCacheSize (MB; Orthanc's default 128)."""
    per_study, batch_studies = 10, 100
    batches = max(1, total // (per_study * batch_studies))
    rows = []
    for plugin in (False, True):
        tag = "on" if plugin else "off"
        b = OrthancProcess(base / f"mem-b-{tag}", "b").start()
        config = plugin_config(b, True, 4) if plugin else {"StableAge": 1}
        if storage_cache is not None:
            config["MaximumStorageCacheSize"] = storage_cache
        a = OrthancProcess(base / f"mem-a-{tag}", "a", plugin=plugin, config=config).start()
        samples = []
        try:
            for i in range(batches):
                files = generate(
                    base / f"mem-data-{tag}-{i}", batch_studies, per_study, size, f"M{i:03d}_"
                )
                upload(a.url, files, threads=2)
                if plugin:
                    wait(lambda a=a, i=i: drained(a, "b", (i + 1) * batch_studies))
                assert a.pid is not None
                samples.append(rss_mb(a.pid))
                for f in files:
                    f.unlink()
        finally:
            a.stop()
            b.stop()
        routed = batches * batch_studies * per_study
        label = "plugin routing to B" if plugin else "plugin off (Orthanc alone)"
        rows.append(
            (
                label,
                f"{samples[0]:.0f} MB after 1000, {samples[-1]:.0f} MB after {routed}: "
                f"{samples[-1] - samples[0]:+.0f} MB",
            )
        )
    rows.append(("target", "growth < 100 MB with the plugin"))
    return rows


def tiny_studies(start: int, n: int, prefix: str) -> Iterator[bytes]:
    """``n`` studies of one 64-byte-pixel instance each, made in memory with pydicom."""
    from io import BytesIO

    from pydicom.uid import generate_uid

    for s in range(start, start + n):
        buf = BytesIO()
        make_instance(
            None, patient_id=f"{prefix}{s:06d}", study_uid=generate_uid(), pixel_bytes=64
        ).save_as(buf, enforce_file_format=True)
        yield buf.getvalue()


def upload_bytes(url: str, items: Iterator[bytes], threads: int = 2) -> list[str]:
    """Upload every item; the Orthanc study IDs they went into."""
    import threading

    lock = threading.Lock()
    studies: list[str] = []

    def run() -> None:
        with requests.Session() as s:
            s.headers.update({"Accept-Encoding": "identity", "Content-Type": "application/dicom"})
            while True:
                with lock:
                    data = next(items, None)
                if data is None:
                    return
                r = s.post(url + "/instances", data=data, timeout=120)
                r.raise_for_status()
                with lock:
                    studies.append(str(r.json()["ParentStudy"]))

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run) for _ in range(threads)]:
            f.result()
    return studies


def delete_studies(server: OrthancProcess, studies: list[str]) -> None:
    with requests.Session() as s:
        for study in studies:
            s.delete(f"{server.url}/studies/{study}", timeout=120).raise_for_status()


def bench_studies(
    base: Path,
    total: int,
    batch: int = 1000,
    variants: set[str] | None = None,
    delete: bool = False,
) -> list[tuple[str, str]]:
    """RSS of A after each ``batch`` of one-instance studies: plugin routing every study to
    B, then Orthanc alone (no plugin) ingesting as many, as the control. Orthanc's storage
    cache is off (``MaximumStorageCacheSize`` 0) so that only the process itself grows.

    ``delete``: each batch, once routed, is deleted from A and B (in every variant), so
    that Orthanc's index stays at one batch while the plugin's queue still keeps a
    ``done`` record per routed study; this keeps the time per batch flat on Orthanc's
    side, but hides any memory of the plugin that grows with the size of A's index.
    ``$DICOMSYNC_BENCH_SMAPS``: a folder where A's ``/proc`` ``smaps``,
    ``smaps_rollup`` and ``status`` are copied at each sample."""
    batches = max(1, total // batch)
    rows = []
    # plugin routing every study to B; Orthanc's own peer store of each batch to B (the
    # native path, plugin off); Orthanc alone, ingesting only
    for tag, plugin, with_b in (("on", True, True), ("native", False, True), ("off", False, False)):
        if variants and tag not in variants:
            continue
        b = OrthancProcess(base / f"many-b-{tag}", "b").start() if with_b else None
        config: dict[str, Any] = {"StableAge": 1}
        if b is not None:
            config = (
                plugin_config(b, True, 4)
                if plugin
                else {**config, "OrthancPeers": {"b": {"Url": b.url}}}
            )
        config["MaximumStorageCacheSize"] = 0
        a = OrthancProcess(base / f"many-a-{tag}", "a", plugin=plugin, config=config).start()
        samples: list[tuple[int, float]] = []
        started = time.perf_counter()
        try:
            for i in range(batches):
                studies = upload_bytes(a.url, tiny_studies(i * batch, batch, f"S{tag}"))
                if plugin:
                    # each status call scans the queue's done jobs: poll gently
                    wait(lambda a=a, i=i: drained(a, "b", (i + 1) * batch), interval=1.0)
                elif b is not None:
                    requests.post(
                        f"{a.url}/peers/b/store",
                        json={"Resources": studies, "Synchronous": True},
                        timeout=3600,
                    ).raise_for_status()
                assert a.pid is not None
                if delete:
                    delete_studies(a, studies)
                    if b is not None:
                        delete_studies(b, studies)  # same IDs: PatientID + StudyInstanceUID
                samples.append(((i + 1) * batch, rss_mb(a.pid)))
                dump = os.environ.get("DICOMSYNC_BENCH_SMAPS")
                if dump:
                    Path(dump).mkdir(parents=True, exist_ok=True)
                    n = (i + 1) * batch
                    for what in ("smaps", "smaps_rollup", "status"):
                        shutil.copy(f"/proc/{a.pid}/{what}", f"{dump}/{tag}-{n:06d}.{what}")
                if i % 10 == 9 or i == batches - 1:
                    print(
                        f"  {tag}: {(i + 1) * batch} studies, RSS {samples[-1][1]:.0f} MB, "
                        f"{time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
        finally:
            a.stop()
            if b is not None:
                b.stop()
        first, last = samples[0][1], samples[-1][1]
        peak = max(r for _, r in samples)
        label = {
            "on": "plugin routing to B",
            "native": "plugin off, Orthanc's /peers/b/store of each batch (native)",
            "off": "plugin off, Orthanc alone ingesting",
        }[tag]
        rows.append(
            (
                label,
                f"{first:.0f} MB after {samples[0][0]}, {last:.0f} MB after {samples[-1][0]} "
                f"(peak {peak:.0f}): {last - first:+.0f} MB, "
                f"{time.perf_counter() - started:.0f} s",
            )
        )
    rows.append(("target", "growth within 50 MB with the plugin over 100,000 studies"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--size", type=int, default=500_000, help="pixel bytes per instance")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--backfill-studies", type=int, default=1000)
    p.add_argument("--memory-instances", type=int, default=10_000)
    p.add_argument("--ingest-rounds", type=int, default=4)
    p.add_argument(
        "--storage-cache", type=int, help="Orthanc's MaximumStorageCacheSize (MB) in (d)"
    )
    p.add_argument(
        "--memory-studies", type=int, default=100_000, help="one-instance studies in (e)"
    )
    p.add_argument(
        "--memory-variant",
        choices=["on", "native", "off"],
        action="append",
        help="run only these variants of (e) (default: all)",
    )
    p.add_argument(
        "--memory-delete",
        action="store_true",
        help="(e): delete each routed batch from A and B (Orthanc's index stays small)",
    )
    p.add_argument("--only", choices=["a", "b", "c", "d", "e"], action="append")
    p.add_argument(
        "--ingest-variant",
        choices=[kind for _, kind in INGEST_VARIANTS],
        action="append",
        help="run only these variants of (b), and always 'off' (default: all)",
    )
    args = p.parse_args()
    if args.quick:
        args.instances, args.backfill_studies, args.memory_instances = 100, 100, 1000
        args.memory_studies = 2000
        args.ingest_rounds = 1
    only = set(args.only or "abcde")
    base = workdir("plugin")
    print(f"work folder: {base}", flush=True)
    files: list[Path] = []
    if only & {"a", "b"}:
        files = generate(base / "data", max(1, args.instances // 50), 50, args.size, "R")
    if "a" in only:
        report(
            f"(a) replication A->B, {len(files)} instances of {args.size / 1e6:.1f} MB",
            bench_replication(base, files, args.concurrency),
        )
    if "b" in only:
        report(
            f"(b) ingest into A, {len(files)} instances",
            bench_ingest(base, files, args.ingest_rounds, set(args.ingest_variant or ())),
        )
    if "c" in only:
        report(
            "(c) backfill of already-delivered studies", bench_backfill(base, args.backfill_studies)
        )
    if "d" in only:
        report(
            f"(d) Orthanc RSS over {args.memory_instances} routed instances",
            bench_memory(base, args.memory_instances, 20_000, args.storage_cache),
        )
    if "e" in only:
        report(
            f"(e) Orthanc RSS over {args.memory_studies} routed one-instance studies, "
            "storage cache off",
            bench_studies(
                base,
                args.memory_studies,
                variants=set(args.memory_variant or ()),
                delete=args.memory_delete,
            ),
        )


if __name__ == "__main__":
    main()
