"""HEC benchmark (issue 4): events per second to the local HEC stand-in, batched.

Events from the shared RDSRs and CT images are replicated with unique ids (so the
ledger does not skip them) and sent with the ``splunk_hec`` sink to
``tests/servers/hec.py`` on loopback: gzip on and off, and with indexer
acknowledgement. Each run starts from an empty ledger. Target: >= 5,000 events/s.

Run: ``.venv/bin/python bench/bench_hec.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
print(server.url, flush=True)
import http.server
# a control endpoint is not needed: the parent counts events through a search
while True:
    time.sleep(3600)
"""

TOKEN = "11111111-2222-3333-4444-555555555555"
ACK_TOKEN = "aaaaaaaa-2222-3333-4444-555555555555"
TOTAL = 20_000


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
            delivered += len(sink.send(events[i : i + 2000]))
        seconds = time.perf_counter() - start
        sink.close()
    assert delivered == len(events)
    return len(events) / seconds


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
    script = SERVER.format(tests=str(REPO / "tests"), t=TOKEN, a=ACK_TOKEN)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        health(url)
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


if __name__ == "__main__":
    main()
