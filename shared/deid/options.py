"""The ``Deidentify`` section: named profiles, declared once with ``dicomsync.options``.

::

    "Deidentify": {
      "research": {"Profile": "basic",
                   "Options": ["retain-longitudinal-modified-dates", "retain-device-identity"],
                   "SecretEnv": "DEID_SECRET", "PatientIds": "pseudonyms",
                   "Keep": ["StudyDescription"], "Remove": []}
    }

The same section goes in ``dicomsync.json`` (the CLI's ``--deidentify PROFILE``) and in
Orthanc's ``DicomSync`` section (a route's ``"Deidentify": "PROFILE"``). ``parse_profiles``
checks it and returns ``Profile`` objects; pure (the secret is read later, from the
environment, by ``Profile.secret``), thread-safe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomsync import options
from dicomsync.deid.table import COLUMNS
from dicomsync.errors import ConfigError
from dicomsync.options import option

SECTION = "Deidentify"
PROFILES = ("basic",)
# The options a profile may name: Table E.1-1's columns (clean-graphics is not offered:
# overlays and graphics are removed, as the Basic Profile says), and one of our own.
OPTIONS = tuple(c for c in COLUMNS if c != "clean-graphics")
ALLOW_BURNED_IN = "allow-burned-in"
# PS3.16 CID 7050 "De-identification Method": code -> meaning.
CID_7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean-structured-content": ("113104", "Clean Structured Content Option"),
    "clean-descriptors": ("113105", "Clean Descriptors Option"),
    "retain-longitudinal-full-dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain-longitudinal-modified-dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain-patient-characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain-device-identity": ("113109", "Retain Device Identity Option"),
    "retain-uids": ("113110", "Retain UIDs Option"),
    "retain-safe-private": ("113111", "Retain Safe Private Option"),
    "retain-institution-identity": ("113112", "Retain Institution Identity Option"),
}
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class ProfileOptions:
    """The options of one named profile of the ``Deidentify`` section."""

    profile: str = option("Profile", "str", "the PS3.15 profile: `basic`", default="basic")
    options: Sequence[str] | None = option(
        "Options",
        "any",
        "PS3.15 options by name (`retain-uids`, `retain-device-identity`, "
        "`retain-institution-identity`, `retain-patient-characteristics`, "
        "`retain-longitudinal-full-dates`, `retain-longitudinal-modified-dates`, "
        "`retain-safe-private`, `clean-descriptors`, `clean-structured-content`), and "
        "`allow-burned-in`",
        shown="`[]`",
    )
    secret_env: str = option(
        "SecretEnv",
        "envvar",
        "the environment variable holding the HMAC secret of the UIDs, dates and pseudonyms",
        required=True,
    )
    patient_ids: str | None = option(
        "PatientIds",
        "str",
        "a table of original -> pseudonym PatientIDs (in the queue's database; for the CLI "
        "in `dicomsync-state/deid.sqlite` beside `dicomsync.json`)",
        shown="none: keyed-derived pseudonyms",
    )
    keep: Sequence[str] | None = option(
        "Keep", "any", "attribute keywords kept as they are", shown="`[]`"
    )
    remove: Sequence[str] | None = option(
        "Remove", "any", "attribute keywords removed as well", shown="`[]`"
    )


@dataclass(frozen=True)
class Profile:
    """A checked profile: its name, PS3.15 options, secret variable, map table, overrides."""

    name: str
    options: frozenset[str]
    secret_env: str
    patient_ids: str | None = None
    keep: frozenset[int] = frozenset()
    remove: frozenset[int] = frozenset()
    allow_burned_in: bool = False

    def secret(self) -> bytes:
        """The secret from the environment; ``ConfigError`` (naming only the variable) if unset."""
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(
                f"de-identification profile {self.name!r}: the environment variable "
                f"{self.secret_env} (its secret) is not set; nothing was sent"
            )
        return value.encode("utf-8")

    def method(self) -> str:
        chosen = [o for o in OPTIONS if o in self.options]
        return "dicomsync PS3.15 basic profile" + "".join(f"; {o}" for o in chosen)

    def codes(self) -> list[tuple[str, str]]:
        return [CID_7050["basic"]] + [CID_7050[o] for o in OPTIONS if o in self.options]


# Always replaced: the pseudonym (a PatientIds map chooses it), and the instance's own UIDs,
# which the destination is asked about for duplicate avoidance.
PSEUDONYMISED = frozenset({0x00100010, 0x00100020})  # PatientName, PatientID
IDENTITY_UIDS = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E})


def _fixed(tags: frozenset[int], kept: bool, here: str, problems: list[str]) -> None:
    """Keep/Remove entries that would break the pseudonym or duplicate avoidance: one
    problem line each, pointing to what does it instead."""
    how = "kept" if kept else "removed"
    uids = sorted(
        keyword_for_tag(t)
        for t in tags
        if (dictionary_VR(t) == "UI" if kept else t in IDENTITY_UIDS)
    )
    if uids:
        problems.append(
            f"{here}: {', '.join(uids)} cannot be {how}: UIDs are remapped so that a re-send "
            "is found as a duplicate (the 'retain-uids' option keeps every UID)"
        )
    patient = sorted(keyword_for_tag(t) for t in tags & PSEUDONYMISED)
    if patient:
        problems.append(
            f"{here}: {', '.join(patient)} cannot be {how}: the patient's ID and name always "
            "get the pseudonym (a PatientIds map chooses it)"
        )


def _keywords(value: Any, here: str, problems: list[str]) -> frozenset[int]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{here} must be a list of attribute keywords")
        return frozenset()
    tags = set()
    for keyword in value:
        tag = tag_for_keyword(keyword)
        if tag is None:
            problems.append(f"{here}: {keyword!r} is not a DICOM attribute keyword")
        else:
            tags.add(int(tag))
    return frozenset(tags)


def parse_profile(name: str, section: Any, where: str, problems: list[str]) -> Profile | None:
    here = f"{where}[{name!r}]"
    if not isinstance(section, dict):
        problems.append(f"{here} must be an object")
        return None
    unknown = options.unknown(section, options.names(ProfileOptions))
    if unknown:
        problems.append(f"{here}: unknown option(s) {', '.join(unknown)}")
    opts = options.parse(ProfileOptions, section, here, problems)
    if opts.profile not in PROFILES:
        problems.append(f"{here}: Profile must be one of {', '.join(PROFILES)}")
    chosen = opts.options or []
    if not isinstance(chosen, list) or not all(isinstance(o, str) for o in chosen):
        problems.append(f"{here}.Options must be a list of option names")
        chosen = []
    for o in chosen:
        if o not in OPTIONS and o != ALLOW_BURNED_IN:
            problems.append(
                f"{here}.Options: unknown option {o!r} (known: {', '.join(OPTIONS)}, "
                f"{ALLOW_BURNED_IN})"
            )
    full, modified = "retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"
    if full in chosen and modified in chosen:
        problems.append(f"{here}.Options: {full} and {modified} exclude each other")
    if opts.patient_ids is not None and not _TABLE_NAME.fullmatch(opts.patient_ids):
        problems.append(f"{here}: PatientIds must be a table name (letters, digits, _)")
    keep = _keywords(opts.keep, f"{here}.Keep", problems)
    remove = _keywords(opts.remove, f"{here}.Remove", problems)
    _fixed(keep, True, f"{here}.Keep", problems)
    _fixed(remove, False, f"{here}.Remove", problems)
    return Profile(
        name=name,
        options=frozenset(o for o in chosen if o in OPTIONS),
        secret_env=opts.secret_env or "",
        patient_ids=opts.patient_ids,
        keep=keep,
        remove=remove,
        allow_burned_in=ALLOW_BURNED_IN in chosen,
    )


def parse_profiles(
    value: Any, where: str = SECTION, problems: list[str] | None = None
) -> dict[str, Profile]:
    """The ``Deidentify`` section checked; ``ConfigError`` listing every problem, unless
    ``problems`` is given (then they are appended)."""
    mine: list[str] = []
    out: dict[str, Profile] = {}
    if value is None:
        return out
    if not isinstance(value, dict):
        mine.append(f"{where} must be an object of profile name -> settings")
    else:
        for name, section in value.items():
            profile = parse_profile(str(name), section, where, mine)
            if profile is not None:
                out[str(name)] = profile
    if problems is not None:
        problems.extend(mine)
    elif mine:
        raise ConfigError("; ".join(mine))
    return out


def profile_named(profiles: Mapping[str, Profile], name: str, where: str = SECTION) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(
            f"unknown de-identification profile {name!r} in {where} (configured: {known})"
        ) from None
