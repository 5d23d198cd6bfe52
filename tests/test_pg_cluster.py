"""The PostgreSQL test cluster itself: password auth over TCP, fresh databases, stop by PID."""

from __future__ import annotations

import os

import psycopg
import pytest
from pg_cluster import PgCluster


def test_fresh_database_and_password_auth(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database()
    assert ":" not in url.split("@")[0].removeprefix("postgresql://")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5).close()
    with psycopg.connect(url, password=pg_cluster.password, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE t (x int)")
        assert conn.execute("SELECT current_user").fetchone() == ("dicomsync",)
    other = pg_cluster.create_database()
    with psycopg.connect(other, password=pg_cluster.password) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename='t'").fetchone() == (0,)


def test_stop_by_pid_removes_everything() -> None:
    cluster = PgCluster().start()
    pid = cluster.proc.pid if cluster.proc else 0
    folder = cluster.folder
    cluster.stop()
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_cluster_whose_test_run_was_killed_is_stopped_by_the_next_run() -> None:
    """kill -9 of a test run never runs its cluster's stop; the next start sweeps it."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pg_cluster import _alive, _postmaster_pid, sweep_orphans

    here = Path(__file__).resolve().parent
    code = (
        f"import sys, time; sys.path.insert(0, {str(here)!r}); from pg_cluster import PgCluster;"
        "c = PgCluster().start(); print(c.folder, flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    folder = Path(child.stdout.readline().strip())
    pid = _postmaster_pid(folder / "data")
    assert pid is not None and _alive(pid)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    time.sleep(0.5)
    assert _alive(pid)  # orphaned: nobody stopped it
    assert folder in sweep_orphans()
    assert not _alive(pid) and not folder.exists()
