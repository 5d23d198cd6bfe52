"""Lossless flattening of a DICOM Structured Report content tree.

The shape is CopyDICOM's, so existing Splunk searches keep working:

- the result is ``{<root concept meaning>: {...}}``, e.g. ``{"X-Ray Radiation Dose Report": {...}}``;
- a CONTAINER becomes an object keyed by its children's concept meanings;
- a concept that occurs more than once in the same container becomes a list, in
  document order (one entry per occurrence);
- NUM becomes a number at its path; CODE becomes the code meaning at its path;
- TEXT, PNAME, DATE, TIME, DATETIME, UIDREF become strings (DICOM text, e.g.
  ``"20130611"``, ``"141455.203"``, ``"19970101000631.737+0000"``);
- IMAGE, COMPOSITE and WAVEFORM become the referenced SOP Instance UID;
- SCOORD/SCOORD3D become the list of graphic data numbers, TCOORD the list of
  referenced positions/offsets/date-times.

What CopyDICOM lost is kept in *sibling keys*: a key ``"<meaning>@<what>"`` next to
the value, in the same object, so the value's own path never moves:

=====================  ===========================================================
``M@concept``          concept name code of M, ``"<scheme>:<value>"`` (``"DCM:113830"``)
``M@unit``             NUM: the unit code value (UCUM, e.g. ``"mGy.cm"``)
``M@unit_meaning``     NUM: the unit code meaning, only when it differs from ``@unit``
                       (e.g. ``"mGycm"``)
``M@unit_scheme``      NUM: the unit coding scheme, only when it is not ``UCUM``
``M@qualifier``        NUM: NumericValueQualifierCodeSequence meaning (why it is empty)
``M@code``             CODE: the value's code, ``"<scheme>:<value>"`` (``"SRT:T-D0010"``)
``M@sop_class``        IMAGE/COMPOSITE/WAVEFORM: the referenced SOP Class UID
``M@frames``           IMAGE: referenced frame numbers, as DICOM text
``M@graphic_type``     SCOORD/SCOORD3D: the graphic type
``M@range_type``       TCOORD: the temporal range type
``M@children``         children of a non-CONTAINER item (e.g. the TID 10013
                       "Device Role in Procedure" code and its device details),
                       flattened like a container
=====================  ===========================================================

A code is written ``"<scheme>:<value>"``; split it on the first ``:`` (coding scheme
designators never contain one). When a concept repeats, its value *and* each of its
sibling keys become lists of the same length, aligned by index (``null`` where an
occurrence has no such sibling).

Lossless rules:

- 0 is kept as 0; an empty value (NUM without MeasuredValueSequence or with an
  empty NumericValue, CODE with a missing or empty ConceptCodeSequence, empty TEXT)
  becomes ``null`` at its path;
- numbers are parsed from the DICOM text, so ``1.6e-005`` and ``1.07E-05`` work;
- a bad item (unknown value type, unparseable number, undecodable element) becomes a
  *placeholder* ``{"@invalid": "<reason>"}`` at its path; the rest of its container is
  kept. An item without a concept name is keyed ``"@unnamed <VALUETYPE>"``; a
  by-reference item is keyed ``"@reference"`` with the referenced item path
  (``"1.3.2"``).
- a content tree nested deeper than ``MAX_DEPTH`` levels: the first item too deep
  becomes ``{"@invalid": "content nested deeper than 24 levels"}`` and its children
  are not read (a hostile file may nest thousands of levels; the walk recurses once
  per level, so it stops there);
- relationship types (CONTAINS, HAS PROPERTIES, ...) are not represented.

Concept meanings are used verbatim (vendor misspellings included); use ``@concept``
when you need the code. Text is repaired when a Latin-1 file holds UTF-8 bytes (see
``dicomsync.tags.simplify.fix_text``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomsync.tags.lite import Reader, reader_for
from dicomsync.tags.simplify import fix_text, utf8_repair_enabled

MAX_DEPTH = 24
"""Deepest content item flattened (the root's children are level 1). Real dose reports
nest 5 levels; 24 keeps every event within ``dicomsync.jsonsafe.MAX_DEPTH`` when parsed
back (each level is at most a list and an object)."""

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# Tags, read by number: plain-ASCII values skip pydicom's slow per-element conversion,
# and NumericValue is read raw so vendor number formats never raise.
T_CODE_VALUE = 0x00080100
T_SCHEME = 0x00080102
T_CODE_MEANING = 0x00080104
T_LONG_CODE_VALUE = 0x00080119
T_URN_CODE_VALUE = 0x00080120
T_VALUE_TYPE = 0x0040A040
T_CONCEPT_NAME = 0x0040A043
T_CONCEPT_CODE = 0x0040A168
T_CONTENT = 0x0040A730
T_TEXT = 0x0040A160
T_PNAME = 0x0040A123
T_DATE = 0x0040A121
T_TIME = 0x0040A122
T_DATETIME = 0x0040A120
T_UID = 0x0040A124
T_MEASURED = 0x0040A300
T_UNITS = 0x004008EA
T_NUMERIC_VALUE = 0x0040A30A
T_QUALIFIER = 0x0040A301
T_REF_SOP = 0x00081199
T_REF_CLASS = 0x00081150
T_REF_INSTANCE = 0x00081155
T_REF_FRAMES = 0x00081160
T_REF_CONTENT_ITEM = 0x0040DB73
T_GRAPHIC_DATA = 0x00700022
T_GRAPHIC_TYPE = 0x00700023
T_RANGE_TYPE = 0x0040A130
T_SAMPLE_POSITIONS = 0x0040A132
T_TIME_OFFSETS = 0x0040A138
T_REF_DATETIME = 0x0040A13A


class _Invalid(Exception):
    """A content item that cannot be represented; becomes a placeholder."""


def parse_number(text: str) -> float | int | None:
    """A DICOM DS string as a number; None for empty; ValueError for garbage."""
    text = text.strip().strip("\x00").strip()
    if not text:
        return None
    if not _NUMBER.match(text):
        raise ValueError(f"not a number: {text[:40]!r}")
    value = float(text)
    return value


_DEFAULT_READER = Reader(None)


def code_string(item: Any, reader: Reader = _DEFAULT_READER) -> str | None:
    """``"<scheme>:<value>"`` of a code sequence item (lite dict or Dataset), or None."""
    value = (
        reader.text(item, T_CODE_VALUE)
        or reader.text(item, T_LONG_CODE_VALUE)
        or reader.text(item, T_URN_CODE_VALUE)
    )
    if not value:
        return None
    scheme = reader.text(item, T_SCHEME) or ""
    return f"{scheme}:{value}"


class Flattener:
    """Flattens one SR dataset. ``repair`` turns the UTF-8-in-Latin-1 repair on."""

    def __init__(self, repair: bool = False, reader: Reader | None = None) -> None:
        self.repair = repair
        self.reader = reader or _DEFAULT_READER

    def seq(self, node: Any, tag: int) -> list[Any] | None:
        return self.reader.seq(node, tag)

    def fast_text(self, node: Any, tag: int) -> str | None:
        return self.reader.text(node, tag)

    def code_string(self, node: Any) -> str | None:
        return code_string(node, self.reader)

    # --- helpers -------------------------------------------------------------------------
    def text(self, value: Any) -> str:
        return fix_text(str(value), self.repair)

    def concept(self, item: Dataset) -> tuple[str | None, str | None]:
        """(meaning, "<scheme>:<value>") of the item's concept name."""
        names = self.seq(item, T_CONCEPT_NAME)
        if not names:
            return None, None
        code = names[0]
        meaning = self.fast_text(code, T_CODE_MEANING)
        return (self.text(meaning) if meaning is not None else None), self.code_string(code)

    # --- containers ----------------------------------------------------------------------
    def container(self, items: Iterable[Dataset], depth: int = 1) -> dict[str, Any]:
        """Flatten a ContentSequence into one object (see the module docstring);
        ``depth`` is the level of its items (1: the root's children)."""
        entries: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for index, item in enumerate(items):
            key, value, siblings = self.item(item, index, depth)
            entries.setdefault(key, []).append((value, siblings))
        out: dict[str, Any] = {}
        for key, occurrences in entries.items():
            if len(occurrences) == 1:
                value, siblings = occurrences[0]
                out[key] = value
                for suffix, sib in siblings.items():
                    out[key + suffix] = sib
                continue
            out[key] = [value for value, _ in occurrences]
            suffixes: list[str] = []
            for _, siblings in occurrences:
                for suffix in siblings:
                    if suffix not in suffixes:
                        suffixes.append(suffix)
            for suffix in suffixes:
                out[key + suffix] = [siblings.get(suffix) for _, siblings in occurrences]
        return out

    def item(self, item: Dataset, index: int, depth: int = 1) -> tuple[str, Any, dict[str, Any]]:
        """(key, value, siblings) of one content item at level ``depth``; never raises."""
        key = f"@invalid item {index + 1}"
        try:
            meaning, concept_code = self.concept(item)
            if depth > MAX_DEPTH:
                if meaning is not None:
                    key = meaning
                raise _Invalid(f"content nested deeper than {MAX_DEPTH} levels")
            value_type = (self.fast_text(item, T_VALUE_TYPE) or "").strip().upper()
            if meaning is not None:
                key = meaning
            elif self.reader.has(item, T_REF_CONTENT_ITEM):
                return "@reference", self._ref_path(item), {}
            else:
                key = f"@unnamed {value_type or 'ITEM'}"
            siblings: dict[str, Any] = {}
            if concept_code is not None:
                siblings["@concept"] = concept_code
            value = self.value(item, value_type, siblings, depth)
            if value_type != "CONTAINER":
                children = self.seq(item, T_CONTENT)
                if children:
                    siblings["@children"] = self.container(children, depth + 1)
            return key, value, siblings
        except Exception as exc:
            return key, {"@invalid": _reason(exc)}, {}

    # --- values --------------------------------------------------------------------------
    def value(
        self, item: Dataset, value_type: str, siblings: dict[str, Any], depth: int = 1
    ) -> Any:
        if value_type == "CONTAINER":
            return self.container(self.seq(item, T_CONTENT) or [], depth + 1)
        if value_type == "NUM":
            return self.num(item, siblings)
        if value_type == "CODE":
            codes = self.seq(item, T_CONCEPT_CODE)
            if not codes:
                return None
            code = codes[0]
            sib = self.code_string(code)
            if sib is not None:
                siblings["@code"] = sib
            return self._str(self.fast_text(code, T_CODE_MEANING))
        if value_type == "TEXT":
            return self._str(self.fast_text(item, T_TEXT))
        if value_type == "PNAME":
            return self._str(self.fast_text(item, T_PNAME))
        if value_type == "DATE":
            return self._str(self.fast_text(item, T_DATE))
        if value_type == "TIME":
            return self._str(self.fast_text(item, T_TIME))
        if value_type == "DATETIME":
            return self._str(self.fast_text(item, T_DATETIME))
        if value_type == "UIDREF":
            return self._str(self.fast_text(item, T_UID))
        if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
            refs = self.seq(item, T_REF_SOP)
            if not refs:
                return None
            ref = refs[0]
            sop_class = self.fast_text(ref, T_REF_CLASS)
            if sop_class:
                siblings["@sop_class"] = sop_class
            frames = self.fast_text(ref, T_REF_FRAMES)
            if frames:
                siblings["@frames"] = frames
            return self._str(self.fast_text(ref, T_REF_INSTANCE))
        if value_type in ("SCOORD", "SCOORD3D"):
            graphic_type = self.fast_text(item, T_GRAPHIC_TYPE)
            if graphic_type:
                siblings["@graphic_type"] = graphic_type
            return self.reader.numbers(item, T_GRAPHIC_DATA, "f")
        if value_type == "TCOORD":
            range_type = self.fast_text(item, T_RANGE_TYPE)
            if range_type:
                siblings["@range_type"] = range_type
            positions = self.reader.numbers(item, T_SAMPLE_POSITIONS, "I")
            if positions is not None:
                return positions
            for tag in (T_TIME_OFFSETS, T_REF_DATETIME):
                text = self.fast_text(item, tag)
                if text is not None:
                    parts = text.split("\\")
                    if tag == T_TIME_OFFSETS:
                        return [parse_number(p) for p in parts]
                    return parts
            return None
        raise _Invalid(f"unsupported value type {value_type or '(none)'!r}")

    def num(self, item: Dataset, siblings: dict[str, Any]) -> Any:
        qualifier = self.seq(item, T_QUALIFIER)
        if qualifier:
            siblings["@qualifier"] = self._str(self.fast_text(qualifier[0], T_CODE_MEANING))
        measured = self.seq(item, T_MEASURED)
        if not measured:
            return None
        mv = measured[0]
        units = self.seq(mv, T_UNITS)
        if units:
            unit = units[0]
            unit_value = self.fast_text(unit, T_CODE_VALUE)
            if unit_value:
                siblings["@unit"] = unit_value
            meaning = self.fast_text(unit, T_CODE_MEANING)
            if meaning and meaning != unit_value:
                siblings["@unit_meaning"] = self.text(meaning)
            scheme = self.fast_text(unit, T_SCHEME) or ""
            if scheme and scheme != "UCUM":
                siblings["@unit_scheme"] = scheme
        raw_value = self.reader.raw(mv, T_NUMERIC_VALUE)
        if raw_value is None:
            return None
        raw = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        if raw is None:
            return None
        parts = raw.split("\\")
        try:
            numbers = [parse_number(p) for p in parts]
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return numbers[0] if len(numbers) == 1 else numbers

    def _ref_path(self, item: Any) -> str:
        """ReferencedContentItemIdentifier (UL, VM 1-n) as ``"1.3.2"``."""
        values = self.reader.numbers(item, T_REF_CONTENT_ITEM, "I") or []
        return ".".join(str(int(v)) for v in values)

    def _str(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, MultiValue | list):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        if text == "":
            return None
        return fix_text(text, self.repair)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def root_concept(ds: Dataset, repair: bool = False) -> tuple[str | None, str | None]:
    """(meaning, "<scheme>:<value>") of the document's root concept."""
    return Flattener(repair, reader_for(ds)).concept(ds)


def flatten(
    ds: Dataset, *, repair: bool | None = None, flattener: Flattener | None = None
) -> dict[str, Any]:
    """``{<root concept meaning>: <flattened content tree>}`` of an SR document."""
    if flattener is None:
        if repair is None:
            repair = utf8_repair_enabled(ds)
        flattener = Flattener(repair, reader_for(ds))
    meaning, _ = flattener.concept(ds)
    body = flattener.container(flattener.seq(ds, T_CONTENT) or [])
    return {meaning or "@unnamed CONTAINER": body}
