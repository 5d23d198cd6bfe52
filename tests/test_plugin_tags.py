"""Tag sinks inside the plugin, in a real Orthanc: the HEC stand-in and the sqlite_index sink.

One Orthanc A (module-scoped) has three sinks: ``splunk`` (HEC stand-in, starting with a
run of 503s), ``local`` (sqlite_index under StateDirectory) and ``held`` (a second HEC
stand-in whose token is disabled until the test enables it). The RDSR files, the PET/CT
study and one CT/MR image study are uploaded once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from test_tags_flatten import dose_files

from dicomsync import routing
from dicomsync.sinks.sqlite_index import SqliteIndex
from dicomsync.tags import Event, events_from_path

from conftest import Cli
from dicomdata import data, make_instance, pcir_study_files
from orthanc_server import OrthancProcess
from plugin_helpers import jobs, metrics, plugin_orthanc, status, wait_for
from servers.hec import HecServer, Token

pytestmark = pytest.mark.orthanc

TOKEN = "7c2e1a0b-5d4f-4e3a-9b8c-1f2e3d4c5b6a"
HELD_TOKEN = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"
SEARCH_TOKEN = "search-token-plugin"
BUSY = 4  # 503s before the stand-in accepts events: more than the sink's own retries


def hec_sink(url: str, token_env: str, **extra: Any) -> dict[str, Any]:
    return {
        "Kind": "splunk_hec",
        "Url": url,
        "TokenEnv": token_env,
        "Retries": 1,
        "BackoffSeconds": 0.05,
        "MaxBackoffSeconds": 0.1,
        "TimeoutSeconds": 10,
        **extra,
    }


def sinks_settled(server: OrthancProcess, expected: dict[str, int]) -> bool:
    sinks = status(server).get("Sinks", {})
    return all(
        sinks.get(k, {}).get("Done") == n and sinks[k]["Queued"] == sinks[k]["Sending"] == 0
        for k, n in expected.items()
    )


def instance_bytes(patient: str, n: int) -> list[bytes]:
    study_uid = generate_uid()
    out = []
    for _ in range(n):
        buf = BytesIO()
        make_instance(None, patient_id=patient, study_uid=study_uid).save_as(
            buf, enforce_file_format=True
        )
        out.append(buf.getvalue())
    return out


@dataclass
class Tagged:
    a: OrthancProcess
    hec: HecServer
    held: HecServer
    state: Path
    files: list[Path]
    events: dict[str, Event]  # expected, by id
    instances: int


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tagged]:
    root = tmp_path_factory.mktemp("plugin-tags")
    hec = HecServer(tokens=[Token(TOKEN)]).start()
    hec.state.search_tokens.add(SEARCH_TOKEN)
    held = HecServer(tokens=[Token(HELD_TOKEN, disabled=True)]).start()
    state = root / "state"
    sinks = {
        "splunk": hec_sink(hec.url, "DS_TEST_HEC_TOKEN"),
        "local": {"Kind": "sqlite_index", "Path": "index.sqlite"},  # under StateDirectory
        "held": hec_sink(held.url, "DS_TEST_HELD_TOKEN"),
        "broken": {"Kind": "sqlite_index", "Path": "/proc/no/such/index.sqlite"},  # unbuildable
    }
    a = plugin_orthanc(
        root / "a",
        "a",
        {},
        [],
        sync={"Sinks": sinks, "StateDirectory": str(state)},
        env={"DS_TEST_HEC_TOKEN": TOKEN, "DS_TEST_HELD_TOKEN": HELD_TOKEN},
    ).start()
    try:
        files = dose_files() + next(iter(pcir_study_files().values()))
        events: dict[str, Event] = {}
        sops: set[str] = set()
        for f in files:
            for e in events_from_path(f):
                events[e.id] = e
            sops.add(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        hec.busy(BUSY)
        a.upload_files(files)
        assert int(a.get("/statistics")["CountInstances"]) == len(sops)
        wait_for(
            lambda: sinks_settled(a, {"splunk": len(sops), "local": len(sops)}),
            what="every instance indexed by splunk and local",
        )
        yield Tagged(a, hec, held, state, files, events, len(sops))
    finally:
        try:
            a.stop()
        finally:
            hec.stop()
            held.stop()


def test_hec_gets_every_event_exactly_once_after_a_run_of_503s(tagged: Tagged) -> None:
    ids = tagged.hec.event_ids()
    assert len(ids) == len(set(ids)), "an event reached HEC twice"
    assert set(ids) == set(tagged.events)
    by_type: dict[str, int] = {}
    for e in tagged.events.values():
        by_type[e.sourcetype] = by_type.get(e.sourcetype, 0) + 1
    assert by_type["dicomsync:instance"] == tagged.instances
    for f in sorted(data("rdsr").glob("*.dcm")):  # every RDSR gave its summary
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert f"{sop}:dose_report" in ids, f.name
    assert by_type["dicomsync:dose_event"] > by_type["dicomsync:dose_report"]
    received = {e["fields"]["dicomsync_id"]: e for e in tagged.hec.state.events}
    for sourcetype, n in by_type.items():
        assert sum(e["sourcetype"] == sourcetype for e in received.values()) == n

    # the 503s happened, the sink gave up once and the queue retried it later
    statuses = [s for p, s in tagged.hec.state.requests if p == "/services/collector/event"]
    assert statuses[:BUSY] == [503] * BUSY and statuses[-1] == 200
    retried = [j for j in jobs(tagged.a, destination="splunk", kind="tags") if j["Attempts"] > 1]
    assert retried and all(j["State"] == "done" for j in retried)

    # one code path: what Orthanc's copy gave HEC equals what the file gives
    tap = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    tap_events = events_from_path(tap)
    assert [e.sourcetype for e in tap_events].count("dicomsync:dose_event") == 4
    for e in tap_events:
        assert received[e.id]["event"] == json.loads(json.dumps(e.fields))
        assert received[e.id]["sourcetype"] == e.sourcetype


def test_sqlite_index_under_state_directory_gets_every_event(tagged: Tagged) -> None:
    path = tagged.state / "index.sqlite"
    assert path.is_file()
    index = SqliteIndex("check", path)
    try:
        assert index.has(list(tagged.events)) == set(tagged.events)
        assert sum(index.stats()["events"].values()) == len(tagged.events)
        tap = events_from_path(data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"))[1]
        stored = index.event(tap.id)
        assert stored is not None and stored["event"] == json.loads(json.dumps(tap.fields))
        assert stored["source"].startswith("orthanc:")
    finally:
        index.close()
    # both lanes got every instance's events; each file was read once, from the storage
    # folder (the default filesystem storage), and the other sink used the shared copy
    reads = tagged.a.get("/dicomsync/sinks")["Reads"]
    assert reads["RestApi"] == 0 and reads["StorageFolder"] >= tagged.instances, reads
    assert reads["Shared"] > 0, reads


def test_status_and_metrics_cover_the_sinks(tagged: Tagged) -> None:
    a = tagged.a
    sinks = status(a)["Sinks"]
    assert set(sinks) == {"splunk", "local", "held", "broken"}
    for key in ("splunk", "local"):
        s = sinks[key]
        assert s["State"] == "running" and s["Error"] is None, s
        assert (s["Done"], s["Failed"]) == (tagged.instances, 0)
        assert s["DeliveredEvents"] == len(tagged.events)
    assert sinks["splunk"]["Kind"] == "splunk_hec" and sinks["local"]["Kind"] == "sqlite_index"
    assert status(a)["Destinations"] == {}  # sinks are not route destinations

    one = a.get("/dicomsync/sinks/local")
    assert one["Details"]["events"]["dicomsync:instance"] == tagged.instances

    m = wait_for(
        lambda: (
            (m := metrics(a)).get('dicomsync_sink_delivered_events{sink="splunk"}')
            == len(tagged.events)
            and m
        ),
        what="sink metrics",
    )
    assert m['dicomsync_sink_running{sink="splunk"}'] == 1
    assert m['dicomsync_sink_queue_depth{sink="local"}'] == 0
    assert m['dicomsync_sink_jobs_failed{sink="splunk"}'] == 0
    assert 'dicomsync_sink_oldest_queued_age_seconds{sink="local"}' in m


def test_cli_queue_status_shows_the_sinks(tagged: Tagged) -> None:
    import json

    from click.testing import CliRunner

    from dicomsync.cli.main import cli

    run = CliRunner()
    r = run.invoke(cli, ["queue", "status", tagged.a.url])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    local = next(line for line in lines if line.startswith("sink local "))
    assert local == (
        f"sink local (sqlite_index): running, 0 queued, 0 failed, "
        f"{len(tagged.events)} events delivered"
    )
    assert any(line.startswith("sink splunk (splunk_hec): running, 0 queued") for line in lines)
    broken = lines.index(next(line for line in lines if line.startswith("sink broken ")))
    assert "stopped" in lines[broken] and lines[broken + 1].startswith("    last error: ")
    held = next(line for line in lines if line.startswith("sink held "))
    # its state depends on the test order; the rest of the line does not
    assert re.fullmatch(
        r"sink held \(splunk_hec\): (stopped|running), \d+ queued, \d+ failed, "
        r"0 events delivered",
        held,
    ), held

    r = run.invoke(cli, ["queue", "status", tagged.a.url, "--json"])
    assert r.exit_code == 0, r.output
    sinks = json.loads(r.output)["Sinks"]
    assert sinks["local"]["State"] == "running"
    assert sinks["local"]["DeliveredEvents"] == len(tagged.events)
    assert set(sinks) == {"splunk", "local", "held", "broken"}


def test_a_refused_token_keeps_everything_queued_until_fixed_and_restarted(
    tagged: Tagged,
) -> None:
    a, held = tagged.a, tagged.held
    wait_for(lambda: status(a)["Sinks"]["held"]["State"] == "stopped", what="held sink stopped")
    s = status(a)["Sinks"]["held"]
    assert "Token disabled" in s["Error"] and "sink stopped, events kept" in s["Error"]
    assert s["Failed"] == s["Done"] == 0 and s["Queued"] == tagged.instances
    assert held.event_ids() == []
    queued = jobs(a, destination="held", kind="tags")
    assert len(queued) == tagged.instances
    assert all(j["State"] == "queued" and j["Attempts"] == 0 for j in queued)
    assert metrics(a).get('dicomsync_sink_running{sink="held"}') == 0
    lines = [line for line in a.log_text().splitlines() if "sink 'held' stopped" in line]
    assert len(lines) == 1 and "/dicomsync/sinks/held/restart" in lines[0]

    # more instances arrive while it is stopped: they queue up too
    for blob in instance_bytes("HELD", 2):
        a.upload(blob)
    wait_for(
        lambda: status(a)["Sinks"]["held"]["Queued"] == tagged.instances + 2,
        what="new instances queued for the stopped sink",
    )
    # a restart without a fix: stopped again, nothing lost, nothing failed
    r = requests.post(a.url + "/dicomsync/sinks/held/restart", timeout=30)
    assert r.status_code == 200 and r.json()["State"] == "running"
    wait_for(lambda: status(a)["Sinks"]["held"]["State"] == "stopped", what="stopped again")
    assert status(a)["Sinks"]["held"]["Failed"] == 0

    # the token is enabled on the Splunk side; the sink is restarted: everything, once
    held.state.tokens[HELD_TOKEN].disabled = False
    r = requests.post(a.url + "/dicomsync/sinks/held/restart", timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: sinks_settled(a, {"held": tagged.instances + 2}), what="held delivered")
    ids = held.event_ids()
    assert len(ids) == len(set(ids)) and set(tagged.events) <= set(ids)
    assert len(ids) == len(tagged.events) + 2
    assert status(a)["Sinks"]["held"]["State"] == "running"
    wait_for(lambda: sinks_settled(a, {"splunk": tagged.instances + 2}), what="others unaffected")


def test_replicate_where_modality_sr_from_the_plugin_orthanc(
    tagged: Tagged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dicomsync replicate a dest --where Modality=SR` with the plugin's index, and with the
    HEC stand-in's search, copies exactly the studies that have a dose report."""
    dose_studies = {
        str(ds.StudyInstanceUID)
        for f in tagged.files
        if (ds := pydicom.dcmread(f, stop_before_pixels=True)).Modality == "SR"
    }
    all_studies = {s["MainDicomTags"]["StudyInstanceUID"] for s in tagged.a.get("/studies?expand")}
    assert dose_studies < all_studies
    monkeypatch.setenv("DS_TEST_SEARCH_TOKEN", SEARCH_TOKEN)
    config = {
        "Places": {
            "a": {"Kind": "orthanc", "Url": tagged.a.url},
            "dest": {"Kind": "dicom_root", "Path": "dest"},
            "dest2": {"Kind": "dicom_root", "Path": "dest2"},
        },
        "Sinks": {
            "plugin_index": {"Kind": "sqlite_index", "Path": str(tagged.state / "index.sqlite")},
            "splunk": {
                "Kind": "splunk_hec",
                "Url": tagged.hec.url,
                "SearchUrl": tagged.hec.url,
                "SearchTokenEnv": "DS_TEST_SEARCH_TOKEN",
            },
        },
    }
    for folder in ("dest", "dest2"):
        (tmp_path / folder).mkdir()
    (tmp_path / "dicomsync.json").write_text(json.dumps(config))
    cli = Cli(tmp_path / "dicomsync.json")
    out = cli("replicate", "a", "dest", "--where", "Modality=SR", "--sink", "plugin_index").output
    assert "0 failed" in out, out
    assert _studies_in(tmp_path / "dest") == dose_studies
    out = cli("replicate", "a", "dest2", "--where", "Modality=SR", "--sink", "splunk").output
    assert _studies_in(tmp_path / "dest2") == dose_studies
    assert "'Modality'=\"SR\"" in tagged.hec.state.searches[-1]


