"""Shared fixtures: a private header cache, real Orthanc servers on free ports, the CLI runner."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from dicomsync.queue import Queue, RetryPolicy
from dicomsync.queue.sqlite import SQLiteQueue

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_cluster import PgCluster

from dicomdata import build_seed_tree, data_dir
from orthanc_server import OrthancProcess


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test session gets its own header cache, never the user's."""
    old = os.environ.get("DICOMSYNC_CACHE_DIR")
    os.environ["DICOMSYNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DICOMSYNC_CACHE_DIR", None)
    else:
        os.environ["DICOMSYNC_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    assert path.is_dir(), f"test data folder missing: {path} (set DICOMSYNC_TEST_DATA)"
    return path


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One plain Orthanc (no plugin) for the whole session."""
    server = OrthancProcess(tmp_path_factory.mktemp("orthanc"), "store").start()
    yield server
    server.stop()


def clear_orthanc(server: OrthancProcess) -> None:
    for pid in requests.get(server.url + "/patients", timeout=30).json():
        requests.delete(f"{server.url}/patients/{pid}", timeout=30).raise_for_status()


@pytest.fixture
def orthanc(orthanc_server: OrthancProcess) -> OrthancProcess:
    """The session Orthanc, emptied before the test."""
    clear_orthanc(orthanc_server)
    return orthanc_server


@pytest.fixture(scope="session")
def dicomweb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One Orthanc serving DICOMweb at ``/dicom-web/`` (its DICOMweb plugin), for the session."""
    server = OrthancProcess(tmp_path_factory.mktemp("web"), "web", dicomweb=True).start()
    yield server
    server.stop()


@pytest.fixture
def web(dicomweb_server: OrthancProcess) -> OrthancProcess:
    """The session's DICOMweb Orthanc, emptied before the test."""
    clear_orthanc(dicomweb_server)
    return dicomweb_server


# Queue backends the queue contract tests run on: name -> open(folder, policy, clock).
_PG: dict[str, Any] = {}  # "cluster": the session's PgCluster, "urls": folder -> database


def _postgres_queue(where: Path, policy: RetryPolicy | None, clock: Callable[[], float]) -> Queue:
    """A PostgreSQL queue in a database of its own per folder (the same folder: the same
    queue), password through ``PasswordEnv`` as in production."""
    from dicomsync.pg import PgTarget
    from dicomsync.queue.postgres import PostgresQueue

    cluster = _PG["cluster"]
    urls = _PG.setdefault("urls", {})
    if str(where) not in urls:
        urls[str(where)] = cluster.create_database()
    os.environ["DICOMSYNC_TEST_PG_PASSWORD"] = cluster.password
    target = PgTarget.checked(urls[str(where)], "DICOMSYNC_TEST_PG_PASSWORD", "dicomsync")
    return PostgresQueue(target, policy, clock=clock)


QUEUE_BACKENDS: dict[str, Callable[[Path, RetryPolicy | None, Callable[[], float]], Queue]] = {
    "sqlite": lambda where, policy, clock: SQLiteQueue(where / "queue.sqlite", policy, clock=clock),
    "postgresql": _postgres_queue,
}


@pytest.fixture(params=sorted(QUEUE_BACKENDS))
def queue_backend(
    request: pytest.FixtureRequest,
) -> Callable[..., Queue]:
    """Opens a queue of one backend: ``queue_backend(folder, policy=None, clock=time.time)``.
    Tests using it (or ``q``) run once per backend of ``QUEUE_BACKENDS``."""
    factory = QUEUE_BACKENDS[request.param]
    if request.param == "postgresql":
        _PG["cluster"] = request.getfixturevalue("pg_cluster")

    def open_backend(
        where: Path, policy: RetryPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> Queue:
        return factory(where, policy, clock)

    return open_backend


@pytest.fixture
def q(tmp_path: Path, queue_backend: Callable[..., Queue]) -> Iterator[Queue]:
    """A fresh queue (30 s, 60 s, 3 attempts) for worker and queue tests, per backend."""
    queue = queue_backend(tmp_path, RetryPolicy(30, 60, 3))
    yield queue
    queue.close()


class Cli:
    """Runs ``dicomsync`` in-process with a given config file."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str, ok: bool = True) -> Result:
        from dicomsync.cli.main import cli

        result = CliRunner().invoke(
            cli, ["--config", str(self.config), *args], catch_exceptions=False
        )
        if ok and result.exit_code != 0:
            raise AssertionError(
                f"dicomsync {' '.join(args)} exited {result.exit_code}:\n{result.output}"
            )
        return result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "dicomsync.json")


@pytest.fixture
def seed(tmp_path: Path, cli: Cli) -> dict[str, list[Path]]:
    """The README walk-through's tree under ``tmp_path/dicom_root``, added as the place
    ``my_studies`` of a new dicomsync.json (modules with their own ``seed`` override it)."""
    layout = build_seed_tree(tmp_path / "dicom_root")
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "dicom_root"))
    return layout


XNAT_PASSWORD = "Zebra-Secret-4711"


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    """The XNAT stand-in's password for user ``tester``, in ``$XNAT_PASS`` for this test."""
    monkeypatch.setenv("XNAT_PASS", XNAT_PASSWORD)
    return XNAT_PASSWORD


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throw-away PostgreSQL 15 cluster for the session (see tests/pg_cluster.py);
    ``pg_cluster.create_database()`` gives each test a fresh database's URL."""
    with PgCluster() as cluster:
        yield cluster
