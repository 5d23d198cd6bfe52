"""De-identification on the way out: PS3.15 Annex E's Basic Application Level
Confidentiality Profile, with its options, a keyed and repeatable remap, and pseudonyms.

==================  =====================================================================
module              what
==================  =====================================================================
``table``           Table E.1-1 (``table_e1_1.tsv``, generated from the standard by
                    ``scripts/gen_deid_table.py``), resolved per set of options
``options``         the ``Deidentify`` section: named profiles, CID 7050 codes
``keys``            HMAC-SHA256 of the secret: ``2.25.`` UIDs, date offsets, pseudonyms
``pseudonyms``      the durable PatientID map (SQLite), CSV import and export
``pseudonyms_pg``   the same map in the PostgreSQL queue database
``transform``       one instance's bytes in, de-identified bytes out
``values``          dummies per VR, date shifts, the text scrubber, raw VRs and pixel bytes
``place``           ``Deidentified(place, profile)``: the destination wrapper
==================  =====================================================================

``deidentified(place, profile, map_path)`` builds the wrapper; ``docs/deid.md`` says
what is done to each attribute, why the table is generated, and how to protect the
secret and the map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomsync.deid.options import Profile, parse_profiles, profile_named
from dicomsync.deid.pseudonyms import PseudonymMap

__all__ = [
    "Profile",
    "PseudonymMap",
    "deidentified",
    "for_config",
    "parse_profiles",
    "profile_named",
    "route_profiles",
]

CLI_STATE_DIR = "dicomsync-state"
CLI_MAP_FILE = "deid.sqlite"


def route_profiles(
    routes: Any, profiles: dict[str, Profile], where: str, problems: list[str]
) -> dict[str, str]:
    """Destination -> the profile its routes name, checked: the profile exists, and every
    route to one destination names the same one (its jobs are one queue lane, so a
    destination receives either de-identified studies or the originals)."""
    chosen: dict[str, str | None] = {}
    for i, route in enumerate(routes):
        name = route.deidentify
        if name is not None and name not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            problems.append(
                f"{where}.Routes[{i}]: Deidentify names an unknown profile {name!r} "
                f"(DicomSync.Deidentify has: {known})"
            )
        if route.destination in chosen and chosen[route.destination] != name:
            problems.append(
                f"{where}.Routes[{i}]: another route to {route.destination!r} has "
                f"Deidentify {chosen[route.destination]!r}; all routes to one destination "
                "must name the same profile"
            )
        chosen.setdefault(route.destination, name)
    return {dest: name for dest, name in chosen.items() if name}


def for_config(cfg: Any, place: Any, name: str) -> Any:
    """``place`` wrapped by profile ``name`` of ``cfg`` (a ``Config``: ``dicomsync.json``),
    its pseudonym map in ``dicomsync-state/deid.sqlite`` beside the file; the secret is
    checked at once (``ConfigError`` when it is not set, before anything is read)."""
    profile = profile_named(cfg.deid_profiles(), name, f"{cfg.path}: Deidentify")
    wrapped = deidentified(place, profile, cfg.base_dir / CLI_STATE_DIR / CLI_MAP_FILE)
    wrapped.check_environment()
    return wrapped


def deidentified(place: Any, profile: Profile, map_path: Path | None, queue: Any = None) -> Any:
    """``place`` wrapped by ``Deidentified``; the profile's ``PatientIds`` table in the
    SQLite file ``map_path``, or in the PostgreSQL database of ``queue`` (a
    ``dicomsync.queue.config.QueueConfig`` of kind ``postgresql``). No table: keyed-derived
    pseudonyms."""
    from dicomsync.deid.place import Deidentified

    pseudonyms: Any = None
    if profile.patient_ids:
        if queue is not None and getattr(queue, "kind", "") == "postgresql":
            from dicomsync.deid.pseudonyms_pg import PgPseudonymMap

            pseudonyms = PgPseudonymMap(queue.target, profile.patient_ids)
        elif map_path is not None:
            pseudonyms = PseudonymMap(map_path, profile.patient_ids)
    return Deidentified(place, profile, pseudonyms)
