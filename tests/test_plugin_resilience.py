"""The plugin when things go wrong: a destination that is down, and Orthanc killed mid-send."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomdata import study_bytes
from plugin_helpers import (
    all_files,
    counting_orthanc,
    jobs,
    plugin_orthanc,
    settled,
    status,
    studies_by_id,
    study_keys,
    wait_for,
    zip_sop_uids,
)

pytestmark = pytest.mark.orthanc


def test_destination_down_retries_with_growing_delays_then_delivers(tmp_path: Path) -> None:
    b = counting_orthanc(tmp_path / "b", "b").start()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": {"Kind": "orthanc", "Url": b.url}},
        [{"Destination": "b"}],
        sync={"Retry": {"BaseDelay": 1, "MaxDelay": 8, "MaxAttempts": 100}},
    ).start()
    try:
        b.stop()
        for blob in study_bytes("DOWN1", 3) + study_bytes("DOWN2", 2):
            a.upload(blob)
        delays: dict[int, dict[int, float]] = {}  # job id -> attempt -> retry delay

        def watch() -> bool:
            for j in jobs(a, destination="b"):
                if j["State"] == "queued" and j["RetryDelay"] is not None:
                    delays.setdefault(j["Id"], {})[j["Attempts"]] = j["RetryDelay"]
                    assert "cannot reach Orthanc" in j["LastError"]
            return len(delays) == 2 and all(len(d) >= 3 for d in delays.values())

        wait_for(watch, timeout=60, what="three failed attempts per job")
        for per_attempt in delays.values():
            seen = [per_attempt[k] for k in sorted(per_attempt)]
            assert seen == sorted(seen) and seen[-1] > seen[0], seen
            for k, delay in per_attempt.items():
                ceiling = min(8.0, 2.0 ** (k - 1))
                assert ceiling / 2 - 0.01 <= delay <= ceiling + 0.01
        st = status(a)["Destinations"]["b"]
        assert st["Done"] == 0 and "cannot reach Orthanc" in st["LastError"]

        b.start()
        wait_for(lambda: settled(a, {"b": 2}), timeout=60, what="delivery after B came back")
        assert studies_by_id(b) == studies_by_id(a)
        assert status(a)["Destinations"]["b"]["Failed"] == 0
    finally:
        try:
            a.stop()
        finally:
            b.stop()


def test_kill_9_while_sending_then_restart_delivers_everything_once(tmp_path: Path) -> None:
    b = counting_orthanc(tmp_path / "b", "b").start()
    zips = tmp_path / "zips"
    zips.mkdir()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {
            "b": {"Kind": "orthanc", "Url": b.url},
            "zips": {"Kind": "zipped_root", "Path": str(zips)},
        },
        [{"Destination": "b", "Concurrency": 1}, {"Destination": "zips", "Concurrency": 1}],
    ).start()
    n_studies = 12
    try:
        for s in range(n_studies):
            for blob in study_bytes(f"CRASH{s:02d}", 10, pixel_bytes=300_000):
                a.upload(blob)

        def mid_send() -> dict | None:
            d = status(a)["Destinations"]
            busy = d["b"]["Sending"] + d["zips"]["Sending"]
            done = d["b"]["Done"] + d["zips"]["Done"]
            return d if busy and 2 <= done < 2 * n_studies else None

        at_kill = wait_for(mid_send, timeout=60, what="some studies sent, others sending")
        a.kill()
        assert at_kill["b"]["Done"] + at_kill["zips"]["Done"] < 2 * n_studies

        a.start()
        wait_for(
            lambda: settled(a, {"b": n_studies, "zips": n_studies}),
            timeout=120,
            what="everything delivered after the restart",
        )
        assert not jobs(a, state="sending") and not jobs(a, state="failed")
        source = studies_by_id(a)
        assert len(source) == n_studies
        assert studies_by_id(b) == source
        keys = study_keys(a)
        # (a hidden ".….partial" temp file of the killed write may remain; it never counts)
        visible = [p for p in all_files(zips) if not p.name.startswith(".")]
        assert sorted(visible) == sorted(zips / p / f"{s}.zip" for p, s in keys.values())
        for study_id, (patient, study) in keys.items():
            assert zip_sop_uids(zips / patient / f"{study}.zip") == source[study_id]
    finally:
        try:
            a.stop()
        finally:
            b.stop()


def test_study_stored_just_before_a_crash_is_routed_after_restart(tmp_path: Path) -> None:
    """Orthanc keeps "not yet stable" studies in memory: a crash before StableAge loses the
    STABLE_STUDY event. The plugin's catch-up of /changes routes such studies at the next start."""
    b = counting_orthanc(tmp_path / "b", "b").start()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": {"Kind": "orthanc", "Url": b.url}},
        [{"Destination": "b"}],
        config={"StableAge": 30},
    ).start()
    try:
        for blob in study_bytes("EARLY", 2):
            a.upload(blob)
        wait_for(lambda: settled(a, {"b": 0}), what="status answers")
        a.kill()  # long before the study is stable: no STABLE_STUDY was ever delivered
        assert b.get("/studies") == []
        a.start()
        wait_for(lambda: settled(a, {"b": 1}), timeout=60, what="caught-up study delivered")
        assert studies_by_id(b) == studies_by_id(a)
        assert "caught up 1 route job(s)" in a.log_text()
    finally:
        try:
            a.stop()
        finally:
            b.stop()
