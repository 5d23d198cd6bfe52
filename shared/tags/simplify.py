"""Orthanc-style "simplified" tags from a pydicom Dataset.

``simplify(ds)`` returns ``{keyword: value}`` like Orthanc's ``/instances/{id}/simplified-tags``:

- the key is the DICOM keyword (``PatientName``); tags without a keyword (private
  tags, unknown tags) use the lowercase ``gggg,eeee`` form Orthanc uses;
- every value is a string, as in Orthanc: numbers keep their DICOM text (``"5.0"``),
  multi-valued elements are joined with ``\\``, PN/DA/TM/DT are their DICOM strings,
  an empty element is ``""``;
- sequences are lists of objects, recursively, down to ``MAX_DEPTH`` levels: a
  sequence nested deeper becomes the placeholder ``{"@invalid": "sequence nested
  deeper than 24 levels"}`` (a hostile file may nest thousands of levels, and the
  walk recurses once per level);
- binary elements (OB, OW, OF, OD, OL, OV, UN, and PixelData) are left out;
- the file meta group (0002) is not part of the dataset, so it is not included;
- a value that cannot be decoded becomes ``null`` instead of failing the instance.

Text fix-up: when a file declares Latin-1 (``ISO_IR 100``) or declares nothing but
its bytes are valid UTF-8 (a common vendor bug, e.g. the Siemens TAP-SS report),
text values are re-decoded as UTF-8 (``fix_text``). Values that are not valid UTF-8
are left as pydicom decoded them.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Declarations under which UTF-8 bytes are a known vendor mistake worth repairing.
_LATIN1_DECLARATIONS = frozenset({"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 100"})


# VRs whose raw bytes are text: plain-ASCII values are decoded directly (fast path).
STRING_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)
_KEEP_LEADING = frozenset({"LT", "ST", "UT", "UR"})
_ABSENT = object()

MAX_DEPTH = 24
"""Deepest sequence simplified (a top-level sequence is level 1); real files nest 6.
Each level is a list and an object, so an event stays within ``jsonsafe.MAX_DEPTH``."""


def _raw_vr(elem: RawDataElement) -> str | None:
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return None


def fast_text(ds: Dataset, tag: int) -> str | None:
    """The text of a string element, or None when absent.

    Plain-ASCII raw values are decoded without pydicom's per-element conversion
    (about 20x faster; flattening is dominated by it). Anything else (non-ASCII,
    ISO 2022 escapes, binary VRs, already converted elements) goes through pydicom,
    and multi-valued results are joined with ``\\``.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if raw is None:
            return ""
        if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw:
            vr = _raw_vr(elem)
            if vr in STRING_VRS:
                text = raw.decode("ascii").rstrip(" \x00")
                return text if vr in _KEEP_LEADING else text.lstrip(" ")
    return element_text(ds, tag)


def element_text(ds: Dataset, tag: int) -> str:
    """A present element's converted value as text, multiple values joined with ``\\``."""
    value = ds[tag].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def utf8_repair_enabled(ds: Dataset) -> bool:
    """True when the dataset's declared charset makes the UTF-8 repair safe to try."""
    value = ds.get("SpecificCharacterSet", "")
    if isinstance(value, MultiValue | list):
        declared = [str(v).strip() for v in value]
        return all(v in _LATIN1_DECLARATIONS for v in declared)
    return str(value or "").strip() in _LATIN1_DECLARATIONS


def fix_text(text: str, repair: bool) -> str:
    """Undo UTF-8-read-as-Latin-1 mojibake ("testÃ¦" -> "testæ") when ``repair`` is on."""
    if not repair or text.isascii():
        return text
    try:
        fixed = text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text
    return fixed


def _key_of(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    if keyword:
        return keyword
    return f"{tag >> 16:04x},{tag & 0xFFFF:04x}"


def element_key(elem: DataElement) -> str:
    keyword = elem.keyword
    if keyword:
        return keyword
    tag = elem.tag
    return f"{tag.group:04x},{tag.element:04x}"


def _scalar(value: Any, vr: str, repair: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, BaseTag):
        return f"{value.group:04x},{value.element:04x}"
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    text = str(value)
    return fix_text(text, repair) if vr in TEXT_VRS else text


def element_value(elem: DataElement, repair: bool) -> str | None:
    """The Orthanc-style string of one non-sequence element; None if undecodable."""
    value = elem.value
    vr = elem.VR
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_scalar(v, vr, repair) for v in value)
    return _scalar(value, vr, repair)


def simplify(
    ds: Dataset,
    *,
    repair: bool | None = None,
    skip: frozenset[int] = frozenset(),
    depth: int = 0,
) -> dict[str, Any]:
    """The simplified tags of ``ds`` (see the module docstring); ``skip``: top-level tags to
    omit; ``depth``: how many sequences ``ds`` is nested in (0 for an instance)."""
    if repair is None:
        repair = utf8_repair_enabled(ds)
    out: dict[str, Any] = {}
    for tag in ds.keys():
        if tag.group == 0x0002 or tag == 0x7FE00010 or tag in skip:
            continue
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and isinstance(raw.value, bytes)
            and raw.value.isascii()
            and b"\x1b" not in raw.value
        ):
            vr0 = _raw_vr(raw)
            if vr0 in STRING_VRS:
                text = raw.value.decode("ascii").rstrip(" \x00")
                if vr0 not in _KEEP_LEADING:
                    text = text.lstrip(" ")
                if vr0 in ("LO", "SH", "PN", "CS", "DS", "IS", "UI", "AE", "DA", "TM", "DT"):
                    text = "\\".join(v.strip(" ") for v in text.split("\\"))
                out[_key_of(tag)] = text
                continue
        try:
            elem = ds[tag]
        except Exception as exc:  # corrupt raw element: keep the key, mark the value
            log.debug("cannot decode %s: %s", tag, exc)
            out[f"{tag.group:04x},{tag.element:04x}"] = None
            continue
        vr = elem.VR
        if vr in BINARY_VRS:
            continue
        key = element_key(elem)
        try:
            if vr == "SQ" and depth >= MAX_DEPTH:
                out[key] = {"@invalid": f"sequence nested deeper than {MAX_DEPTH} levels"}
            elif vr == "SQ":
                out[key] = [simplify(item, repair=repair, depth=depth + 1) for item in elem.value]
            else:
                out[key] = element_value(elem, repair)
        except Exception as exc:
            log.debug("cannot decode %s: %s", key, exc)
            out[key] = None
    return out
