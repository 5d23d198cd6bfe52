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

from dicomsync.tags.simplify import fix_text, utf8_repair_enabled

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# Tags read raw (before pydicom's conversion) so vendor number formats never raise.
_TAG_NUMERIC_VALUE = 0x0040A30A


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


def code_string(item: Dataset) -> str | None:
    """``"<scheme>:<value>"`` of a code sequence item, or None."""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    if value is None or value == "":
        return None
    scheme = item.get("CodingSchemeDesignator") or ""
    return f"{scheme}:{value}"


class Flattener:
    """Flattens one SR dataset. ``repair`` turns the UTF-8-in-Latin-1 repair on."""

    def __init__(self, repair: bool = False) -> None:
        self.repair = repair

    # --- helpers -------------------------------------------------------------------------
    def text(self, value: Any) -> str:
        return fix_text(str(value), self.repair)

    def concept(self, item: Dataset) -> tuple[str | None, str | None]:
        """(meaning, "<scheme>:<value>") of the item's concept name."""
        seq = item.get("ConceptNameCodeSequence")
        if not seq:
            return None, None
        code = seq[0]
        meaning = code.get("CodeMeaning")
        return (self.text(meaning) if meaning is not None else None), code_string(code)

    # --- containers ----------------------------------------------------------------------
    def container(self, items: Iterable[Dataset]) -> dict[str, Any]:
        """Flatten a ContentSequence into one object (see the module docstring)."""
        entries: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for index, item in enumerate(items):
            key, value, siblings = self.item(item, index)
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

    def item(self, item: Dataset, index: int) -> tuple[str, Any, dict[str, Any]]:
        """(key, value, siblings) of one content item; never raises."""
        key = f"@invalid item {index + 1}"
        try:
            meaning, concept_code = self.concept(item)
            value_type = str(item.get("ValueType", "") or "").strip().upper()
            if meaning is not None:
                key = meaning
            elif "ReferencedContentItemIdentifier" in item:
                ref = item.ReferencedContentItemIdentifier
                path = ref if isinstance(ref, MultiValue | list) else [ref]
                return "@reference", ".".join(str(int(p)) for p in path), {}
            else:
                key = f"@unnamed {value_type or 'ITEM'}"
            siblings: dict[str, Any] = {}
            if concept_code is not None:
                siblings["@concept"] = concept_code
            value = self.value(item, value_type, siblings)
            if value_type != "CONTAINER":
                children = item.get("ContentSequence")
                if children:
                    siblings["@children"] = self.container(children)
            return key, value, siblings
        except Exception as exc:
            return key, {"@invalid": _reason(exc)}, {}

    # --- values --------------------------------------------------------------------------
    def value(self, item: Dataset, value_type: str, siblings: dict[str, Any]) -> Any:
        if value_type == "CONTAINER":
            return self.container(item.get("ContentSequence") or [])
        if value_type == "NUM":
            return self.num(item, siblings)
        if value_type == "CODE":
            seq = item.get("ConceptCodeSequence")
            if not seq:
                return None
            code = seq[0]
            sib = code_string(code)
            if sib is not None:
                siblings["@code"] = sib
            meaning = code.get("CodeMeaning")
            return self.text(meaning) if meaning not in (None, "") else None
        if value_type == "TEXT":
            return self._str(item.get("TextValue"))
        if value_type == "PNAME":
            return self._str(item.get("PersonName"))
        if value_type == "DATE":
            return self._str(item.get("Date"))
        if value_type == "TIME":
            return self._str(item.get("Time"))
        if value_type == "DATETIME":
            return self._str(item.get("DateTime"))
        if value_type == "UIDREF":
            return self._str(item.get("UID"))
        if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
            seq = item.get("ReferencedSOPSequence")
            if not seq:
                return None
            ref = seq[0]
            if ref.get("ReferencedSOPClassUID"):
                siblings["@sop_class"] = str(ref.ReferencedSOPClassUID)
            frames = ref.get("ReferencedFrameNumber")
            if frames not in (None, ""):
                siblings["@frames"] = (
                    "\\".join(str(f) for f in frames)
                    if isinstance(frames, MultiValue | list)
                    else str(frames)
                )
            return self._str(ref.get("ReferencedSOPInstanceUID"))
        if value_type in ("SCOORD", "SCOORD3D"):
            if item.get("GraphicType"):
                siblings["@graphic_type"] = str(item.GraphicType)
            data = item.get("GraphicData")
            return _number_list(data)
        if value_type == "TCOORD":
            if item.get("TemporalRangeType"):
                siblings["@range_type"] = str(item.TemporalRangeType)
            for name in ("ReferencedSamplePositions", "ReferencedTimeOffsets"):
                if item.get(name) is not None:
                    return _number_list(item.get(name))
            dt = item.get("ReferencedDateTime")
            if dt is not None:
                return [str(v) for v in (dt if isinstance(dt, MultiValue | list) else [dt])]
            return None
        raise _Invalid(f"unsupported value type {value_type or '(none)'!r}")

    def num(self, item: Dataset, siblings: dict[str, Any]) -> Any:
        qualifier = item.get("NumericValueQualifierCodeSequence")
        if qualifier:
            siblings["@qualifier"] = self._str(qualifier[0].get("CodeMeaning"))
        seq = item.get("MeasuredValueSequence")
        if not seq:
            return None
        mv = seq[0]
        units = mv.get("MeasurementUnitsCodeSequence")
        if units:
            unit = units[0]
            unit_value = unit.get("CodeValue")
            if unit_value not in (None, ""):
                siblings["@unit"] = str(unit_value)
            meaning = unit.get("CodeMeaning")
            if meaning not in (None, "") and str(meaning) != str(unit_value):
                siblings["@unit_meaning"] = self.text(meaning)
            scheme = str(unit.get("CodingSchemeDesignator") or "")
            if scheme and scheme != "UCUM":
                siblings["@unit_scheme"] = scheme
        raw = _raw_text(mv, _TAG_NUMERIC_VALUE)
        if raw is None:
            return None
        parts = raw.split("\\")
        try:
            numbers = [parse_number(p) for p in parts]
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return numbers[0] if len(numbers) == 1 else numbers

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


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """An element's text without pydicom's VR conversion (which rejects vendor numbers)."""
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _number_list(data: Any) -> list[float] | None:
    if data is None:
        return None
    values = data if isinstance(data, MultiValue | list | tuple) else [data]
    return [float(v) for v in values]


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def root_concept(ds: Dataset, repair: bool = False) -> tuple[str | None, str | None]:
    """(meaning, "<scheme>:<value>") of the document's root concept."""
    return Flattener(repair).concept(ds)


def flatten(ds: Dataset, *, repair: bool | None = None) -> dict[str, Any]:
    """``{<root concept meaning>: <flattened content tree>}`` of an SR document."""
    if repair is None:
        repair = utf8_repair_enabled(ds)
    flattener = Flattener(repair)
    meaning, _ = flattener.concept(ds)
    body = flattener.container(ds.get("ContentSequence") or [])
    return {meaning or "@unnamed CONTAINER": body}
