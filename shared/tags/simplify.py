"""Orthanc-style "simplified" tags from a pydicom Dataset.

``simplify(ds)`` returns ``{keyword: value}`` like Orthanc's ``/instances/{id}/simplified-tags``:

- the key is the DICOM keyword (``PatientName``); tags without a keyword (private
  tags, unknown tags) use the lowercase ``gggg,eeee`` form Orthanc uses;
- every value is a string, as in Orthanc: numbers keep their DICOM text (``"5.0"``),
  multi-valued elements are joined with ``\\``, PN/DA/TM/DT are their DICOM strings,
  an empty element is ``""``;
- sequences are lists of objects, recursively;
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

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
# Declarations under which UTF-8 bytes are a known vendor mistake worth repairing.
_LATIN1_DECLARATIONS = frozenset({"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 100"})


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


def simplify(ds: Dataset, *, repair: bool | None = None) -> dict[str, Any]:
    """The simplified tags of ``ds`` (see the module docstring)."""
    if repair is None:
        repair = utf8_repair_enabled(ds)
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - keys() is the tag list, in order
        if tag.group == 0x0002 or tag == 0x7FE00010:
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
            if vr == "SQ":
                out[key] = [simplify(item, repair=repair) for item in elem.value]
            else:
                out[key] = element_value(elem, repair)
        except Exception as exc:
            log.debug("cannot decode %s: %s", key, exc)
            out[key] = None
    return out