def _studies_in(root: Path) -> set[str]:
    return {
        str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        for f in root.rglob("*")
        if f.is_file()
    }


def test_a_sink_that_cannot_be_built_is_stopped_and_keeps_its_instances(tagged: Tagged) -> None:
    a = tagged.a
    s = status(a)["Sinks"]["broken"]
    assert s["State"] == "stopped" and "cannot open /proc/no/such/index.sqlite" in s["Error"]
    assert s["Queued"] >= tagged.instances and s["Failed"] == s["Done"] == 0
    lines = [
        line for line in a.log_text().splitlines() if line.startswith("E") and "'broken'" in line
    ]
    assert len(lines) == 1 and "sink 'broken' is stopped" in lines[0]
    r = requests.post(a.url + "/dicomsync/sinks/broken/restart", timeout=30)
    assert r.status_code == 200 and r.json()["State"] == "stopped"  # still cannot be built
    assert status(a)["Sinks"]["splunk"]["State"] == "running"  # the others carry on


def test_sinks_inline_live_under_state_directory_or_beside_their_file(tmp_path: Path) -> None:
    inline = routing.load(
        {routing.SECTION: {"Sinks": {"i": {"Kind": "sqlite_index", "Path": "i.sqlite"}}}},
        tmp_path / "orthanc.json",
    )
    assert inline is not None and inline.sinks_base == tmp_path / "dicomsync"  # StateDirectory
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "dicomsync.json").write_text(
        json.dumps({"Sinks": {"i": {"Kind": "sqlite_index", "Path": "i.sqlite"}}})
    )
    from_file = routing.load(
        {routing.SECTION: {"Sinks": "conf/dicomsync.json", "StateDirectory": "state"}},
        tmp_path / "orthanc.json",
    )
    assert from_file is not None and from_file.sinks_base == tmp_path / "conf"
    assert from_file.sinks == {"i": {"Kind": "sqlite_index", "Path": "i.sqlite"}}
    problems = routing.validate({routing.SECTION: {"Sinks": [], "SinksBackfill": "yes"}})
    assert any("'Sinks' must be an object" in p for p in problems), problems
    assert any("SinksBackfill must be true or false" in p for p in problems), problems


