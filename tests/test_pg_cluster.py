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
