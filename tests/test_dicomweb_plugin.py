"""Plugin routes to a ``dicomweb`` destination: Orthanc A (the plugin) -> STOW-RS -> Orthanc B
(Debian's DICOMweb plugin), through the durable queue, exactly once.

The gate of ``tests/servers/dicomweb_gate.py`` sits in front of B and lists every SOP
instance B accepted over STOW-RS (``gate.stowed``, duplicates included), so "exactly
once" is counted, not inferred from B's final content alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_plugin_resilience import study_bytes

from orthanc_server import OrthancProcess
from plugin_helpers import jobs, plugin_orthanc, settled, status, studies_by_id, wait_for
from servers.dicomweb_gate import Gate

pytestmark = pytest.mark.orthanc


@pytest.fixture
def web_b(tmp_path: Path) -> Iterator[OrthancProcess]:
    b = OrthancProcess(tmp_path / "b", "b", dicomweb=True).start()
    yield b
    b.stop()


@pytest.fixture
def gate(web_b: OrthancProcess) -> Iterator[Gate]:
    g = Gate(web_b.dicomweb_url).start()
    yield g
    g.stop()


def once(gate: Gate, source: dict[str, set[str]]) -> None:
    counts = Counter(gate.stowed)
    assert set(counts) == set().union(*source.values())
    assert set(counts.values()) == {1}, [u for u, n in counts.items() if n > 1]


def test_route_to_dicomweb_delivers_once_after_the_destination_was_down(
    tmp_path: Path, web_b: OrthancProcess, gate: Gate
) -> None:
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": {"Kind": "dicomweb", "Url": gate.url, "InstancesPerRequest": 2}},
        [{"Destination": "b"}],
        sync={"Retry": {"BaseDelay": 0.5, "MaxDelay": 2, "MaxAttempts": 100}},
    ).start()
    try:
        web_b.stop()
        for blob in study_bytes("WEBDOWN1", 5) + study_bytes("WEBDOWN2", 3):
            a.upload(blob)

        def failing() -> bool:
            queued = [j for j in jobs(a, destination="b") if j["State"] == "queued"]
            return len(queued) == 2 and all(
                j["Attempts"] >= 2 and "server busy or failing (502" in (j["LastError"] or "")
                for j in queued
            )

        wait_for(failing, timeout=60, what="two failed attempts per job while B is down")
        assert web_b.proc is None and gate.stowed == []
        web_b.start()
        wait_for(lambda: settled(a, {"b": 2}), timeout=60, what="delivery after B came back")
        source = studies_by_id(a)
        assert studies_by_id(web_b) == source
        once(gate, source)
        st = status(a)["Destinations"]["b"]
        assert st["Failed"] == 0 and st["Done"] == 2
    finally:
        a.stop()


def test_kill_9_of_orthanc_mid_send_then_restart_delivers_everything_once(
    tmp_path: Path, web_b: OrthancProcess, gate: Gate
) -> None:
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {"b": {"Kind": "dicomweb", "Url": gate.url, "InstancesPerRequest": 3}},
        [{"Destination": "b", "Concurrency": 1}],
    ).start()
    n_studies = 10
    try:
        for s in range(n_studies):
            for blob in study_bytes(f"WEBCRASH{s:02d}", 10, pixel_bytes=300_000):
                a.upload(blob)

        def mid_send() -> dict | None:
            d = status(a)["Destinations"]["b"]
            return d if d["Sending"] and 1 <= d["Done"] < n_studies else None

        at_kill = wait_for(mid_send, timeout=120, what="some studies sent, one sending")
        a.kill()
        assert at_kill["Done"] < n_studies
        a.start()
        wait_for(
            lambda: settled(a, {"b": n_studies}),
            timeout=120,
            what="everything delivered after the restart",
        )
        assert not jobs(a, state="sending") and not jobs(a, state="failed")
        source = studies_by_id(a)
        assert len(source) == n_studies
        assert studies_by_id(web_b) == source
        once(gate, source)
    finally:
        a.stop()
