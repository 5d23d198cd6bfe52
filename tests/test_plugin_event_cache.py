"""How the tag sinks read instances inside the plugin: one EventCache shared by the lanes
(with several sinks each instance is read and parsed once), and headers read straight
from Orthanc's storage folder when that is safe, else through the REST API, with the
same events either way. Unit tests of the cache, then REAL Orthanc processes."""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomsync import routing
from dicomsync.errors import DicomFileError
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.queue import Job, open_queue
from dicomsync.service.storage import InstanceEvents, storage_folder
from dicomsync.service.tag_lanes import EventCache, TagSinks
from dicomsync.tags import Event, events_from_bytes
from dicomsync.worker import SinkDelivered

from dicomdata import data, make_instance
from orthanc_server import OrthancProcess


def events(tag: str) -> list[Event]:
    return [Event(tag, "dicomsync:instance", 0.0, "now", {})]


def test_concurrent_lanes_compute_an_instance_once() -> None:
    cache = EventCache(10)
    calls: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def slow(instance: str) -> list[Event]:
        calls.append(instance)
        inside.set()
        release.wait(10)
        return events(instance)

    got: list[list[Event]] = []
    first = threading.Thread(target=lambda: got.append(cache.get("i1", slow)))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=lambda: got.append(cache.get("i1", slow)))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waits for the first lane's result instead of reading again
    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["i1"]
    assert got[0] is got[1]
    assert (cache.hits, cache.misses) == (1, 1)


def test_errors_are_not_cached_and_each_lane_sees_its_own() -> None:
    cache = EventCache(10)
    calls: list[str] = []

    def broken(instance: str) -> list[Event]:
        calls.append(instance)
        raise DicomFileError(f"{instance}: corrupt")

    for _ in range(2):
        with pytest.raises(DicomFileError, match="i1: corrupt"):
            cache.get("i1", broken)
    assert calls == ["i1", "i1"]


def test_an_instance_stored_again_is_computed_again_even_mid_computation() -> None:
    cache = EventCache(10)
    version = {"i1": "old"}

    def compute(instance: str) -> list[Event]:
        if version[instance] == "old":
            cache.forget(["i1"])  # the feed saw it stored again while this lane read it
            version[instance] = "new"
            return events("old")
        return events("new")

    assert cache.get("i1", compute)[0].id == "old"  # this lane's job had the old content
    assert cache.get("i1", compute)[0].id == "new"  # the next one is not served the old
    cache.forget(["i1"])
    version["i1"] = "old"
    assert cache.get("i1", compute)[0].id == "old"


def test_the_cache_is_bounded_oldest_first() -> None:
    cache = EventCache(2)
    calls: list[str] = []

    def compute(instance: str) -> list[Event]:
        calls.append(instance)
        return events(instance)

    for instance in ("a", "b", "a", "c", "b", "a"):
        cache.get(instance, compute)
    # a, b computed; a hit; c evicts b; b evicts a; a computed again
    assert calls == ["a", "b", "c", "b", "a"]
    assert EventCache(0).get("x", compute)[0].id == "x"


