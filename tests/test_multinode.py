"""Several nodes: two real Orthanc processes on one PostgreSQL (Debian's orthanc-postgresql 4.0,
``"Lock": false``), one shared storage folder, both running the dicomsync plugin with the same
``"Queue": {"Kind": "postgresql", ...}``.

- Studies uploaded to both nodes (some split across them, so both nodes see their
  STABLE_STUDY) reach a zipped_root and an Orthanc destination exactly once: one zip each,
  POSTs at the destination equal to the instance count; each instance's tag event reaches
  the HEC stand-in once with both nodes running sinks; ``GET /dicomsync/status`` on either
  node shows the same queue.
- ``kill -9`` of node 1 mid-queue: node 2 takes its leased jobs over after ``LeaseSeconds``
  and finishes them; nothing is sent twice beyond the instances in flight at the kill.
- A STABLE_STUDY seen by both nodes enqueues once: two nodes' intakes route the same study
  at the same time, and the queue holds one record per destination.

Each node has its own ``StateDirectory`` and ``NodeId`` (the default StateDirectory sits
beside ``StorageDirectory``, which the nodes share here).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from pg_cluster import PgCluster
from pydicom.uid import generate_uid

from dicomdata import study_bytes
from orthanc_server import OrthancProcess
from plugin_helpers import (
    all_files,
    counting_orthanc,
    jobs,
    plugin_orthanc,
    posted,
    settled,
    status,
    studies_by_id,
    study_keys,
    wait_for,
    zip_sop_uids,
)
from servers.hec import HecServer, Token

pytestmark = pytest.mark.orthanc

ENV = "DICOMSYNC_DB_PASSWORD"
HEC_TOKEN = "5e5e5e5e-1111-4222-8333-444444444444"


def queue_section(pg: PgCluster, db: str) -> dict[str, Any]:
    # the issue's own example: Orthanc's index and the queue connect as one user
    # ("dicomsync"), and the queue's default schema (dicomsync_queue) is not that user's
    # name: a schema named like the user would take Orthanc's tables (search_path "$user",
    # public) and orthanc-postgresql would refuse the fresh database; see dicomsync.pg
    return {"Kind": "postgresql", "Url": pg.dsn(db), "PasswordEnv": ENV}


def orthanc_index_section(pg: PgCluster, db: str) -> dict[str, Any]:
    """The "PostgreSQL" section of orthanc-postgresql 4.0: index in ``db``, several writers."""
    return {
        "EnableIndex": True,
        "EnableStorage": False,  # the nodes share one StorageDirectory
        "Host": pg.host,
        "Port": pg.port,
        "Database": db,
        "Username": pg.user,
        "Password": "${" + ENV + "}",  # Orthanc expands environment variables
        "Lock": False,
        "EnableSsl": False,
    }


@dataclass
class Cluster:
    pg: PgCluster
    db: str
    root: Path
    dest: OrthancProcess
    zips: Path
    hec: HecServer
    nodes: list[OrthancProcess] = field(default_factory=list)

    def node(self, name: str, lease: float = 30.0, concurrency: int = 2) -> OrthancProcess:
        places = {
            "b": {"Kind": "orthanc", "Url": self.dest.url},
            "zips": {"Kind": "zipped_root", "Path": str(self.zips)},
        }
        routes = [
            {"Destination": "b", "Concurrency": concurrency},
            {"Destination": "zips", "Concurrency": concurrency},
        ]
        sinks = {
            "splunk": {
                "Kind": "splunk_hec",
                "Url": self.hec.url,
                "TokenEnv": "MN_HEC_TOKEN",
                "TimeoutSeconds": 10,
            }
        }
        node = plugin_orthanc(
            self.root / name,
            name,
            places,
            routes,
            sync={
                "Queue": queue_section(self.pg, self.db),
                "StateDirectory": str(self.root / name / "state"),
                "NodeId": name,
                "LeaseSeconds": lease,
                "Sinks": sinks,
            },
            config={"StorageDirectory": str(self.root / "storage")},
            postgresql=orthanc_index_section(self.pg, self.db),
            env={ENV: self.pg.password, "MN_HEC_TOKEN": HEC_TOKEN},
        )
        self.nodes.append(node)
        return node

    def plain(self, name: str) -> OrthancProcess:
        """An Orthanc node on the shared index and storage, without the plugin."""
        node = OrthancProcess(
            self.root / name,
            name,
            config={"StorageDirectory": str(self.root / "storage")},
            postgresql=orthanc_index_section(self.pg, self.db),
            env={ENV: self.pg.password},
        )
        self.nodes.append(node)
        return node


@pytest.fixture
def cluster(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Cluster]:
    db = f"mn_{generate_uid().rsplit('.', 1)[-1][-12:]}"
    pg_cluster.create_database(db)
    dest = counting_orthanc(tmp_path / "b", "b").start()
    hec = HecServer(tokens=[Token(HEC_TOKEN)]).start()
    zips = tmp_path / "zips"
    zips.mkdir()
    c = Cluster(pg_cluster, db, tmp_path, dest, zips, hec)
    try:
        yield c
    finally:
        for node in c.nodes:
            try:
                node.stop()
            except Exception:  # a killed node: nothing to stop
                pass
        dest.stop()
        hec.stop()
        pg_cluster.drop_database(db)


def destination_counts(node: OrthancProcess) -> dict[str, tuple[int, int, int, int]]:
    d = status(node)["Destinations"]
    return {k: (v["Queued"], v["Sending"], v["Done"], v["Failed"]) for k, v in d.items()}


def check_delivered_once(c: Cluster, source: OrthancProcess, slack: int = 0) -> None:
    """Every study of the shared index is in B and in one zip; B got each instance once
    (``slack`` more POSTs allowed: the instances in flight at a kill)."""
    studies = studies_by_id(source)
    n_instances = sum(len(s) for s in studies.values())
    assert studies_by_id(c.dest) == studies
    assert n_instances <= posted(c.dest) <= n_instances + slack
    keys = study_keys(source)
    visible = [p for p in all_files(c.zips) if not p.name.startswith(".")]
    assert sorted(visible) == sorted(c.zips / p / f"{s}.zip" for p, s in keys.values())
    for study_id, (patient, study) in keys.items():
        assert zip_sop_uids(c.zips / patient / f"{study}.zip") == studies[study_id]


def test_studies_on_both_nodes_reach_every_destination_once(cluster: Cluster) -> None:
    c = cluster
    n1, n2 = c.node("node1").start(60), c.node("node2").start(60)
    per_node, split, per_study = 4, 2, 5
    blobs: list[tuple[OrthancProcess, bytes]] = []
    for s in range(per_node):
        blobs += [(n1, b) for b in study_bytes(f"N1-{s}", per_study)]
        blobs += [(n2, b) for b in study_bytes(f"N2-{s}", per_study)]
    for s in range(split):  # half on each node: both see the study's STABLE_STUDY
        data = study_bytes(f"SPLIT-{s}", 2 * per_study)
        blobs += [(n1 if i % 2 else n2, b) for i, b in enumerate(data)]
    for node, blob in blobs:
        node.upload(blob)
    n_studies = 2 * per_node + split
    expected = {"b": n_studies, "zips": n_studies}
    wait_for(lambda: settled(n1, expected), timeout=120, what="every study routed")
    wait_for(
        lambda: (
            (status(n2)["Sinks"]["splunk"]["Done"] >= len(blobs))
            and status(n2)["Sinks"]["splunk"]["Queued"] == 0
        ),
        timeout=120,
        what="every instance indexed",
    )
    # the same queue from either node
    assert destination_counts(n1) == destination_counts(n2)
    assert status(n1)["Sinks"]["splunk"]["Done"] == status(n2)["Sinks"]["splunk"]["Done"]
    # one record per study and destination, whichever node stored or sent it
    study_jobs = jobs(n2, kind="study")
    assert len(study_jobs) == 2 * n_studies
    assert {(j["Resource"], j["Destination"]) for j in study_jobs} == {
        (s, d) for s in studies_by_id(n1) for d in ("b", "zips")
    }
    check_delivered_once(c, n2)
    # each instance was fed to the sink once, not once per node (the shared feed cursor;
    # without it 112 of 60: nearly every instance read and sent twice, the ledger saying
    # "delivered" the second time). Two nodes reading one page at once may repeat a few.
    fed = status(n1)["Sinks"]["splunk"]["DeliveredEvents"]  # one event per instance here
    assert len(blobs) <= fed <= len(blobs) * 1.1, fed
    # each instance's tag event reached the HEC stand-in once
    sops = {sop for s in studies_by_id(n1).values() for sop in s}
    received = c.hec.event_ids()
    assert sorted(received) == sorted({f"{sop}:instance" for sop in sops})


def test_kill_9_of_node_1_node_2_takes_its_jobs_over(cluster: Cluster) -> None:
    c = cluster
    n_studies, per_study = 12, 10
    # the studies are in the shared index before the nodes start (their first run routes
    # nothing already stored), then one backfill queues them all: a long queue to kill in
    uploader = c.plain("uploader").start(60)
    for s in range(n_studies):
        for blob in study_bytes(f"KILL{s:02d}", per_study, pixel_bytes=300_000):
            uploader.upload(blob)
    uploader.stop()
    lease = 4.0
    n1 = c.node("node1", lease=lease, concurrency=1).start(60)
    n2 = c.node("node2", lease=lease, concurrency=1).start(60)
    for dest in ("b", "zips"):
        r = requests.post(f"{n1.url}/dicomsync/backfill", json={"Destination": dest}, timeout=60)
        assert r.json()["Enqueued"] == n_studies, r.text

    def node1_sending() -> list[dict[str, Any]] | None:
        """Node 1 sending some jobs, others not yet done."""
        done = sum(d for _, _, d, _ in destination_counts(n2).values())
        mine = [j for j in jobs(n2, state="sending") if j["LeaseOwner"] == "node1"]
        return mine if mine and done < 2 * n_studies - 2 else None

    wait_for(node1_sending, timeout=60, what="node 1 sending some jobs")
    n1.kill()
    # read after the kill: a job node 1 finished between the look and the kill is done
    # (one attempt), not taken over; what it held when it died is still its "sending"
    killed_at = {j["Id"] for j in jobs(n2, state="sending") if j["LeaseOwner"] == "node1"}
    assert killed_at, "node 1 held no job when it was killed"
    expected = {"b": n_studies, "zips": n_studies}
    wait_for(lambda: settled(n2, expected), timeout=120, what="node 2 finishing everything")
    assert not jobs(n2, state="sending") and not jobs(n2, state="failed")
    for job_id in killed_at:  # node 1's jobs: leased again (by node 2) and done
        job = n2.get(f"/dicomsync/jobs/{job_id}")
        assert job["State"] == "done" and job["Attempts"] >= 2, job
    # B may have received the instances node 1 was posting when it died, nothing more
    check_delivered_once(c, n2, slack=len(killed_at) * 4)


def test_stable_study_seen_by_both_nodes_enqueues_once(cluster: Cluster) -> None:
    """Both nodes' intakes route the same studies at once (STABLE_STUDY on both, or a
    catch-up racing a STABLE_STUDY): one record per study and destination, and the
    repeats change nothing."""
    from dicomsync import routing
    from dicomsync.orthanc_client import HttpTransport, OrthancClient
    from dicomsync.queue import open_queue
    from dicomsync.service.intake import Intake

    c = cluster
    # two Orthanc nodes on the shared index, without the plugin: the intakes are ours
    plain = [c.plain(f"plain{i}").start(60) for i in (1, 2)]
    for s in range(5):
        for blob in study_bytes(f"TWICE{s}", 2):
            plain[s % 2].upload(blob)
    studies = sorted(plain[0].get("/studies"))
    assert len(studies) == 5
    intakes = []
    stop = threading.Event()
    os.environ[ENV] = c.pg.password
    try:
        for node in plain:
            sync = {
                "Places": {"zips": {"Kind": "zipped_root", "Path": str(c.zips)}},
                "Routes": [{"Destination": "zips"}],
                "Queue": queue_section(c.pg, c.db),
                "StateDirectory": str(c.root / node.name / "state"),
            }
            cfg = routing.load({routing.SECTION: sync}, c.root / "orthanc.json")
            assert cfg is not None
            queue = open_queue(cfg.state_dir, cfg.retry, cfg.queue)
            client = OrthancClient(HttpTransport(node.url))
            intakes.append((Intake(cfg, queue, client, stop), queue))
        results: list[Any] = []

        def route(intake: Intake) -> None:
            for _ in range(3):
                for study in studies:
                    results.extend(intake.route_study(study))

        threads = [threading.Thread(target=route, args=(i,)) for i, _ in intakes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        queue = intakes[0][1]
        records = queue.jobs(None, "zips", 1000, kind="study")
        assert sorted(j.resource for j in records) == studies
        assert len({r.job_id for r in results}) == len(studies)  # every call: the same records
        assert sum(1 for r in results if r.action == "created") == len(studies)
    finally:
        os.environ.pop(ENV, None)
        for _, queue in intakes:
            queue.close()