def test_sinks_endpoints_errors(tagged: Tagged) -> None:
    a = tagged.a
    r = requests.post(a.url + "/dicomsync/sinks/nope/restart", timeout=30)
    assert r.status_code == 404 and "no sink 'nope'" in r.json()["Message"]
    assert requests.get(a.url + "/dicomsync/sinks/held/restart", timeout=30).status_code == 405
    r = requests.post(a.url + "/dicomsync/retry-failed", json={"Destination": "local"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"Requeued": 0}
    assert set(a.get("/dicomsync/sinks")["Sinks"]) == {"splunk", "local", "held", "broken"}


# --- its own Orthanc: the token is fixed in Orthanc's environment ------------------------------


def test_wrong_token_in_the_environment_fixed_by_an_orthanc_restart(tmp_path: Path) -> None:
    hec = HecServer(tokens=[Token(TOKEN)]).start()
    a = plugin_orthanc(
        tmp_path / "a",
        "envfix",
        {},
        [],
        sync={"Sinks": {"splunk": hec_sink(hec.url, "DS_TEST_HEC_TOKEN")}},
        env={"DS_TEST_HEC_TOKEN": "not-the-token"},
    ).start()
    try:
        for blob in instance_bytes("ENVFIX", 3):
            a.upload(blob)
        wait_for(
            lambda: (s := status(a)["Sinks"]["splunk"])["State"] == "stopped" and s["Queued"] == 3,
            what="sink stopped with 3 instances queued",
        )
        assert "Invalid token" in status(a)["Sinks"]["splunk"]["Error"]
        assert TOKEN not in a.log_text() and "not-the-token" not in a.log_text()
        a.stop()
        a.env["DS_TEST_HEC_TOKEN"] = TOKEN
        a.start()
        wait_for(lambda: sinks_settled(a, {"splunk": 3}), what="delivered after the restart")
        ids = hec.event_ids()
        assert len(ids) == len(set(ids)) == 3
        assert TOKEN not in a.log_text()
    finally:
        try:
            a.stop()
        finally:
            hec.stop()


def test_unknown_sink_kind_is_one_clear_error_and_orthanc_keeps_serving(tmp_path: Path) -> None:
    sinks = {"x": {"Kind": "no_such_sink"}, "zips": {"Kind": "sqlite_index", "Path": "i.sqlite"}}
    places = {"zips": {"Kind": "zipped_root", "Path": "z"}}
    problems = routing.validate({routing.SECTION: {"Places": places, "Sinks": sinks}})
    assert any("unknown sink kind 'no_such_sink'" in p for p in problems), problems
    assert any("Sinks['zips']: a place has the same key" in p for p in problems), problems
    a = plugin_orthanc(tmp_path, "badsink", places, [], sync={"Sinks": sinks}).start()
    try:
        a.upload(instance_bytes("BADSINK", 1)[0])
        st = status(a)
        assert st["Configured"] is False and "unknown sink kind 'no_such_sink'" in st["ConfigError"]
        lines = [line for line in a.log_text().splitlines() if "configuration error" in line]
        assert len(lines) == 1 and "no_such_sink" in lines[0]
        assert a.get("/system")["Name"] == "badsink"
    finally:
        a.stop()


def test_kill_9_loses_nothing_and_a_sink_added_later_indexes_what_orthanc_holds(
    tmp_path: Path,
) -> None:
    hec = HecServer(tokens=[Token(HELD_TOKEN, disabled=True)]).start()
    state = tmp_path / "state"
    a = plugin_orthanc(
        tmp_path / "a",
        "crash",
        {},
        [],
        sync={
            "Sinks": {
                "local": {"Kind": "sqlite_index", "Path": "index.sqlite"},
                "held": hec_sink(hec.url, "DS_TEST_HELD_TOKEN"),
            },
            "StateDirectory": str(state),
        },
        env={"DS_TEST_HELD_TOKEN": HELD_TOKEN},
    ).start()
    try:
        first, second = instance_bytes("CRASH1", 5), instance_bytes("CRASH2", 5)
        for blob in first:
            a.upload(blob)
        wait_for(
            lambda: (
                sinks_settled(a, {"local": 5}) and status(a)["Sinks"]["held"]["State"] == "stopped"
            ),
            what="local indexed, held stopped",
        )
        for blob in second:
            a.upload(blob)
        a.kill()  # some of the second study may not even be fed yet

        a.config["DicomSync"]["Sinks"]["late"] = {"Kind": "sqlite_index", "Path": "late.sqlite"}
        hec.state.tokens[HELD_TOKEN].disabled = False
        a.start()
        wait_for(
            lambda: sinks_settled(a, {"local": 10, "held": 10, "late": 10}),
            what="every sink has all 10 instances after the restart",
        )
        expected = {
            f"{pydicom.dcmread(BytesIO(b)).SOPInstanceUID}:instance" for b in first + second
        }
        ids = hec.event_ids()
        assert len(ids) == len(set(ids)) and set(ids) == expected
        for name in ("index.sqlite", "late.sqlite"):
            index = SqliteIndex(name, state / name)
            try:
                assert index.has(list(expected)) == expected
                assert sum(index.stats()["events"].values()) == 10
            finally:
                index.close()
        assert all(j["State"] == "done" for j in jobs(a, kind="tags"))
    finally:
        try:
            a.stop()
        finally:
            hec.stop()


def test_shipped_orthanc_json_indexes_every_upload_into_var_dicomsync(tmp_path: Path) -> None:
    """orthanc.json (ports aside) in a folder playing the repo root: the default sink."""
    from orthanc_server import REPO_ROOT, free_port

    config = json.loads((REPO_ROOT / "orthanc.json").read_text())
    config["HttpPort"], config["DicomPort"] = free_port(), free_port()
    config["PythonScript"] = str(REPO_ROOT / config["PythonScript"])
    assert config["DicomSync"]["Sinks"] == {
        "index": {"Kind": "sqlite_index", "Path": "index.sqlite"}
    }
    server = OrthancProcess(
        tmp_path, "orthanc", http_port=config["HttpPort"], dicom_port=config["DicomPort"]
    )
    server.full_config = lambda: config  # type: ignore[method-assign]
    (tmp_path / "var" / "zips").mkdir(parents=True)
    server.start()
    try:
        tap = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
        server.upload(tap.read_bytes())
        expected = {e.id for e in events_from_path(tap)}
        wait_for(lambda: sinks_settled(server, {"index": 1}), what="the default index filled")
        index = SqliteIndex("index", tmp_path / "var" / "dicomsync" / "index.sqlite")
        try:
            assert index.has(list(expected)) == expected and len(expected) == 6
        finally:
            index.close()
    finally:
        server.stop()
