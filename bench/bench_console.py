"""Console benchmark (issue 14): the overview page with 1,000,000 jobs in the queue.

A ``Service`` (the plugin's composition root, without Orthanc: an in-memory transport
that is never asked) is configured like ``make run`` (the ``zips`` destination, the
``index`` sink) plus a second destination, and its SQLite queue is filled with
``--jobs`` jobs (1,000,000 by default) through ``enqueue_many`` in transactions of
50,000: 60 % study jobs for ``zips``, 20 % for ``archive``, 20 % tags jobs for ``index``;
a few thousand of them are then leased and finished (done, failed, retried later) so
every state and a last error exist. The throughput record gets a day of samples.

Timed, each ``--repeat`` times after one warm-up, through ``Service.handle`` (the path
Orthanc's web thread takes, HTML produced and encoded, no HTTP):

- ``GET ui`` (the overview page): target < 200 ms at 1M jobs;
- ``GET ui/api/overview`` (the same numbers as JSON);
- ``GET status`` (the REST API's own status: the native path the console is built on,
  reported as the ratio overview/status in the same run);
- ``GET ui/jobs`` (the newest 100 jobs) and ``GET ui/jobs?state=failed``.

Run: ``.venv/bin/python bench/bench_console.py [--jobs 1000000] [--repeat 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from dicomsync.errors import NotFound
from dicomsync.orthanc_client import Transport
from dicomsync.queue import Delivered, NewJob
from dicomsync.service.app import Service

from common import report, workdir

BATCH = 50_000


class NoOrthanc(Transport):
    """The pages never call Orthanc; anything that tries is a 404."""

    def get(self, path: str) -> bytes:
        raise NotFound(path)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        raise NotFound(path)

    def delete(self, path: str) -> None:
        raise NotFound(path)


def build(base: Path) -> Service:
    for name in ("zips", "archive"):
        (base / name).mkdir(parents=True, exist_ok=True)
    conf = {
        "DicomSync": {
            "Places": {
                "zips": {"Kind": "zipped_root", "Path": str(base / "zips")},
                "archive": {"Kind": "zipped_root", "Path": str(base / "archive")},
            },
            "Routes": [{"Destination": "zips"}, {"Destination": "archive"}],
            "Sinks": {"index": {"Kind": "sqlite_index", "Path": "index.sqlite"}},
            "StateDirectory": str(base / "state"),
        }
    }
    service = Service(conf, str(base / "orthanc.json"), NoOrthanc())
    if service.config_error or service.queue is None:
        raise SystemExit(f"cannot configure the service: {service.config_error}")
    return service


def fill(service: Service, total: int) -> float:
    queue = service.queue
    assert queue is not None
    start = time.perf_counter()
    for first in range(0, total, BATCH):
        batch = []
        for n in range(first, min(total, first + BATCH)):
            share = n % 10
            if share < 6:
                batch.append(NewJob("study", f"study-{n:08d}", "zips", study_uid=f"1.2.{n}"))
            elif share < 8:
                batch.append(NewJob("study", f"study-{n:08d}", "archive", study_uid=f"1.2.{n}"))
            else:
                batch.append(NewJob("tags", f"instance-{n:08d}", "index"))
        queue.enqueue_many(batch)
    seconds = time.perf_counter() - start
    # every state and a last error: done, failed, retried later, sending
    for dest in ("zips", "archive"):
        leased = queue.lease(dest, 3000)
        queue.done_many([(j, Delivered(f"fp-{j.id}", sent=7)) for j in leased[:2000]])
        for j in leased[2000:2500]:
            queue.fail(j, f"{dest} refused study {j.resource}: HTTP 409 <conflict>")
        for j in leased[2500:2800]:
            queue.retry_later(j, "connection refused", delay=3600)
    return seconds


def fake_day(service: Service) -> None:
    """A day of per-minute samples, as the metrics thread would have recorded them."""
    t = service.throughput
    now = time.time()
    totals = {"zips": 0, "archive": 0, "sink:index": 0}
    for minute in range(24 * 60, -1, -1):
        for i, key in enumerate(totals):
            totals[key] += (minute * 7 + i * 13) % 600
        t.add(dict(totals), now=now - minute * 60)


def timings(service: Service, path: str, query: dict[str, str], repeat: int) -> list[float]:
    reply = service.handle("GET", path, query, None)  # warm-up
    if reply.status != 200:
        raise SystemExit(f"GET {path}: {reply.status} {reply.body!r}"[:500])
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        reply = service.handle("GET", path, query, None)
        reply.payload()  # what the glue sends
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    service = build(workdir("console"))
    fill_s = fill(service, args.jobs)
    fake_day(service)
    queue = service.queue
    assert queue is not None
    stats = queue.stats()
    held = sum(s.queued + s.sending + s.done + s.failed for s in stats.values())
    rows: list[tuple[str, str]] = [
        ("jobs in the queue", f"{held:,} (filled in {fill_s:.1f} s, {args.jobs / fill_s:,.0f}/s)"),
    ]
    medians = {}
    for label, path, query in (
        ("overview page  GET ui", "ui", {}),
        ("overview JSON  GET ui/api/overview", "ui/api/overview", {}),
        ("REST status    GET status", "status", {}),
        ("jobs page      GET ui/jobs", "ui/jobs", {}),
        ("failed jobs    GET ui/jobs?state=failed", "ui/jobs", {"state": "failed"}),
    ):
        ms = timings(service, path, query, args.repeat)
        medians[path + str(query)] = statistics.median(ms)
        p95 = sorted(ms)[int(len(ms) * 0.95) - 1]
        rows.append((label, f"median {statistics.median(ms):7.2f} ms   p95 {p95:7.2f} ms"))
    overview, status = medians["ui{}"], medians["status{}"]
    rows.append(("overview / status", f"{overview / status:.2f}x"))
    verdict = "met" if overview < 200 else "MISSED"
    rows.append(("target", f"overview < 200 ms at 1M jobs: {verdict} ({overview:.1f} ms)"))
    report(f"console overview with {args.jobs:,} jobs (SQLite queue)", rows)
    queue.close()


if __name__ == "__main__":
    main()
