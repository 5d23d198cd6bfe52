"""PS3.15 Table E.1-1 as data: which action each attribute gets under a set of options.

The rows are in ``table_e1_1.tsv`` beside this module, generated from the standard by
``scripts/gen_deid_table.py`` (never typed in by hand; see ``docs/deid.md``). Each row has
the Basic Profile's action and the action of each option column that names one.

``actions(options)`` resolves the table once per profile: a dict from tag (an ``int``)
to its action, the actions of the repeating groups (``50xx``, ``60xx``) and of private
attributes. Where several chosen options name an action for one attribute, ``K``
(keep) wins over ``C`` (clean), and either over the Basic Profile's action.

Action codes (PS3.15 Table E.1-1a): ``D`` dummy value, ``Z`` zero length (or dummy),
``X`` remove, ``K`` keep, ``C`` clean, ``U`` replace the UID consistently; compound
``Z/D``, ``X/Z``, ``X/D``, ``X/Z/D``, ``X/Z/U*``. Pure and thread-safe.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources

from pydicom.datadict import dictionary_VR

COLUMNS = (
    "retain-safe-private",
    "retain-uids",
    "retain-device-identity",
    "retain-institution-identity",
    "retain-patient-characteristics",
    "retain-longitudinal-full-dates",
    "retain-longitudinal-modified-dates",
    "clean-descriptors",
    "clean-structured-content",
    "clean-graphics",
)
ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
_RANK = {"K": 2, "C": 1}


@dataclass(frozen=True)
class Row:
    tag: str  # 8 hex digits, ``x`` for a repeating-group digit, or ``private``
    name: str
    basic: str
    options: Mapping[str, str]


@functools.cache
def rows() -> tuple[Row, ...]:
    """Every row of Table E.1-1, as generated from the standard."""
    text = resources.files("dicomsync.deid").joinpath("table_e1_1.tsv").read_text("utf-8")
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        tag, name, basic, opts = line.split("\t")
        pairs = dict(p.split("=", 1) for p in opts.split(",") if p)
        out.append(Row(tag, name, basic, pairs))
    return tuple(out)


def release() -> str:
    """The standard's release the table was generated from (``2024b``)."""
    text = resources.files("dicomsync.deid").joinpath("table_e1_1.tsv").read_text("utf-8")
    return text.split()[2]


def action_of(row: Row, options: Collection[str]) -> str:
    """The action of one row under ``options``: the strongest option action, else basic."""
    chosen = [row.options[o] for o in options if o in row.options]
    if not chosen:
        return row.basic
    return max(chosen, key=lambda a: _RANK.get(a, 0))


_TIME_VRS = frozenset({"DA", "DT", "TM"})
_TIMEZONE = "00080201"  # Timezone Offset From UTC: shifting dates leaves it as it is


@functools.cache
def _is_text(tag: str) -> bool:
    """Whether an attribute of the table holds text that cleaning scrubs (not a date, a
    time, a private attribute, a repeating group or a sequence)."""
    if tag == "private" or "x" in tag or tag == _TIMEZONE:
        return False
    try:
        vr = dictionary_VR(int(tag, 16))
    except KeyError:
        return True
    return vr not in _TIME_VRS and vr not in ("SQ", "OB")  # OB: timestamps


def cleans_text(options: Collection[str]) -> bool:
    """Whether a chosen option's column cleans (``C``) a text attribute: then the
    instance's identifying values are read before the walk changes them."""
    chosen = set(options)
    if "clean-structured-content" in chosen:  # SR TEXT items
        return True
    return any(_is_text(row.tag) for row in rows() for o in chosen if row.options.get(o) == "C")


@dataclass(frozen=True)
class Actions:
    """The resolved table of one profile."""

    by_tag: Mapping[int, str]
    groups: tuple[tuple[int, int, int, str], ...]  # (group mask, group, element, action)
    private: str

    def get(self, tag: int) -> str | None:
        action = self.by_tag.get(tag)
        if action is not None:
            return action
        group, element = tag >> 16, tag & 0xFFFF
        for mask, g, e, act in self.groups:
            if group & mask == g and (e < 0 or element == e):
                return act
        return None


def actions(options: Collection[str]) -> Actions:
    by_tag: dict[int, str] = {}
    groups: list[tuple[int, int, int, str]] = []
    private = "X"
    for row in rows():
        act = action_of(row, options)
        if row.tag == "private":
            private = act
        elif "x" in row.tag:  # 50xxxxxx, 60xx3000: the group's low byte repeats
            group = int(row.tag[:4].replace("x", "0"), 16)
            element = -1 if "x" in row.tag[4:] else int(row.tag[4:], 16)
            groups.append((0xFF00, group, element, act))
        else:
            by_tag[int(row.tag, 16)] = act
    return Actions(by_tag, tuple(groups), private)
