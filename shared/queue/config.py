"""Where the queue lives: the ``Queue`` option of the ``DicomSync`` section.

``{"Kind": "sqlite"}`` (the default, also with no ``Queue`` at all) is
``StateDirectory/queue.sqlite``, this node's own. ``{"Kind": "postgresql", "Url":
"postgresql://dicomsync@db:5432/orthanc", "PasswordEnv": "DICOMSYNC_DB_PASSWORD"}`` is a
queue every node naming the same database and ``Schema`` shares
(``dicomsync.queue.postgres``). The URL may name the user, never a password
(``dicomsync.pg.check_url``, the rule of every URL); the password is read from the
environment variable ``PasswordEnv`` at each connection.

``QueueConfig.parse(section, where, problems)`` checks the section (``QueueOptions``)
without connecting; ``open_queue`` (``dicomsync.queue``) opens it. Pure and thread-safe;
``ConfigError`` for a bad section (or appended to ``problems``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomsync import options
from dicomsync.errors import ConfigError
from dicomsync.pg import PgTarget

KINDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class QueueOptions:
    """The options of the ``DicomSync.Queue`` section."""

    kind: str = options.option(
        "Kind",
        "str",
        "`sqlite` (`StateDirectory/queue.sqlite`, this node's) or `postgresql` (one queue "
        "for every node naming the same database)",
        default="sqlite",
    )
    url: str | None = options.option(
        "Url",
        "str",
        "`postgresql`: libpq URL `postgresql://USER@HOST:PORT/DB` (a user, never a password)",
        shown="none",
    )
    password_env: str | None = options.option(
        "PasswordEnv",
        "envvar",
        "`postgresql`: environment variable with the database password",
        shown="none",
    )
    schema: str = options.option(
        "Schema",
        "str",
        "`postgresql`: the schema of the queue's tables (created if missing)",
        default="dicomsync_queue",
    )


@dataclass(frozen=True)
class QueueConfig:
    """``kind`` and, for ``postgresql``, the checked ``target``."""

    kind: str = "sqlite"
    target: PgTarget | None = None

    @classmethod
    def parse(
        cls, section: Any, where: str = "DicomSync.Queue", problems: list[str] | None = None
    ) -> QueueConfig:
        try:
            return cls._parse(section, where)
        except ConfigError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            return cls()

    @classmethod
    def _parse(cls, section: Any, where: str) -> QueueConfig:
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where} must be an object {{Kind, Url, PasswordEnv, Schema}}")
        extra = options.unknown(section, options.names(QueueOptions))
        if extra:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(extra)}")
        opts = options.parse(QueueOptions, section, where)
        if opts.kind not in KINDS:
            raise ConfigError(f"{where}: Kind must be one of {', '.join(KINDS)}")
        if opts.kind == "sqlite":
            if opts.url or opts.password_env:
                raise ConfigError(f"{where}: Url and PasswordEnv are for Kind postgresql")
            return cls()
        if not opts.url:
            raise ConfigError(f"{where}: option 'Url' is required for Kind postgresql")
        target = PgTarget.checked(opts.url, opts.password_env, opts.schema, where)
        return cls("postgresql", target)
