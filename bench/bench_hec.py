"""HEC benchmark (issue 4, issue 9 point 14): events per second to the local HEC stand-in.

Events from the shared RDSRs and CT images are replicated with unique ids (so the
ledger does not skip them) and sent with the ``splunk_hec`` sink to
``tests/servers/hec.py`` on loopback: gzip on and off, and with indexer
acknowledgement. Each run starts from an empty ledger. Target: >= 5,000 events/s.

Ack ratio (issue 9, point 14): a backfill the way ``dicomsync index`` does it (the
CLI's own ``_flush``/``_count``: one ``submit`` per study of ``STUDY_EVENTS`` events,
so one batch per study, then one ``flush``), against a stand-in whose acks come
``ACK_DELAY`` = 1 s after a batch is accepted, with ``Ack`` off and on. Target: with
Ack, at least 0.8x the events/s without Ack. The last ack of a run is always ~1 s
away, so the ratio grows with the backfill's length (``ACK_TOTAL`` events here).

Run: ``.venv/bin/python bench/bench_hec.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dicomsync.sinks.base import build_sink
from dicomsync.tags import Event, events_from_path

from common import REPO, report

SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from servers.hec import HecServer, Token
server = HecServer(tokens=[Token({t!r}), Token({a!r}, use_ack=True)]).start()
server.state.ack_delay = {delay!r}
print(server.url, flush=True)
import http.server
# a control endpoint is not needed: the parent counts events through a search
while True:
    time.sleep(3600)
"""

TOKEN = "11111111-2222-3333-4444-555555555555"
ACK_TOKEN = "aaaaaaaa-2222-3333-4444-555555555555"
TOTAL = 20_000
ACK_DELAY = 1.0  # seconds from a batch's 200 to its ack (Splunk's indexing latency)
ACK_TOTAL = 40_000
ROUNDS = 3
STUDY_EVENTS = 300  # one batch per study: the case that was bound by ack latency


def sample_events() -> list[Event]:
    from dicomdata import data_dir

    base = data_dir()
    out: list[Event] = []
    for f in sorted((base / "rdsr").glob("*.dcm")):
        out += events_from_path(f)
    for f in sorted((base / "study_tree_pcir").rglob("*")):
        if f.is_file() and f.name != "DICOMDIR":
            out += events_from_path(f)
    return out


def run(url: str, events: list[Event], token: str, **options: object) -> float:
    os.environ["BENCH_HEC_TOKEN"] = token
    with tempfile.TemporaryDirectory() as tmp:
        sink = build_sink(
            "bench",
            {"Kind": "splunk_hec", "Url": url, "TokenEnv": "BENCH_HEC_TOKEN", **options},
            Path(tmp),
        )
        start = time.perf_counter()
        delivered = 0
        for i in range(0, len(events), 2000):
            delivered += len(sink.send(events[i : i + 2000]).delivered)
        seconds = time.perf_counter() - start
        sink.close()
    assert delivered == len(events)
    return len(events) / seconds


def backfill(url: str, events: list[Event], token: str, **options: object) -> float:
    """events/s of a ``dicomsync index``-style backfill: the CLI's code path per study."""
    from dicomsync.cli.tags import _count, _flush
    from dicomsync.queue.base import RetryPolicy

    os.environ["BENCH_HEC_TOKEN"] = token
    counts = {"events": 0, "rejected": 0}
    with tempfile.TemporaryDirectory() as tmp:
        sink = build_sink(
            "bench",
            {"Kind": "splunk_hec", "Url": url, "TokenEnv": "BENCH_HEC_TOKEN", **options},
            Path(tmp),
        )
        retry = RetryPolicy()
        start = time.perf_counter()
        for i in range(0, len(events), STUDY_EVENTS):
            _flush(sink, events[i : i + STUDY_EVENTS], counts, retry)
        _count(sink, sink.flush, counts, retry)
        seconds = time.perf_counter() - start
        sink.close()
    assert counts["events"] == len(events), counts
    return len(events) / seconds


def start_server(delay: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    script = SERVER.format(tests=str(REPO / "tests"), t=TOKEN, a=ACK_TOKEN, delay=delay)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    health(url)
    return proc, url


def ack_ratio(base: list[Event]) -> list[tuple[str, str]]:
    events = [
        dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#a{i}")
        for i in range(ACK_TOTAL)
    ]
    proc, url = start_server(ACK_DELAY)
    try:
        plain, acked = [], []
        for _ in range(ROUNDS):  # pairs run back to back: the machine may be shared
            plain.append(backfill(url, events, TOKEN))
            acked.append(backfill(url, events, ACK_TOKEN, Ack=True))
    finally:
        proc.terminate()
        proc.wait(10)
    ratios = sorted(a / p for a, p in zip(acked, plain, strict=True))
    return [
        (
            f"backfill, {STUDY_EVENTS} events/study, no ack",
            f"{statistics.median(plain):8.0f} events/s (median of {ROUNDS})",
        ),
        (
            f"backfill, {STUDY_EVENTS} events/study, ack ({ACK_DELAY:g} s ack delay)",
            f"{statistics.median(acked):8.0f} events/s",
        ),
        (
            "ack / no ack, per pair",
            f"{statistics.median(ratios):8.2f}x median ({', '.join(f'{r:.2f}' for r in ratios)})"
            "  (target >= 0.80)",
        ),
    ]


def health(url: str) -> None:
    with urllib.request.urlopen(url + "/services/collector/health", timeout=5) as r:
        assert json.loads(r.read())["code"] == 17


def main() -> None:
    base = sample_events()
    events = [
        dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i}")
        for i in range(TOTAL)
    ]
    size = sum(len(str(e.fields)) for e in base) // len(base)
    # The stand-in runs in its own process, as Splunk would (no shared GIL).
    proc, url = start_server()
    try:
        rows = [
            ("gzip, 500 events/batch", run(url, events, TOKEN)),
            ("no gzip, 500 events/batch", run(url, events, TOKEN, Gzip=False)),
            ("gzip + indexer ack", run(url, events, ACK_TOKEN, Ack=True)),
            ("gzip, 50 events/batch", run(url, events, TOKEN, BatchEvents=50)),
        ]
    finally:
        proc.terminate()
        proc.wait(10)
    report(
        f"Splunk HEC sink -> local stand-in ({TOTAL} events, ~{size} chars each, incl. ledger)",
        [(label, f"{r:8.0f} events/s  (target >= 5000)") for label, r in rows],
    )
    report(
        f"Splunk HEC, indexer acknowledgement pipelined ({ACK_TOTAL} events)",
        ack_ratio(base),
    )


if __name__ == "__main__":
    main()
