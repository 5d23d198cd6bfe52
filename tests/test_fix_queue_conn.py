"""PostgreSQL connections: pooled connections the server dropped (a restart, a failover, an
idle timeout) are replaced when taken, so no queue call fails on them; a secret-bearing
libpq URL parameter is refused, and the URL's query string is never shown."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from dicomsync.errors import ConfigError
from dicomsync.pg import PgTarget, check_url
from dicomsync.queue import NewJob
from dicomsync.queue.postgres import PostgresQueue

ENV = "DICOMSYNC_TEST_QUEUE_PASSWORD"


def test_no_queue_call_fails_on_connections_the_server_dropped(
    pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, pg_cluster.password)
    url = pg_cluster.create_database()
    queue = PostgresQueue(PgTarget.checked(url, ENV, "dicomsync_queue"))
    try:
        barrier = threading.Barrier(4)

        def use() -> None:  # four connections in the pool at once
            with queue._pool.connection():
                barrier.wait(10)

        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert queue._pool.get_stats()["pool_size"] == 4
        with psycopg.connect(url, password=pg_cluster.password, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'dicomsync' AND pid <> pg_backend_pid()"
                " AND datname = current_database()"
            ).fetchone()
        assert killed is not None and killed[0] >= 4
        for i in range(8):  # each would have met a dead connection
            assert queue.enqueue(NewJob("tags", f"i{i}", "d")).action == "created"
        assert queue.stats()["d"].queued == 8
    finally:
        queue.close()


@pytest.mark.parametrize("key", ["password", "sslpassword", "SSLPassword", "PASSWORD"])
def test_a_url_carrying_a_secret_parameter_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="no password") as err:
        check_url(f"postgresql://u@db:5432/x?sslmode=require&{key}=hunter2", "Queue")
    assert "hunter2" not in str(err.value)


def test_the_url_query_string_is_never_described() -> None:
    target = PgTarget.checked(
        "postgresql://u@db:5432/x?sslmode=verify-full&sslkey=/k/client.key", "E", "s"
    )
    assert target.describe() == "postgresql://u@db:5432/x (schema s)"
