"""Two nodes against one node on the same shared PostgreSQL (issue 11), each against the
native path in the same run:

(a) replication throughput: instances stored through the cluster (Orthanc's index in
    PostgreSQL, one shared storage folder) are routed to a plain Orthanc B;
    one node's workers drain the shared queue (the other node stopped), then two nodes'
    workers drain it together (``POST /dicomsync/send`` of every study, B emptied between). Reference: Orthanc's native ``POST /peers/b/store`` from one node.
(b) routing overhead on ingest: upload rate into the cluster with the plugin off (the
    PostgreSQL index alone) and with the plugin on, routing to B during the upload; one
    node taking every upload, then two nodes taking half each (two upload clients).

The machine these figures come from has 2 cores: a second Orthanc node adds no CPU. Ingest
shows what sharing costs (two processes on one database); replication may still go faster
with two nodes, because each node's plugin runs in one Python interpreter (one GIL), which
one node's workers alone do not keep both cores busy with. On separate machines the nodes
would each bring their own cores.

Data: pydicom-generated instances (``--size`` bytes of pixel data, default 0.5 MB).
Run: ``.venv/bin/python bench/bench_nodes.py [--quick]`` (or ``make bench``, which runs
every ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from bench_plugin import PYTHON_PLUGIN, clear, count, generate, upload, wait
from pg_cluster import PgCluster  # tests/ is on sys.path (common)

from common import REPO, OrthancProcess, report, workdir

COUNTER = REPO / "tests" / "orthanc_counter.py"
ENV = "DICOMSYNC_DB_PASSWORD"


def index_section(pg: PgCluster, db: str) -> dict[str, Any]:
    return {
        "EnableIndex": True,
        "EnableStorage": False,
        "Host": pg.host,
        "Port": pg.port,
        "Database": db,
        "Username": pg.user,
        "Password": "${" + ENV + "}",
        "Lock": False,
        "EnableSsl": False,
    }


def node_config(
    pg: PgCluster, db: str, base: Path, name: str, b: OrthancProcess | None, routed: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {"StableAge": 1, "StorageDirectory": str(base / "storage")}
    if b is None:
        return config
    config["OrthancPeers"] = {"b": {"Url": b.url}}
    route: dict[str, Any] = {"Destination": "b", "Concurrency": 4}
    if not routed:  # a lane for "b" without automatic routing: only backfill enqueues
        route["Filter"] = {"PatientID": "no-such-patient"}
    config["DicomSync"] = {
        "Places": {"b": {"Kind": "orthanc", "Url": b.url}},
        "Routes": [route],
        # not the user's name: Orthanc connects as the same user (see dicomsync.pg)
        "Queue": {"Kind": "postgresql", "Url": pg.dsn(db), "PasswordEnv": ENV, "Schema": "dsq"},
        "StateDirectory": str(base / name / "state"),
        "NodeId": name,
        "PollInterval": 1,
        "MetricsInterval": 5,
    }
    return config


def start_nodes(
    pg: PgCluster, db: str, base: Path, n: int, b: OrthancProcess | None, routed: bool
) -> list[OrthancProcess]:
    nodes = []
    for i in range(1, n + 1):
        name = f"node{i}"
        node = OrthancProcess(
            base / name,
            name,
            plugin=b is not None,
            config=node_config(pg, db, base, name, b, routed),
            postgresql=index_section(pg, db),
            env={ENV: pg.password},
        )
        nodes.append(node.start(60))
    return nodes


def queue_drained(node: OrthancProcess, b: OrthancProcess, n: int) -> bool:
    """B holds the ``n`` instances and nothing is queued or sending (a failed attempt's
    instances count once they are there, whoever sent them)."""
    d = node.get("/dicomsync/status")["Destinations"].get("b", {})
    return d.get("Queued", 1) == 0 and d.get("Sending", 1) == 0 and count(b) >= n


def fresh_db(pg: PgCluster, label: str) -> str:
    name = f"bench_{label}_{int(time.time() * 1000) % 10**9}"
    pg.create_database(name)
    return name


def bench_replication(
    pg: PgCluster, base: Path, files: list[Path], rounds: int
) -> list[tuple[str, str]]:
    b = OrthancProcess(
        base / "rep-b", "b", config={"Plugins": [PYTHON_PLUGIN], "PythonScript": str(COUNTER)}
    ).start()
    rates: dict[str, list[float]] = {"native POST /peers/b/store": [], "1 node": [], "2 nodes": []}
    try:
        for r in range(rounds):
            db = fresh_db(pg, f"rep{r}")
            folder = base / f"rep-{r}"
            nodes = start_nodes(pg, db, folder, 2, b, routed=False)
            try:
                upload(nodes[0].url, files[0::2], threads=2)
                upload(nodes[1].url, files[1::2], threads=2)
                n = len(files)
                studies = nodes[0].get("/studies")
                t = time.perf_counter()
                requests.post(
                    f"{nodes[0].url}/peers/b/store",
                    json={"Resources": studies, "Synchronous": True},
                    timeout=3600,
                ).raise_for_status()
                rates["native POST /peers/b/store"].append(n / (time.perf_counter() - t))
                assert count(b) == n
                for layout, active in (("1 node", nodes[:1]), ("2 nodes", nodes)):
                    clear(b)
                    idle = [x for x in nodes if x not in active]
                    for x in idle:  # its workers must not help
                        x.stop()
                    t = time.perf_counter()
                    requests.post(  # enqueued again (B was cleared): sent again
                        f"{active[0].url}/dicomsync/send",
                        json={"Destination": "b", "Resources": studies},
                        timeout=600,
                    ).raise_for_status()
                    wait(lambda a=active[0], k=n: queue_drained(a, b, k), interval=0.2)
                    rates[layout].append(n / (time.perf_counter() - t))
                    assert count(b) == n, (layout, count(b), n)
                    for x in idle:
                        x.start(60)
            finally:
                for x in nodes:
                    x.stop()
                pg.drop_database(db)
    finally:
        b.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    native = med["native POST /peers/b/store"]
    rows = [
        (k, f"{v:7.1f} instances/s (median of {rounds}), {v / native:.2f}x native")
        for k, v in med.items()
    ]
    rows.append(("2 nodes / 1 node", f"{med['2 nodes'] / med['1 node']:.2f}x"))
    return rows


def bench_ingest(
    pg: PgCluster, base: Path, files: list[Path], rounds: int
) -> list[tuple[str, str]]:
    b = OrthancProcess(base / "ing-b", "b").start()
    variants = [
        ("1 node, plugin off", 1, False),
        ("1 node, plugin on, routing", 1, True),
        ("2 nodes, plugin off", 2, False),
        ("2 nodes, plugin on, routing", 2, True),
    ]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    try:
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for k, (label, n, plugin) in enumerate(order):
                db = fresh_db(pg, f"ing{r}{k}")
                folder = base / f"ing-{r}-{k}"
                nodes = start_nodes(pg, db, folder, n, b if plugin else None, routed=True)
                try:
                    t = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        list(
                            pool.map(
                                lambda i, nodes=nodes, n=n: upload(nodes[i].url, files[i::n]),
                                range(n),
                            )
                        )
                    rates[label].append(len(files) / (time.perf_counter() - t))
                    if plugin:
                        wait(lambda node=nodes[0]: queue_drained(node, b, len(files)), interval=0.2)
                finally:
                    for x in nodes:
                        x.stop()
                    pg.drop_database(db)
                clear(b)
    finally:
        b.stop()
    med = {label: statistics.median(v) for label, v in rates.items()}
    rows = [(label, f"{v:7.1f} instances/s (median of {rounds})") for label, v in med.items()]
    rows.append(
        (
            "2 nodes / 1 node, plugin off",
            f"{med['2 nodes, plugin off'] / med['1 node, plugin off']:.2f}x",
        )
    )
    for n in (1, 2):
        on = med[f"{n} node{'s' if n > 1 else ''}, plugin on, routing"]
        off = med[f"{n} node{'s' if n > 1 else ''}, plugin off"]
        rows.append((f"{n} node(s): routing / off", f"{on / off:.2f}x"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--size", type=int, default=500_000, help="pixel bytes per instance")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=["a", "b"], action="append")
    args = p.parse_args()
    if args.quick:
        args.instances, args.rounds = 100, 1
    only = set(args.only or "ab")
    base = workdir("nodes")
    print(f"work folder: {base}", flush=True)
    files = generate(base / "data", max(1, args.instances // 50), 50, args.size, "N")
    print(f"{os.cpu_count()} CPU(s)", flush=True)
    with PgCluster() as pg:
        if "a" in only:
            report(
                f"(a) replication to B through 1 and 2 nodes, {len(files)} instances of "
                f"{args.size / 1e6:.1f} MB",
                bench_replication(pg, base, files, args.rounds),
            )
        if "b" in only:
            report(
                f"(b) ingest into 1 and 2 nodes, {len(files)} instances",
                bench_ingest(pg, base, files, args.rounds),
            )


if __name__ == "__main__":
    main()
