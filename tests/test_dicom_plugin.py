"""Plugin routes to a ``dicom`` destination: exactly once on the wire, after the
destination was down for a while and after a ``kill -9`` of Orthanc mid-send; and the
``CalledAet`` route filter on what Orthanc 1.10.1 records for a C-STORE it received."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from test_plugin_resilience import study_bytes

from dicomsync.identity import StudyIdentity
from dicomsync.places.base import PLACES, Instance

from dicom_peers import ScpPeer, dicom_section
from plugin_helpers import jobs, plugin_orthanc, settled, status, studies_by_id, wait_for

pytestmark = pytest.mark.orthanc


def sop_uids(server) -> set[str]:  # type: ignore[no-untyped-def]
    return set().union(*studies_by_id(server).values())


def test_destination_down_then_up_delivers_each_instance_exactly_once(tmp_path: Path) -> None:
    peer = ScpPeer(find=True)  # not started yet: its port refuses connections
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": dicom_section(peer)},
        [{"Destination": "b"}],
        sync={"Retry": {"BaseDelay": 0.5, "MaxDelay": 2, "MaxAttempts": 100}},
    ).start()
    try:
        for blob in study_bytes("DOWN1", 3) + study_bytes("DOWN2", 2):
            a.upload(blob)

        def failing() -> bool:
            js = jobs(a, destination="b")
            return len(js) == 2 and all(
                j["Attempts"] >= 2 and "cannot reach DICOM node" in (j["LastError"] or "")
                for j in js
            )

        wait_for(failing, timeout=60, what="two failed attempts per job")
        assert "does not answer yet" in a.log_text()  # the startup C-ECHO said so
        assert status(a).get("PlaceErrors", {}) == {}  # down is not misconfigured
        peer.start()
        wait_for(lambda: settled(a, {"b": 2}), timeout=60, what="delivery after B came up")
        assert set(peer.received) == sop_uids(a)
        assert set(peer.received.values()) == {1}  # exactly once on the wire
    finally:
        try:
            a.stop()
        finally:
            peer.stop()


def test_kill_9_mid_send_then_restart_sends_nothing_twice(tmp_path: Path) -> None:
    peer = ScpPeer(find=True).start()
    a = plugin_orthanc(
        tmp_path / "a", "a", {"b": dicom_section(peer)}, [{"Destination": "b", "Concurrency": 1}]
    ).start()
    n_studies = 12
    try:
        for s in range(n_studies):
            for blob in study_bytes(f"CRASH{s:02d}", 10, pixel_bytes=300_000):
                a.upload(blob)

        def mid_send() -> dict | None:
            d = status(a)["Destinations"]["b"]
            return d if d["Sending"] and 1 <= d["Done"] < n_studies else None

        at_kill = wait_for(mid_send, timeout=120, what="some studies sent, others sending")
        a.kill()
        assert at_kill["Done"] < n_studies
        a.start()
        wait_for(lambda: settled(a, {"b": n_studies}), timeout=180, what="all delivered")
        assert not jobs(a, state="failed")
        assert set(peer.received) == sop_uids(a) and len(peer.received) == 10 * n_studies
        assert set(peer.received.values()) == {1}, "an instance went over the wire twice"
    finally:
        try:
            a.stop()
        finally:
            peer.stop()


def test_called_aet_filter_routes_by_the_ae_title_a_modality_called(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"out": {"Kind": "dicom_root", "Path": str(out)}},
        [{"Destination": "out", "Filter": {"CalledAet": "ROUTEME", "CallingAet": "MODALITY"}}],
    ).start()
    try:
        for called, patient in (("ROUTEME", "ROUTED"), ("OTHER", "NOTROUTED")):
            modality = PLACES.build(
                "m",
                {
                    "Kind": "dicom",
                    "Host": "127.0.0.1",
                    "Port": a.dicom_port,
                    "CalledAet": called,
                    "CallingAet": "MODALITY",
                },
                tmp_path,
            )
            blobs = study_bytes(patient, 2)
            instances = [
                Instance(f"{patient}{i}", f"{i}.dcm", functools.partial(bytes, b))
                for i, b in enumerate(blobs)
            ]
            with modality:
                modality.receive("x/y", instances, StudyIdentity("", frozenset()))
        meta = a.get(f"/instances/{a.get('/instances')[0]}/metadata?expand")
        assert meta.get("CalledAET") in ("ROUTEME", "OTHER") and meta["RemoteAET"] == "MODALITY"
        wait_for(lambda: settled(a, {"out": 1}), timeout=60, what="the ROUTEME study routed")
        assert [p.name for p in out.iterdir()] == ["ROUTED"]
        assert len(jobs(a, destination="out")) == 1
    finally:
        a.stop()


def test_a_wrong_called_aet_is_a_place_error_at_startup_and_its_jobs_wait(tmp_path: Path) -> None:
    peer = ScpPeer(find=True, require_called_aet=True).start()
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": dicom_section(peer, CalledAet="WRONG")},
        [{"Destination": "b"}],
    ).start()
    try:
        errors = wait_for(lambda: status(a).get("PlaceErrors"), timeout=30, what="PlaceErrors")
        assert errors == {
            "b": f"WRONG@127.0.0.1:{peer.port}: association rejected (Rejected Permanent, "
            "Service User: Called AE title not recognised)"
        }
        for blob in study_bytes("WRONGAET", 2):
            a.upload(blob)
        wait_for(lambda: jobs(a, destination="b"), timeout=30, what="the job")
        failed = wait_for(lambda: jobs(a, state="failed"), timeout=60, what="the job failing")
        assert "association rejected" in failed[0]["LastError"]
        assert not peer.received  # nothing was sent anywhere
    finally:
        try:
            a.stop()
        finally:
            peer.stop()
