"""The service keeps the queue small: its metrics loop prunes done study jobs older than
``STUDY_JOBS_KEPT`` into the totals, their fingerprints kept, even while Orthanc's
``/changes`` cannot be read."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_service_units import Memory

from dicomsync.queue import Delivered, NewJob
from dicomsync.service import app
from dicomsync.service.app import Service


def test_the_metrics_loop_prunes_old_done_study_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zips").mkdir()
    section = {
        "Places": {"zips": {"Kind": "zipped_root", "Path": str(tmp_path / "zips")}},
        "Routes": [{"Destination": "zips"}],
        "StateDirectory": str(tmp_path / "state"),
    }
    service = Service({"DicomSync": section}, str(tmp_path / "orthanc.json"), Memory({}))
    queue = service.queue
    assert queue is not None and service.config is not None
    try:
        queue.enqueue_many([NewJob("study", s, "zips", fingerprint=None) for s in ("a", "b")])
        for job in queue.lease("zips", 2, 60, kind="study"):
            queue.done_many([(job, Delivered(f"fp-{job.resource}", 1))])
        queue.enqueue(NewJob("study", "c", "zips"))  # still queued: stays
        stop = threading.Event()
        stop.set()  # one round of the loop
        monkeypatch.setattr(app, "STUDY_JOBS_KEPT", 3600.0)
        service._metrics_loop(stop)
        assert len(queue.jobs(state="done")) == 2  # younger than STUDY_JOBS_KEPT
        monkeypatch.setattr(app, "STUDY_JOBS_KEPT", -10.0)
        service._metrics_loop(stop)  # /changes answers 404 here: pruned all the same
        assert queue.jobs(state="done") == [] and len(queue.jobs()) == 1
        assert queue.fingerprints("zips") == {"a": "fp-a", "b": "fp-b"}
        stats = queue.stats()["zips"]
        assert (stats.done, stats.queued, stats.delivered) == (2, 1, 2)
        assert queue.enqueue(NewJob("study", "a", "zips", fingerprint="fp-a")).action == (
            "unchanged"
        )
    finally:
        queue.close()
