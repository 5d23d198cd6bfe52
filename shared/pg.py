"""PostgreSQL connections for the parts of dicomsync that several nodes share.

Used by the ``postgresql_index`` sink and by the sinks' delivered ledger when the queue
is on PostgreSQL (``dicomsync.sinks.base.open_ledger``). ``psycopg`` is imported only
when a connection is made, so nothing else pays for it.

A ``PgTarget`` is what a section such as ::

    {"Url": "postgresql://dicomsync@db:5432/orthanc", "PasswordEnv": "DICOMSYNC_DB_PASSWORD"}

says (each section declares these options itself, with ``dicomsync.options``):

- ``Url`` is a libpq URL. It may name the user (not a secret), never a password: a
  ``user:password@`` part is refused by ``dicomsync.urls`` for every section, and a
  ``password=`` or ``sslpassword=`` query parameter by ``check_url`` here; ``describe``
  (the name errors and logs use) leaves the query string out.
- ``PasswordEnv`` names the environment variable holding the password; it is read at
  each connection and handed to libpq as its own parameter, so it never lands in a URL,
  a log line or an error (``describe`` shows the URL, which has none).
- the schema: dicomsync's tables live in their own schema of the shared database (the
  Orthanc index keeps ``public``); it is created on first use; every connection has it
  first on its ``search_path``. It must not have the name of the user Orthanc's index
  connects as: PostgreSQL's default ``search_path`` is ``"$user", public``, so that
  Orthanc would create its tables in our schema, and orthanc-postgresql 4.0 refuses to
  start on such a database ("Corrupted PostgreSQL database"). Creating a schema named
  like the connecting user logs a warning.

Errors (``is_transient``): a lost or refused connection, a server shutting down, too many
connections, a serialization failure or a deadlock may pass: retryable. An authentication
failure, a TLS/certificate failure, a missing database or a bad statement will not pass
by waiting (the same rule as ``dicomsync.http_errors``: TLS is never transient).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from dicomsync.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SCHEMES = ("postgresql", "postgres")
# SQLSTATE classes/codes that may pass by waiting
_TRANSIENT_STATES = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01", "55P03")
# PostgreSQL's default search_path is ("$user", public): an Orthanc whose index connects as
# a user with the schema's name creates its tables in our schema, and orthanc-postgresql 4.0
# then refuses a fresh database ("Corrupted PostgreSQL database")
SAME_AS_USER = (
    "schema %r has the name of the database user (%s): an Orthanc index connecting as that "
    'user would put its tables in it (PostgreSQL\'s search_path starts with "$user") and '
    "orthanc-postgresql refuses such a database; give Orthanc another user or set Schema"
)
# libpq URL parameters that carry a secret (the password, the client key's passphrase)
_SECRET_KEYS = {"password", "sslpassword"}
_FATAL_WORDS = ("password", "authentication", "ssl", "certificate", "does not exist")


def check_url(url: str, where: str) -> str:
    """``url`` when it is a PostgreSQL URL without a password; ConfigError otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in _SCHEMES:
        raise ConfigError(f"{where}: Url must start with postgresql:// (a libpq URL)")
    keys = {k.lower() for k in parse_qs(parts.query, keep_blank_values=True)}
    if parts.password is not None or keys & _SECRET_KEYS:
        raise ConfigError(
            f"{where}: Url must carry no password; put it in an environment variable "
            "named by PasswordEnv"
        )
    return url.strip()


def check_schema(schema: str, where: str) -> str:
    if not _IDENT.match(schema):
        raise ConfigError(
            f"{where}: Schema must be a lower-case SQL name (letters, digits, _), not {schema!r}"
        )
    return schema


@dataclass(frozen=True)
class PgTarget:
    """Where to connect: a URL without a password, the variable holding it, the schema."""

    url: str
    password_env: str | None = None
    schema: str = "dicomsync_queue"
    what: str = "PostgreSQL"

    @classmethod
    def checked(
        cls, url: str, password_env: str | None, schema: str, what: str = "PostgreSQL"
    ) -> PgTarget:
        """A target whose URL and schema passed ``check_url`` and ``check_schema``."""
        return cls(check_url(url, what), password_env, check_schema(schema, what), what)

    def ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """``CREATE SCHEMA IF NOT EXISTS`` (two nodes creating it at once: the loser's
        unique violation is ignored). A schema named like the connecting user is made with
        a warning (``SAME_AS_USER``)."""
        import psycopg

        row = conn.execute("SELECT current_user, to_regnamespace(%s) IS NULL", (self.schema,))
        user, missing = row.fetchone() or ("", False)
        if missing and user == self.schema:
            log.warning(SAME_AS_USER, self.schema, self.what)
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        except psycopg.errors.UniqueViolation:
            if not conn.autocommit:
                conn.rollback()

    def describe(self) -> str:
        """The URL without its query string (libpq options, never printed), the schema."""
        parts = urlsplit(self.url)
        return f"{parts._replace(query='', fragment='').geturl()} (schema {self.schema})"

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "connect_timeout": 10,
            "application_name": "dicomsync",
            "options": f"-c search_path={self.schema},public",
        }
        if self.password_env:
            password = os.environ.get(self.password_env)
            if password:
                kwargs["password"] = password
        return kwargs

    def connect(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        """One connection; psycopg's errors pass through (map them with ``is_transient``)."""
        import psycopg

        return psycopg.connect(self.url, autocommit=autocommit, **self._kwargs())

    def connect_prepared(self, lock_key: int, ddl: str) -> psycopg.Connection[Any]:
        """A new connection (autocommit off) after the schema and ``ddl`` (idempotent
        ``CREATE … IF NOT EXISTS``) were made under the advisory lock ``lock_key``, so two
        nodes starting at once do not race to create them."""
        conn = self.connect(autocommit=False)
        try:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
            self.ensure_schema(conn)
            conn.execute(ddl)
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def pool(self, min_size: int = 1, max_size: int = 4) -> ConnectionPool:
        """A connection pool in autocommit mode, opened lazily (``open=False``: the first
        ``connection()`` waits for it)."""
        from psycopg_pool import ConnectionPool

        kwargs = {**self._kwargs(), "autocommit": True}
        return ConnectionPool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            kwargs=kwargs,
            open=False,
            timeout=30,
            # a pooled connection the server dropped (a restart, a failover, an idle
            # timeout) is replaced when taken, not failed on: a done() after a good send
            # must not be lost to a stale connection
            check=ConnectionPool.check_connection,
        )


def is_transient(exc: BaseException) -> bool:
    """May this psycopg error pass by waiting? (see the module docstring)"""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and state:
        return state.startswith(_TRANSIENT_STATES)
    text = str(exc).lower()
    if any(word in text for word in _FATAL_WORDS):
        return False
    import psycopg
    from psycopg_pool import PoolTimeout

    # no SQLSTATE: libpq could not connect or lost the connection
    return isinstance(exc, psycopg.OperationalError | PoolTimeout)


def short(exc: BaseException) -> str:
    """The first line of a psycopg error (libpq adds hints and context lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
