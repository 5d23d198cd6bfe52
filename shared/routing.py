"""The ``DicomSync`` section of Orthanc's configuration, route filters, and the route job handler.

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

A route's ``Filter`` maps a key to a glob or a list of globs (only ``*`` is special,
matching is case-sensitive). A study matches a key when any of its values matches
any glob; it matches the route when every key matches. Values come from Orthanc's
index, never from the DICOM files:

- patient and study keys (PatientID, StudyDescription, …): the study's main tags;
- series keys (Modality, SeriesDescription, …): the values of all its series;
- instance keys (SOPClassUID, CallingAet/RemoteAet, CalledAet, Origin,
  TransferSyntax): the metadata of the first instance of each series.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomsync.config import build_place, is_finite_number, load_sections, resolve_path
from dicomsync.errors import (
    ConfigError,
    DicomSyncError,
    NotFound,
    TransferError,
    UnknownPlaceError,
)
from dicomsync.header_cache import HeaderCache, default_cache_dir
from dicomsync.orthanc_client import OrthancClient
from dicomsync.places.base import PLACES, Place
from dicomsync.places.local import RootPlace
from dicomsync.query import glob_to_regex
from dicomsync.queue.base import Job, RetryPolicy
from dicomsync.urls import credential_problem
from dicomsync.worker import Delivered, Lane

log = logging.getLogger(__name__)

SECTION = "DicomSync"
_CACHE_LOCK = threading.Lock()

PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "OtherPatientIDs")
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "RequestingPhysician",
    "RequestedProcedureDescription",
)
SERIES_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "BodyPartExamined",
    "Manufacturer",
    "StationName",
    "ProtocolName",
    "OperatorsName",
    "PerformedProcedureStepDescription",
    "SequenceName",
)
# filter key -> Orthanc instance metadata name
INSTANCE_KEYS = {
    "SOPClassUID": "SopClassUid",
    "CallingAet": "RemoteAET",
    "RemoteAet": "RemoteAET",
    "CalledAet": "CalledAET",
    "Origin": "Origin",
    "TransferSyntax": "TransferSyntax",
}
FILTER_KEYS = (*PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS, *INSTANCE_KEYS)
KNOWN_OPTIONS = {
    "Places",
    "Sinks",
    "SinksBackfill",
    "Routes",
    "StateDirectory",
    "Retry",
    "NodeId",
    "LeaseSeconds",
    "PollInterval",
    "MetricsInterval",
    "Enabled",
}
MAX_CONCURRENCY = 64
DEFAULT_CONCURRENCY = 2


@dataclass(frozen=True)
class Route:
    destination: str
    filter: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    concurrency: int = DEFAULT_CONCURRENCY

    def matches(self, facts: Mapping[str, Collection[str]]) -> bool:
        for key, globs in self.filter.items():
            values = facts.get(key, ())
            if not any(glob_to_regex(g).match(v) for g in globs for v in values):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "Destination": self.destination,
            "Filter": {k: list(v) for k, v in self.filter.items()},
            "Concurrency": self.concurrency,
        }


@dataclass
class SyncConfig:
    """The parsed ``DicomSync`` section."""

    places: dict[str, dict[str, Any]]
    places_base: Path
    routes: list[Route]
    state_dir: Path
    retry: RetryPolicy
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    sinks_base: Path = Path(".")
    node_id: str = ""
    lease_seconds: float = 300.0
    poll_interval: float = 5.0
    metrics_interval: float = 5.0
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _header_cache: HeaderCache | None = field(default=None, repr=False, compare=False)

    @property
    def filter_keys(self) -> set[str]:
        return {k for r in self.routes for k in r.filter}

    def destinations(self) -> list[str]:
        """Places that can receive: every route destination, then other destination kinds."""
        out = list(dict.fromkeys(r.destination for r in self.routes))
        for key, section in self.places.items():
            if key not in out and _is_destination_kind(section):
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


def _is_destination_kind(section: Mapping[str, Any]) -> bool:
    try:
        return bool(PLACES.get(str(section.get("Kind"))).is_destination)
    except DicomSyncError:
        return False


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

    places: dict[str, dict[str, Any]] = {}
    places_base = base_dir
    try:
        places, places_base = load_sections(section.get("Places"), "Places", base_dir, where)
    except ConfigError as exc:
        problems.append(str(exc))
    for key, place in places.items():
        try:
            PLACES.get(str(place.get("Kind")))
        except DicomSyncError as exc:
            problems.append(f"{where}.Places[{key!r}]: {exc}")
        if credentials := credential_problem("place", key, place):  # /places lists sections
            problems.append(f"{where}.Places[{key!r}]: {credentials}")

    routes = _parse_routes(section.get("Routes", []), places, problems)

    state = section.get("StateDirectory")
    if state is not None and (not isinstance(state, str) or not state):
        problems.append(f"{where}.StateDirectory must be a non-empty string (a folder)")
        state = None
    state_dir = (
        resolve_path(state, base_dir) if state else default_state_dir(orthanc_config, base_dir)
    )

    # Inline sinks keep their files (the sqlite_index, the ledgers) under StateDirectory;
    # sinks from a dicomsync.json file are relative to that file, as for the CLI.
    sinks: dict[str, dict[str, Any]] = {}
    sinks_value = section.get("Sinks")
    sinks_base = base_dir if isinstance(sinks_value, str) else state_dir
    try:
        sinks, sinks_base = load_sections(sinks_value, "Sinks", sinks_base, where)
    except ConfigError as exc:
        problems.append(str(exc))
    _check_sinks(sinks, places, problems)

    retry = RetryPolicy()
    try:
        retry = RetryPolicy.from_config(section.get("Retry"))
    except ConfigError as exc:
        problems.append(f"{where}.{exc}")

    numbers: dict[str, float] = {}
    for name, default in (("LeaseSeconds", 300.0), ("PollInterval", 5.0), ("MetricsInterval", 5.0)):
        value = section.get(name, default)
        if not is_finite_number(value) or value <= 0:
            problems.append(f"{where}.{name} must be a positive number of seconds")
            value = default
        numbers[name] = float(value)

    if not isinstance(section.get("SinksBackfill", True), bool):
        problems.append(f"{where}.SinksBackfill must be true or false")

    node_id = section.get("NodeId") or f"{socket.gethostname()}:{state_dir}"
    return SyncConfig(
        places=places,
        places_base=places_base,
        routes=routes,
        state_dir=state_dir,
        retry=retry,
        sinks=sinks,
        sinks_base=sinks_base,
        node_id=str(node_id),
        lease_seconds=numbers["LeaseSeconds"],
        poll_interval=numbers["PollInterval"],
        metrics_interval=numbers["MetricsInterval"],
        raw=dict(section),
        warnings=warnings,
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


def _parse_routes(value: Any, places: Mapping[str, Any], problems: list[str]) -> list[Route]:
    where = f"{SECTION}.Routes"
    if not isinstance(value, list):
        problems.append(f"{where} must be a list of {{Destination, Filter, Concurrency}}")
        return []
    routes: list[Route] = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{here} must be an object {{Destination, Filter, Concurrency}}")
            continue
        unknown = set(item) - {"Destination", "Filter", "Concurrency"}
        if unknown:
            problems.append(f"{here}: unknown option(s) {', '.join(sorted(unknown))}")
        dest = item.get("Destination")
        if not isinstance(dest, str) or not dest:
            problems.append(f'{here}: "Destination" (a place key) is required')
            continue
        if dest not in places:
            known = ", ".join(sorted(places)) or "none"
            problems.append(f"{here}: route to a missing destination {dest!r} (places: {known})")
            continue
        if not _is_destination_kind(places[dest]):
            problems.append(
                f"{here}: place {dest!r} ({places[dest].get('Kind')}) cannot receive studies"
            )
        concurrency = item.get("Concurrency", DEFAULT_CONCURRENCY)
        if (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not (1 <= concurrency <= MAX_CONCURRENCY)
        ):
            problems.append(f"{here}: Concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
            concurrency = DEFAULT_CONCURRENCY
        filt = _parse_filter(item.get("Filter", {}), here, problems)
        routes.append(Route(dest, filt, concurrency))
    return routes


def _parse_filter(value: Any, here: str, problems: list[str]) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{here}.Filter must be an object of tag -> glob or list of globs")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for key, globs in value.items():
        if key not in FILTER_KEYS:
            problems.append(f"{here}.Filter: unknown key {key!r} (known: {', '.join(FILTER_KEYS)})")
            continue
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) for g in globs):
            problems.append(f"{here}.Filter[{key!r}] must be a glob or a non-empty list of globs")
            continue
        out[key] = tuple(globs)
    return out


# --- facts about a study, from Orthanc's index --------------------------------------------


def study_facts(client: OrthancClient, study_id: str, keys: Collection[str]) -> dict[str, set[str]]:
    """The values of ``keys`` for one study, with as few REST calls as the keys need.

    Study and patient keys: one call. Series keys: one more. Instance keys: one
    metadata call per series (its first instance). Raises ``NotFound`` if the
    study is gone.
    """
    facts: dict[str, set[str]] = {}
    keys = set(keys)
    if not keys:
        return facts
    if keys & set(PATIENT_KEYS + STUDY_KEYS):
        study = client.study(study_id)
        tags = {**study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})}
        for key in keys & set(PATIENT_KEYS + STUDY_KEYS):
            facts[key] = {str(tags[key])} if key in tags else set()
    if keys & (set(SERIES_KEYS) | set(INSTANCE_KEYS)):
        series = client.get_json(f"/studies/{study_id}/series")
        for key in keys & set(SERIES_KEYS):
            facts[key] = {
                str(s["MainDicomTags"][key]) for s in series if key in s.get("MainDicomTags", {})
            }
        wanted = keys & set(INSTANCE_KEYS)
        if wanted:
            for key in wanted:
                facts[key] = set()
            for s in series:
                if not s.get("Instances"):
                    continue
                try:
                    meta = client.get_json(f"/instances/{s['Instances'][0]}/metadata?expand")
                except NotFound:
                    continue
                for key in wanted:
                    value = meta.get(INSTANCE_KEYS[key])
                    if value is not None:
                        facts[key].add(str(value))
    return facts


# --- the route job handler -----------------------------------------------------------------


class RouteHandler:
    """Handles ``study`` jobs: send Orthanc study ``job.resource`` to place ``job.destination``.

    ``source_factory`` builds the local Orthanc place (in the plugin, an
    ``OrthancPlace`` over the in-process transport); ``dest_factory`` builds a
    destination place by key. Each worker thread gets its own place objects (their
    keep-alive sessions and upload threads are reused job after job); those of a thread
    that ended are closed when another thread first asks, so the handler holds at most
    (threads alive + 1) x 2 places. Caches inside a place are bounded by the place.
    ``send_study`` diffs identities, so only missing instances travel, and verifies
    that the destination holds every SOP UID before the job counts as done. Each job
    is its own batch: ``dest.prepare`` runs before every send, so a place that caches
    a listing per batch (XNAT) never answers from a stale one.
    """

    def __init__(
        self,
        source_factory: Callable[[], Any],
        dest_factory: Callable[[str], Place],
    ) -> None:
        self._source_factory = source_factory
        self._dest_factory = dest_factory
        # thread -> its places; the places of threads that ended are closed and dropped
        self._by_thread: dict[threading.Thread, dict[str, Place]] = {}
        self._lock = threading.Lock()

    def _place(self, key: str, factory: Callable[[], Place]) -> Place:
        me = threading.current_thread()
        with self._lock:
            places = self._by_thread.get(me)
            ended: list[Place] = []
            if places is None:
                for thread in [t for t in self._by_thread if not t.is_alive()]:
                    ended.extend(self._by_thread.pop(thread).values())
                places = self._by_thread[me] = {}
        _close_all(ended)
        place = places.get(key)
        if place is None:
            place = places[key] = factory()
        return place

    def held(self) -> int:
        """How many place objects the handler holds (for the tests of its bound)."""
        with self._lock:
            return sum(len(p) for p in self._by_thread.values())

    def source(self) -> Any:
        return self._place("\0source", self._source_factory)

    def __call__(self, job: Job) -> Delivered:
        from dicomsync.transfer import send_study

        source = self.source()
        dest = self._place(job.destination, lambda: self._dest_factory(job.destination))
        ref = source.ref_by_id(job.resource)
        identity = source.identity(ref)
        # A job is a batch of one: places that list once per batch (XNAT) list again now,
        # instead of answering from a listing an earlier job of this thread made.
        dest.prepare([(ref.key, identity)])
        outcome = send_study(source, ref, dest, identity=identity)
        if outcome.status in ("sent", "duplicate", "empty"):
            fingerprint = outcome.fingerprint or ""
            return Delivered(fingerprint, outcome.sent)
        error = TransferError(
            outcome.error or f"{ref}: send to {job.destination} failed",
            retryable=outcome.retryable,
        )
        error.delivered = outcome.sent  # type: ignore[attr-defined]  # see worker.delivered_by
        raise error

    def close(self) -> None:
        with self._lock:
            places = [p for ps in self._by_thread.values() for p in ps.values()]
            self._by_thread.clear()
        _close_all(places)


def _close_all(places: Collection[Place]) -> None:
    for place in places:
        try:
            place.close()
        except Exception as exc:  # closing must never stop a shutdown
            log.debug("closing %r: %s", place, exc)
