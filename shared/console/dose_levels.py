"""Dose reference levels: the ``Dose`` options, and which level an event or protocol meets.

Options (the ``Dose`` object of the plugin's ``DicomSync`` section, or the file given to
``dicomsync dose report --levels``)::

    "Dose": {
      "Index": "index",
      "ReferenceLevels": {
        "Head": [50, 75],
        "Chest": [20, 25],
        "Abdomen": [20, 25],
        "Thorax^TAP (Adult)": {"CTDIvol": [20, 25], "DLP": [700, 1000]}
      }
    }

A level is ``[reference, alert]`` in mGy of CTDIvol, or an object with ``CTDIvol``
(mGy) and/or ``DLP`` (mGy·cm) pairs. The defaults are SplunkDoseApp's: head 50/75 mGy,
chest and abdomen 20/25 mGy (CTDIvol). Setting ``ReferenceLevels`` replaces them.

Matching (``Levels.match``): a name equal to the protocol (the acquisition protocol, else
the study description; case and surrounding space ignored) wins; else the first name,
in the order written, found as a whole word in the protocol or the event's
``Target Region`` (``Head`` matches ``Routine Head``, ``HEAD`` and a target region
``Head``, not ``Forehead``). An event above its reference level is an outlier; above the
alert level too, it is marked so.

Pure, immutable, thread-safe. A bad ``Dose`` section raises ``ConfigError`` (one line,
the options' style).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomsync.config import is_finite_number
from dicomsync.errors import ConfigError
from dicomsync.options import option, parse

DEFAULT_LEVELS: dict[str, Any] = {"Head": [50, 75], "Chest": [20, 25], "Abdomen": [20, 25]}


@dataclass(frozen=True)
class DoseOptions:
    """The options of the ``Dose`` section."""

    index: str | None = option(
        "Index",
        "str",
        "the sink the dose page reads (a `sqlite_index` or `postgresql_index`)",
        shown="the first index sink",
    )
    reference_levels: Mapping[str, Any] | None = option(
        "ReferenceLevels",
        "any",
        "`{name: [reference, alert]}` CTDIvol levels in mGy (or `{name: {CTDIvol: [..], "
        "DLP: [..]}}`) per protocol or body region, drawn on the charts; events above are "
        "outliers",
        shown="Head 50/75, Chest 20/25, Abdomen 20/25 mGy",
    )


@dataclass(frozen=True)
class Level:
    """One named level: (reference, alert) per quantity, None when not set."""

    name: str
    ctdivol: tuple[float, float] | None = None
    dlp: tuple[float, float] | None = None

    def of(self, quantity: str) -> tuple[float, float] | None:
        return self.ctdivol if quantity == "ctdivol" else self.dlp


def _pair(value: Any, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(is_finite_number(v) and v >= 0 for v in value)
        or value[0] > value[1]
    ):
        raise ConfigError(
            f"{where} must be [reference, alert]: two numbers >= 0, the reference first"
        )
    return float(value[0]), float(value[1])


def _level(name: str, value: Any, where: str) -> Level:
    if isinstance(value, list):
        return Level(name, ctdivol=_pair(value, where))
    if isinstance(value, dict) and value and set(value) <= {"CTDIvol", "DLP"}:
        return Level(
            name,
            ctdivol=_pair(value["CTDIvol"], f"{where}.CTDIvol") if "CTDIvol" in value else None,
            dlp=_pair(value["DLP"], f"{where}.DLP") if "DLP" in value else None,
        )
    raise ConfigError(
        f'{where} must be [reference, alert] (CTDIvol, mGy) or {{"CTDIvol": [..], "DLP": [..]}}'
    )


class Levels:
    """The reference levels in force; see the module docstring."""

    def __init__(self, levels: Mapping[str, Any] | None = None, where: str = "Dose") -> None:
        given = DEFAULT_LEVELS if levels is None else levels
        if not isinstance(given, Mapping):
            raise ConfigError(f"{where}.ReferenceLevels must be an object of name: levels")
        self.levels: tuple[Level, ...] = tuple(
            _level(str(name).strip(), value, f"{where}.ReferenceLevels[{str(name)[:60]!r}]")
            for name, value in given.items()
            if str(name).strip()
        )
        self._exact = {lv.name.casefold(): lv for lv in self.levels}
        self._words = [
            (re.compile(rf"(?<!\w){re.escape(lv.name)}(?!\w)", re.I), lv) for lv in self.levels
        ]
        self._cache: dict[tuple[str, str], Level | None] = {}

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, where: str = "Dose") -> Levels:
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where} must be a JSON object")
        opts = parse(DoseOptions, section, where)
        return cls(opts.reference_levels, where)

    def match(self, protocol: str, region: str = "") -> Level | None:
        """The level of a protocol (and target region), or None."""
        key = (protocol, region)
        if key not in self._cache:
            found = self._exact.get(protocol.strip().casefold())
            if found is None:
                found = next(
                    (lv for rx, lv in self._words if rx.search(protocol) or rx.search(region)),
                    None,
                )
            if len(self._cache) < 100_000:
                self._cache[key] = found
            return found
        return self._cache[key]


def check(section: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """The ``Dose`` section as given (``{}`` when absent), its problems appended."""
    if section is None:
        return {}
    try:
        Levels.from_section(section, where)
    except ConfigError as exc:
        problems.append(str(exc))
        return {}
    return dict(section)