@pytest.mark.orthanc
def test_two_sinks_read_each_instance_from_orthanc_once(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    instances = []
    for i in range(3):
        buf = BytesIO()
        make_instance(
            None, patient_id=f"CACHE{i}", study_uid=generate_uid(), modality="OT"
        ).save_as(buf, enforce_file_format=True)
        instances.append(str(orthanc.upload(buf.getvalue())["ID"]))
    cfg = routing.load(
        {
            routing.SECTION: {
                "StateDirectory": str(tmp_path / "state"),
                "Sinks": {
                    "one": {"Kind": "sqlite_index", "Path": "one.sqlite"},
                    "two": {"Kind": "sqlite_index", "Path": "two.sqlite"},
                },
            }
        },
        tmp_path / "orthanc.json",
    )
    assert cfg is not None
    reads: list[str] = []

    class Counting(OrthancClient):
        def instance_file(self, instance_id: str) -> bytes:
            reads.append(instance_id)
            return super().instance_file(instance_id)

    queue = open_queue(cfg.state_dir)
    sinks = TagSinks(cfg, queue, Counting(HttpTransport(orthanc.url)))
    sinks.build()
    results: dict[str, list[Any]] = {}
    try:
        lanes = [
            threading.Thread(
                target=lambda key=key: results.__setitem__(
                    key,
                    sinks.handle([Job(n, "tags", iid, key) for n, iid in enumerate(instances)]),
                )
            )
            for key in ("one", "two")
        ]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join(30)
        for key in ("one", "two"):
            assert [r.outcome for r in results[key] if isinstance(r, SinkDelivered)] == [
                "delivered"
            ] * 3, results[key]
            sink = sinks.states[key].sink
            assert sink is not None
            assert sink.stats()["events"] == {"dicomsync:instance": 3}
        assert sorted(reads) == sorted(instances)  # once each, not once per sink
    finally:
        sinks.stop()
        queue.close()


def upload_files(orthanc: OrthancProcess, paths: list[Path]) -> list[str]:
    return [str(orthanc.upload(p.read_bytes())["ID"]) for p in paths]


def sample_files() -> list[Path]:
    """A vendor dose report (deep SR tree) and images with and without pixel data."""
    picks = [next(iter(sorted(data("rdsr").glob("*.dcm"))))]
    picks += sorted(p for p in data("study_petct_siemens").rglob("*") if p.is_file())[:3]
    return picks


@pytest.mark.orthanc
def test_headers_from_the_storage_folder_give_the_rest_apis_events(
    orthanc: OrthancProcess,
) -> None:
    instances = upload_files(orthanc, sample_files())
    client = OrthancClient(HttpTransport(orthanc.url))
    storage = orthanc.workdir / "storage"
    direct = InstanceEvents(client, storage_folder(orthanc.full_config(), storage))
    for iid in instances:
        want = events_from_bytes(client.instance_file(iid), source=f"orthanc:{iid}")
        assert direct(iid) == want
    assert (direct.direct, direct.through_rest) == (len(instances), 0)
    # files elsewhere (a storage plugin): the REST API reads them, same events
    elsewhere = InstanceEvents(client, orthanc.workdir / "not-the-storage")
    assert [elsewhere(iid) for iid in instances] == [direct(iid) for iid in instances]
    assert (elsewhere.direct, elsewhere.through_rest) == (0, len(instances))


@pytest.mark.orthanc
def test_a_file_that_does_not_parse_in_the_folder_is_read_again_through_the_rest_api(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    import shutil

    (instance,) = upload_files(orthanc, sample_files()[:1])
    mirror = tmp_path / "mirror"
    shutil.copytree(orthanc.workdir / "storage", mirror)
    client = OrthancClient(HttpTransport(orthanc.url))
    uuid = client.get_json(f"/instances/{instance}/attachments/dicom/info")["Uuid"]
    damaged = mirror / uuid[:2] / uuid[2:4] / uuid
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size, not DICOM
    reader = InstanceEvents(client, mirror)
    want = events_from_bytes(client.instance_file(instance), source=f"orthanc:{instance}")
    assert reader(instance) == want
    assert (reader.direct, reader.through_rest) == (0, 1)


@pytest.mark.orthanc
def test_a_storage_folder_that_never_has_the_files_is_no_longer_asked(
    orthanc: OrthancProcess, tmp_path: Path
) -> None:
    from dicomsync.service import storage

    paths = []
    for i in range(storage.GIVE_UP_AFTER + 3):
        path = tmp_path / f"{i}.dcm"
        make_instance(None, patient_id=f"GIVEUP{i}", study_uid=generate_uid()).save_as(
            path, enforce_file_format=True
        )
        paths.append(path)
    instances = upload_files(orthanc, paths)
    asked: list[str] = []

    class Counting(OrthancClient):
        def get_json(self, path: str) -> Any:
            asked.append(path)
            return super().get_json(path)

    reader = InstanceEvents(Counting(HttpTransport(orthanc.url)), tmp_path / "elsewhere")
    for iid in instances:
        assert reader(iid)[0].fields["PatientID"].startswith("GIVEUP")
    assert reader.through_rest == len(instances) and reader.storage is None
    assert len(asked) == storage.GIVE_UP_AFTER  # no attachment info after giving up


@pytest.mark.orthanc
def test_compressed_storage_is_read_through_the_rest_api(tmp_path: Path) -> None:
    orthanc = OrthancProcess(tmp_path / "z", "z", config={"StorageCompression": True}).start()
    try:
        instances = upload_files(orthanc, sample_files()[:2])
        storage = orthanc.workdir / "storage"
        assert storage_folder(orthanc.full_config(), storage) is None
        client = OrthancClient(HttpTransport(orthanc.url))
        # even when told to look there, the attachment's sizes say it is compressed
        reader = InstanceEvents(client, storage)
        for iid in instances:
            assert reader(iid) == events_from_bytes(
                client.instance_file(iid), source=f"orthanc:{iid}"
            )
        assert (reader.direct, reader.through_rest) == (0, len(instances))
    finally:
        orthanc.stop()
