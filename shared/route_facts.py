"""Routes and the facts their filters match: ``Route``, ``RouteOptions``, ``study_facts``.

A route's ``Filter`` maps a key to a glob or a list of globs (only ``*`` is special,
matching is case-sensitive). A study matches a key when any of its values matches
any glob; it matches the route when every key matches. Values come from Orthanc's
index, never from the DICOM files:

- patient and study keys (PatientID, StudyDescription, …): the study's main tags;
- series keys (Modality, SeriesDescription, …): the values of all its series;
- instance keys (SOPClassUID, CallingAet/RemoteAet, CalledAet, Origin,
  TransferSyntax): the metadata of the first instance of each series.

``Route.matches`` is pure and thread-safe (a ``Route`` is frozen). ``study_facts``
makes REST calls through the ``OrthancClient`` it is given (thread-safe as that
client is) and raises what the client raises (``NotFound`` when the study is gone).
The section is parsed, and ``RouteOptions`` checked, in ``dicomsync.routing``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomsync import options
from dicomsync.errors import DicomSyncError, NotFound
from dicomsync.options import option
from dicomsync.orthanc_client import OrthancClient
from dicomsync.places.base import PLACES
from dicomsync.query import glob_to_regex

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
MAX_CONCURRENCY = 64
DEFAULT_CONCURRENCY = 2


@dataclass(frozen=True)
class RouteOptions:
    """The options of one item of ``DicomSync.Routes``."""

    destination: str = option(
        "Destination", "str", "the key of a place that can receive studies", required=True
    )
    filter: Mapping[str, Any] | None = option(
        "Filter",
        "any",
        "`{tag: glob or [globs]}` on index tags (PatientID, StudyDescription, Modality, "
        "SOPClassUID, CallingAet, …); only `*` is special",
        shown="every study",
    )
    concurrency: int = option(
        "Concurrency",
        "int",
        "worker threads for that destination",
        default=DEFAULT_CONCURRENCY,
        low=1,
        high=MAX_CONCURRENCY,
    )
    deidentify: str | None = option(
        "Deidentify",
        "str",
        "a profile of `DicomSync.Deidentify`: studies leave de-identified, made on the way "
        "out (nothing de-identified is stored in Orthanc); every route to that destination "
        "names the same one",
        shown="none",
    )


@dataclass(frozen=True)
class Route:
    destination: str
    filter: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    concurrency: int = DEFAULT_CONCURRENCY
    deidentify: str | None = None  # a profile name (dicomsync.deid)

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
            **({"Deidentify": self.deidentify} if self.deidentify else {}),
        }


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


def is_destination_kind(section: Mapping[str, Any]) -> bool:
    """Whether a place section's kind can receive studies (False for an unknown kind)."""
    try:
        return bool(PLACES.get(str(section.get("Kind"))).is_destination)
    except DicomSyncError:
        return False


def parse_routes(value: Any, places: Mapping[str, Any], problems: list[str]) -> list[Route]:
    """The ``Routes`` list checked against ``places``; each problem is appended to ``problems``."""
    where = "DicomSync.Routes"
    if not isinstance(value, list):
        problems.append(f"{where} must be a list of {{Destination, Filter, Concurrency}}")
        return []
    routes: list[Route] = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{here} must be an object {{Destination, Filter, Concurrency}}")
            continue
        unknown = options.unknown(item, options.names(RouteOptions))
        if unknown:
            problems.append(f"{here}: unknown option(s) {', '.join(unknown)}")
        opts = options.parse(RouteOptions, item, here, problems)
        dest = opts.destination
        if not dest:
            continue
        if dest not in places:
            known = ", ".join(sorted(places)) or "none"
            problems.append(f"{here}: route to a missing destination {dest!r} (places: {known})")
            continue
        if not is_destination_kind(places[dest]):
            problems.append(
                f"{here}: place {dest!r} ({places[dest].get('Kind')}) cannot receive studies"
            )
        filt = parse_filter(opts.filter, here, problems)
        routes.append(Route(dest, filt, opts.concurrency, opts.deidentify))
    return routes


def parse_filter(value: Any, here: str, problems: list[str]) -> dict[str, tuple[str, ...]]:
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
