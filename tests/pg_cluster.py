"""A throw-away PostgreSQL 15 cluster for tests and benchmarks: temp folder, free port, stop by PID.

``initdb`` and ``postgres`` come from Debian's ``postgresql-15`` package
(``/usr/lib/postgresql/15/bin``, override with ``$PG_BIN``). PostgreSQL refuses to run
as root, so when the tests run as root the cluster's folder is handed to the
``postgres`` user and every server command runs through ``runuser -u postgres --``.

The cluster listens on 127.0.0.1 on a free port and on a unix socket inside its own
folder (never ``/var/run/postgresql``). Local connections as the superuser are
``trust``; TCP connections need a password (``scram-sha-256``), so a test can check
that ``PasswordEnv`` really carries the password. One password user exists:
``dicomsync`` / ``PgCluster.password``; it owns every database ``create_database`` makes.

Usage (pytest fixture ``pg_cluster`` in tests/conftest.py, session-scoped)::

    def test_x(pg_cluster, monkeypatch):
        dsn = pg_cluster.create_database("x")      # fresh empty database, returns its URL
        # dsn == "postgresql://dicomsync@127.0.0.1:<port>/x"  (no password in it)
        monkeypatch.setenv("DICOMSYNC_DB_PASSWORD", pg_cluster.password)
        psycopg.connect(pg_cluster.dsn("x", password=True))  # a libpq conninfo with the password

Outside pytest: ``with PgCluster(folder) as pg: ...``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "dicomsync"
PG_PASSWORD = "Pg-Test-Secret-0815"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as a non-root user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PgCluster:
    """One PostgreSQL server in its own folder. ``start()`` / ``stop()``, or use as a context."""

    user = PG_USER
    password = PG_PASSWORD

    def __init__(self, folder: Path | None = None, max_connections: int = 200) -> None:
        self._own_folder = folder is None
        # /tmp, not pytest's tmp_path: the postgres user must be able to reach the folder
        self.folder = Path(folder or tempfile.mkdtemp(prefix="dicomsync-pg-"))
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "sock"
        self.port = _free_port()
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "postgres.log"

    # --- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Self:
        sweep_orphans()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / OWNER_FILE).write_text(str(os.getpid()))
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.folder, 0o755)
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        subprocess.run(
            [
                *_as_postgres(),
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd="/",
        )
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as f:
            f.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"max_connections = {self.max_connections}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 64MB\n"
            )
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
            self.psql(
                f"CREATE ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'", db="postgres"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            r = subprocess.run(
                [
                    str(PG_BIN / "pg_isready"),
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    "-q",
                ],
                capture_output=True,
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT to the postmaster's PID (PostgreSQL's fast shutdown), then SIGKILL; the
        folder is removed. ``runuser`` does not forward signals, so the postmaster's own PID
        (from its pid file) is signalled and ``runuser`` exits with it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            pid = self._postmaster_pid() or proc.pid
            self._signal(pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(pid, signal.SIGKILL)
                self._signal(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _postmaster_pid(self) -> int | None:
        return _postmaster_pid(self.data)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- databases -----------------------------------------------------------------------
    def psql(self, sql: str, db: str = "postgres") -> str:
        """Runs ``sql`` as the superuser over the unix socket; returns psql's unaligned output."""
        r = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {sql}\n{r.stderr}")
        return r.stdout

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database owned by ``dicomsync``; returns ``dsn(name)``.
        Without a name, a unique one is made up."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}" OWNER {PG_USER} TEMPLATE template0')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def dsn(self, dbname: str, password: bool = False) -> str:
        """The URL of ``dbname`` for user ``dicomsync`` over TCP. Without ``password`` it
        carries none (what a config's ``Url`` holds); with it, a libpq URL a test may connect
        with directly."""
        auth = f"{PG_USER}:{PG_PASSWORD}" if password else PG_USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    @property
    def host(self) -> str:
        return "127.0.0.1"


OWNER_FILE = "owner.pid"  # the process that started a cluster of ours


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(root: Path | None = None) -> list[Path]:
    """Stop the clusters of ours whose starting process is gone (a test run killed by a
    signal never ran its ``stop``), by their postmaster's PID, and remove their folders.
    A folder without an owner file (still being made, or not ours) is left alone."""
    swept = []
    for folder in sorted(Path(root or tempfile.gettempdir()).glob("dicomsync-pg-*")):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        pid = _postmaster_pid(folder / "data")
        if pid is not None and _alive(pid):
            PgCluster._signal(pid, signal.SIGINT)
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                PgCluster._signal(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        swept.append(folder)
    return swept
