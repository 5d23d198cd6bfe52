"""Chaos: about 20% of destination requests fail at random and Orthanc A is killed with
``kill -9`` mid-queue; every SOP UID still arrives at B exactly once.

B counts every ``POST /instances`` it is sent (``tests/orthanc_counter.py``), including
instances it already holds, so a duplicate send is visible although Orthanc itself
deduplicates by SOP UID. The proxy in front of B (``tests/faulty_proxy.py``) fails
requests before forwarding them (B never saw them) and after (B stored the instance, A
is told it failed); neither may make A send an instance twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faulty_proxy import FaultyProxy
from test_plugin_resilience import study_bytes

from plugin_helpers import (
    counting_orthanc,
    jobs,
    plugin_orthanc,
    posted,
    settled,
    status,
    studies_by_id,
    wait_for,
)

pytestmark = pytest.mark.orthanc

STUDIES, PER_STUDY = 30, 10


def test_random_destination_faults_and_a_kill_9_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    b = counting_orthanc(tmp_path / "b", "b").start()
    proxy = FaultyProxy(b.url, rate=0.2).start()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": {"Kind": "orthanc", "Url": proxy.url, "UploadThreads": 2, "Timeout": 10}},
        [{"Destination": "b", "Concurrency": 2}],
        sync={"Retry": {"BaseDelay": 0.2, "MaxDelay": 1, "MaxAttempts": 1000}},
    ).start()
    try:
        for s in range(STUDIES):
            for blob in study_bytes(f"CHAOS{s:02d}", PER_STUDY, pixel_bytes=20_000):
                a.upload(blob)

        def mid_queue() -> dict | None:
            d = status(a)["Destinations"]["b"]
            return d if d["Done"] >= 5 and d["Done"] + d["Failed"] < STUDIES else None

        at_kill = wait_for(mid_queue, timeout=60, what="some studies delivered, others not")
        a.kill()
        assert at_kill["Done"] < STUDIES

        a.start()
        wait_for(
            lambda: settled(a, {"b": STUDIES}),
            timeout=100,
            what="every study delivered after the restart, through the faults",
        )
        assert not jobs(a, state="failed") and not jobs(a, state="sending")
        source = studies_by_id(a)
        assert len(source) == STUDIES
        assert studies_by_id(b) == source  # nothing lost
        # nothing sent twice: B was sent each instance once (faults after forwarding included)
        assert posted(b) == STUDIES * PER_STUDY, proxy.counts
        assert proxy.counts["503"] + proxy.counts["drop"] + proxy.counts["503-after"] >= 20
        # what B stored is counted, up to the instances the killed run stored unrecorded
        # and those whose store was answered with an injected 503
        delivered = status(a)["Destinations"]["b"]["Delivered"]
        assert delivered <= STUDIES * PER_STUDY
    finally:
        try:
            a.stop()
        finally:
            proxy.stop()
            b.stop()
    assert time.monotonic() - started < 120
