"""The ``DicomSync`` section of Orthanc's configuration: its options, parsed and checked.

::

    "DicomSync": {
      "Places": {"b": {"Kind": "orthanc", "Url": "http://pacs-b:8042"},
                 "zips": {"Kind": "zipped_root", "Path": "zips"}},   // or "dicomsync.json"
      "Routes": [
        {"Destination": "b", "Filter": {"Modality": ["CT", "PT"], "CallingAet": "SCANNER*"},
         "Concurrency": 4},
        {"Destination": "zips"}
      ],
      "StateDirectory": "dicomsync-state",      // default: "dicomsync" beside StorageDirectory
      "Retry": {"BaseDelay": 5, "MaxDelay": 600, "MaxAttempts": 10},
      "Sinks": {"local": {"Kind": "sqlite_index", "Path": "index.sqlite"}}   // or a file
    }

Relative paths are relative to the folder of Orthanc's configuration file, as
Orthanc itself resolves ``StorageDirectory``; except in inline ``Sinks``, whose
paths (the index file, the delivered ledgers, a CA bundle) are relative to
``StateDirectory``. ``Places`` or ``Sinks`` given as a path to a dicomsync.json
file are relative to that file's folder.

Every option is declared once: ``SyncOptions`` (the section), ``RouteOptions``
(``dicomsync.route_facts``), ``RetryOptions`` (``dicomsync.queue.base``), checked with
``dicomsync.options.parse``; ``load`` raises one ``ConfigError`` listing every problem,
``validate`` returns them. Route filters, the ``Routes`` parser and ``study_facts`` live in
``dicomsync.route_facts``, the job handler in ``dicomsync.route_handler``; both are
re-exported here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomsync import deid, options
from dicomsync.config import build_place, is_finite_number, load_sections, resolve_path
from dicomsync.console import dose_levels
from dicomsync.errors import ConfigError, DicomSyncError, UnknownPlaceError
from dicomsync.header_cache import HeaderCache, default_cache_dir
from dicomsync.options import option
from dicomsync.places.base import PLACES, Place
from dicomsync.places.local import RootPlace
from dicomsync.queue.base import RetryPolicy
from dicomsync.queue.config import QueueConfig
from dicomsync.route_facts import (
    DEFAULT_CONCURRENCY,
    FILTER_KEYS,
    INSTANCE_KEYS,
    MAX_CONCURRENCY,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    Route,
    RouteOptions,
    is_destination_kind,
    parse_routes,
    study_facts,
)
from dicomsync.route_handler import RouteHandler
from dicomsync.urls import credential_problem
from dicomsync.worker import Lane

__all__ = [  # re-exported from route_facts and route_handler
    "DEFAULT_CONCURRENCY",
    "FILTER_KEYS",
    "INSTANCE_KEYS",
    "MAX_CONCURRENCY",
    "PATIENT_KEYS",
    "SERIES_KEYS",
    "STUDY_KEYS",
    "Route",
    "RouteHandler",
    "RouteOptions",
    "study_facts",
]

log = logging.getLogger(__name__)

SECTION = "DicomSync"
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class SyncOptions:
    """The options of the ``DicomSync`` section (the structured ones are checked by
    ``_parse``: ``Places``/``Sinks`` by ``config.load_sections``, ``Routes`` item by
    item with ``RouteOptions``, ``Retry`` by ``RetryPolicy.from_config``)."""

    places: Mapping[str, Any] | str | None = option(
        "Places",
        "any",
        "the same schema as `dicomsync.json`, inline or a path to such a file",
        shown="none",
    )
    routes: Sequence[Any] | None = option(
        "Routes",
        "any",
        "`[{Destination, Filter, Concurrency}]` (`Routes[].` below); `Destination` is a place key",
        shown="`[]`",
    )
    state_directory: str | None = option(
        "StateDirectory",
        "path",
        "the queue (`queue.sqlite`) and caches",
        shown="`dicomsync/` beside `StorageDirectory`",
    )
    retry: Mapping[str, Any] | None = option(
        "Retry",
        "any",
        "the backoff of failed jobs (`Retry.` below); failed after `MaxAttempts`",
        shown="5 s, 600 s, 10",
    )
    sinks: Mapping[str, Any] | str | None = option(
        "Sinks",
        "any",
        "tag sinks, as in `dicomsync.json`, inline (paths relative to `StateDirectory`) "
        "or a path to a file",
        shown="`{}` (`orthanc.json` ships an `index` sqlite_index)",
    )
    sinks_backfill: bool = option(
        "SinksBackfill",
        "bool",
        "a sink seen for the first time indexes every instance Orthanc already holds",
        default=True,
    )
    node_id: str | None = option(
        "NodeId",
        "str",
        "this node's name for leases and cursors (without it, the name stored in "
        "`StateDirectory/node-id` at the first start)",
        shown="`hostname:StateDirectory`",
    )
    lease_seconds: float = option(
        "LeaseSeconds",
        "seconds",
        "how long a claimed job stays claimed without a heartbeat",
        default=300.0,
        above=0,
    )
    poll_interval: float = option(
        "PollInterval", "seconds", "longest worker sleep", default=5.0, above=0
    )
    metrics_interval: float = option(
        "MetricsInterval", "seconds", "seconds between metric updates", default=5.0, above=0
    )
    enabled: bool = option("Enabled", "bool", "`false` turns routing off", default=True)
    queue: Mapping[str, Any] | None = option(
        "Queue",
        "any",
        "where the queue lives (`Queue.` below): this node's SQLite file, or a PostgreSQL "
        "database every node shares",
        shown="`queue.sqlite` in `StateDirectory`",
    )
    deidentify: Mapping[str, Any] | None = option(
        "Deidentify",
        "any",
        "de-identification profiles by name, as in `dicomsync.json` (`docs/deid.md`); a "
        "route's `Deidentify` names one; `PatientIds` tables live in `queue.sqlite`",
        shown="`{}`",
    )
    dose: Mapping[str, Any] | None = option(
        "Dose",
        "any",
        "the console's dose page: `Index`, `ReferenceLevels` (`Dose.` below)",
        shown="the first index sink; head 50/75, chest and abdomen 20/25 mGy",
    )


KNOWN_OPTIONS = options.names(SyncOptions)


@dataclass
class SyncConfig:
    """The parsed ``DicomSync`` section: every option of ``SyncOptions``, typed and
    resolved (paths made absolute, ``Places``/``Sinks`` loaded, ``Routes`` and ``Retry``
    built). Nothing reads the raw section after ``load``."""

    places: dict[str, dict[str, Any]]
    places_base: Path
    routes: list[Route]
    state_dir: Path
    retry: RetryPolicy
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue: QueueConfig = field(default_factory=QueueConfig)  # dicomsync.queue.config
    sinks_base: Path = Path(".")
    node_id: str = ""
    node_id_given: bool = False  # NodeId set in the section (else stored_node_id applies)
    lease_seconds: float = 300.0
    poll_interval: float = 5.0
    metrics_interval: float = 5.0
    sinks_backfill: bool = True
    enabled: bool = True
    warnings: list[str] = field(default_factory=list)
    profiles: dict[str, Any] = field(default_factory=dict)  # name -> deid Profile
    deidentify: dict[str, str] = field(default_factory=dict)  # destination -> profile name
    dose: dict[str, Any] = field(default_factory=dict)  # dicomsync.console.dose_levels
    _header_cache: HeaderCache | None = field(default=None, repr=False, compare=False)

    @property
    def filter_keys(self) -> set[str]:
        return {k for r in self.routes for k in r.filter}

    def destinations(self) -> list[str]:
        """Places that can receive: every route destination, then other destination kinds."""
        out = list(dict.fromkeys(r.destination for r in self.routes))
        for key, section in self.places.items():
            if key not in out and is_destination_kind(section):
                out.append(key)
        return out

    def lanes(self) -> list[Lane]:
        concurrency: dict[str, int] = {}
        for r in self.routes:
            concurrency[r.destination] = max(concurrency.get(r.destination, 1), r.concurrency)
        return [Lane(d, concurrency.get(d, 1), kind="study") for d in self.destinations()]

    def build_place(self, key: str) -> Place:
        try:
            section = self.places[key]
        except KeyError:
            known = ", ".join(sorted(self.places)) or "none"
            raise UnknownPlaceError(f"unknown place {key!r} (configured: {known})") from None
        place: Place = build_place(key, section, self.places_base)
        if isinstance(place, RootPlace) and place._cache is None:
            place._cache = self.header_cache()
        if key in self.deidentify:  # studies leave de-identified (dicomsync.deid)
            from dicomsync.deid import deidentified

            profile = self.profiles[self.deidentify[key]]
            place = deidentified(place, profile, self.state_dir / "queue.sqlite", self.queue)
        return place

    def header_cache(self) -> HeaderCache:
        """The header cache of this node's folder places: ``$DICOMSYNC_CACHE_DIR`` when set,
        else ``StateDirectory/cache``. Passed to each place; the process environment (which
        the CLI and other plugins share) is never changed."""
        with _CACHE_LOCK:
            if self._header_cache is None:
                folder = (
                    default_cache_dir()
                    if os.environ.get("DICOMSYNC_CACHE_DIR")
                    else self.state_dir / "cache"
                )
                self._header_cache = HeaderCache(folder / "headers.sqlite")
            return self._header_cache

    def matching_routes(self, facts: Mapping[str, Collection[str]]) -> list[Route]:
        return [r for r in self.routes if r.matches(facts)]


def config_base_dir(config_path: str | Path | None) -> Path:
    """The folder relative paths are resolved against (Orthanc's own rule)."""
    if not config_path:
        return Path.cwd()
    path = Path(config_path)
    return path if path.is_dir() else path.parent


def storage_dir(orthanc_config: Mapping[str, Any], base_dir: Path) -> Path:
    """Orthanc's ``StorageDirectory``, resolved as Orthanc resolves it."""
    return resolve_path(str(orthanc_config.get("StorageDirectory") or "OrthancStorage"), base_dir)


def stable_age(orthanc_config: Mapping[str, Any]) -> float:
    """Orthanc's ``StableAge`` in seconds; its default, 60, when it is not a finite number >= 0."""
    value = orthanc_config.get("StableAge", 60)
    if is_finite_number(value) and value >= 0:
        return float(value)
    log.warning("StableAge is not a number of seconds (%.40r); taking 60", value)
    return 60.0


def default_state_dir(orthanc_config: Mapping[str, Any], base_dir: Path) -> Path:
    return storage_dir(orthanc_config, base_dir).parent / "dicomsync"


def load(
    orthanc_config: Mapping[str, Any], config_path: str | Path | None = None
) -> SyncConfig | None:
    """Parse the ``DicomSync`` section (None when there is none); ConfigError lists every problem."""
    problems: list[str] = []
    cfg = _parse(orthanc_config, config_base_dir(config_path), problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def validate(orthanc_config: Mapping[str, Any], config_path: str | Path | None = None) -> list[str]:
    """Every problem of the ``DicomSync`` section, as clear sentences (empty: valid).

    Checks structure, place kinds, route destinations, filters and the retry
    policy, without building places (no network, no environment variables), so
    it also runs on configurations meant for other machines (docker-compose).
    """
    problems: list[str] = []
    _parse(orthanc_config, config_base_dir(config_path), problems)
    return problems


def _parse(
    orthanc_config: Mapping[str, Any], base_dir: Path, problems: list[str]
) -> SyncConfig | None:
    section = orthanc_config.get(SECTION)
    if section is None:
        return None
    where = SECTION
    if not isinstance(section, dict):
        problems.append(f"{where} must be a JSON object")
        return None
    warnings = [
        f"{where}: unknown option {k!r} ignored (known: {', '.join(sorted(KNOWN_OPTIONS))})"
        for k in section
        if k not in KNOWN_OPTIONS
    ]

    opts = options.parse(SyncOptions, section, where, problems)

    places: dict[str, dict[str, Any]] = {}
    places_base = base_dir
    try:
        places, places_base = load_sections(opts.places, "Places", base_dir, where)
    except ConfigError as exc:
        problems.append(str(exc))
    for key, place in places.items():
        try:
            PLACES.get(str(place.get("Kind")))
        except DicomSyncError as exc:
            problems.append(f"{where}.Places[{key!r}]: {exc}")
        if credentials := credential_problem("place", key, place):  # /places lists sections
            problems.append(f"{where}.Places[{key!r}]: {credentials}")

    routes = parse_routes([] if opts.routes is None else opts.routes, places, problems)
    profiles = deid.parse_profiles(opts.deidentify, f"{where}.Deidentify", problems)
    deidentify = deid.route_profiles(routes, profiles, where, problems)

    state = opts.state_directory
    state_dir = (
        resolve_path(state, base_dir) if state else default_state_dir(orthanc_config, base_dir)
    )

    # Inline sinks keep their files (the sqlite_index, the ledgers) under StateDirectory;
    # sinks from a dicomsync.json file are relative to that file, as for the CLI.
    sinks: dict[str, dict[str, Any]] = {}
    sinks_base = base_dir if isinstance(opts.sinks, str) else state_dir
    try:
        sinks, sinks_base = load_sections(opts.sinks, "Sinks", sinks_base, where)
    except ConfigError as exc:
        problems.append(str(exc))
    _check_sinks(sinks, places, problems)

    retry = RetryPolicy()
    try:
        retry = RetryPolicy.from_config(opts.retry)
    except ConfigError as exc:
        problems.append(f"{where}.{exc}")

    queue = QueueConfig.parse(opts.queue, f"{where}.Queue", problems)
    return SyncConfig(
        queue=queue,
        places=places,
        places_base=places_base,
        routes=routes,
        state_dir=state_dir,
        retry=retry,
        sinks=sinks,
        sinks_base=sinks_base,
        node_id=opts.node_id or f"{socket.gethostname()}:{state_dir}",
        node_id_given=bool(opts.node_id),
        lease_seconds=opts.lease_seconds,
        poll_interval=opts.poll_interval,
        metrics_interval=opts.metrics_interval,
        sinks_backfill=opts.sinks_backfill,
        enabled=opts.enabled,
        warnings=warnings,
        profiles=profiles,
        deidentify=deidentify,
        dose=dose_levels.check(opts.dose, f"{where}.Dose", problems),
    )


NODE_ID_FILE = "node-id"


def stored_node_id(state_dir: Path, default: str) -> str:
    """The node id kept in ``state_dir/node-id``: written with ``default`` on the first
    start, read back ever after, so the per-node cursors and leases survive a new hostname
    (a recreated container). If the file cannot be written, ``default`` is used."""
    path = Path(state_dir) / NODE_ID_FILE
    try:
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s); node id %r", path, exc.strerror, default)
        return default
    try:
        tmp = path.with_name(f".{NODE_ID_FILE}.tmp")
        tmp.write_text(default + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write %s (%s); node id %r", path, exc.strerror, default)
    return default


def _check_sinks(
    sinks: Mapping[str, Mapping[str, Any]], places: Mapping[str, Any], problems: list[str]
) -> None:
    """Kinds must be known, and a sink may not share its key with a place (both name a
    queue destination)."""
    from dicomsync.sinks.base import SINKS

    for key, sink in sinks.items():
        here = f"{SECTION}.Sinks[{key!r}]"
        try:
            SINKS.get(str(sink.get("Kind")))
        except DicomSyncError as exc:
            problems.append(f"{here}: {exc}")
        if key in places:
            problems.append(f"{here}: a place has the same key; give the sink another name")
        if credentials := credential_problem("sink", key, sink):
            problems.append(f"{here}: {credentials}")
