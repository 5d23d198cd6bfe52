"""Values of the de-identification: dummies per VR, date shifts, the text scrubber, and
reading an element's VR or the Pixel Data's bytes without decoding them. Pure helpers of
``dicomsync.deid.transform``; thread-safe."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

CONCEPT_NAME = 0x0040A043
# Values that name the patient, staff, site or device: cut out of cleaned text.
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician",
)  # fmt: skip
NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "IS", "DS", "AT"})
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE", "UR"})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
         "AS": "000D", "IS": "0", "DS": "0"}  # fmt: skip
# VRs whose values the fast path rewrites as ASCII bytes (``Deidentifier._raw``)
RAW_VRS = frozenset({"UI", "DA", "DT", "TM", "LO", "SH", "CS", "AE", "AS", "IS", "DS", "PN",
                     "LT", "ST", "UT", "UC"})  # fmt: skip


def map_values(value: Any, fn: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def shift(value: str, days: int, width: int) -> str:
    """A DA or DT value's date moved back ``days``; a value that is no date becomes the dummy."""
    head, tail = value[:width], value[width:]
    try:
        date = datetime.datetime.strptime(head, "%Y%m%d").date()
        return (date - datetime.timedelta(days=days)).strftime("%Y%m%d") + tail
    except ValueError:
        return DUMMY["DA"] + tail[: max(0, len(value) - width)]


_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")


def pixel_tail(data: bytes, pos: int, ds: Dataset) -> memoryview | None:
    """The Pixel Data element's bytes, when it is the file's last element with a defined
    length in a little-endian, not deflated encoding: then it is copied as it is, never
    decoded. None otherwise (no pixel data, encapsulated, elements after it, big endian,
    deflate): the caller reads the whole file."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        return None
    if data[pos : pos + 4] != _PIXEL_TAG:
        return None
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        header, length = 8, int.from_bytes(data[pos + 4 : pos + 8], "little")
    elif data[pos + 4 : pos + 6] in _LONG_VRS:  # tag, VR, 2 reserved, 4-byte length
        header, length = 12, int.from_bytes(data[pos + 8 : pos + 12], "little")
    else:
        return None
    if length == 0xFFFFFFFF or pos + header + length != len(data):
        return None
    return memoryview(data)[pos:]


def vr_of(ds: Dataset, tag: int) -> str:
    """An element's VR without decoding its value (implicit VR: the dictionary's)."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def concept_of(item: Dataset) -> str:
    seq = item.get(CONCEPT_NAME)
    try:
        return str(seq.value[0].CodeValue) if seq is not None and seq.value else ""
    except (AttributeError, IndexError):
        return ""


def identifying_values(ds: Dataset) -> set[str]:
    """The instance's identifying values (parts of 3 characters and longer)."""
    values: set[str] = set()
    for keyword in IDENTIFYING:
        elem = ds.data_element(keyword) if keyword in ds else None
        if elem is None or elem.value in (None, ""):
            continue
        many = isinstance(elem.value, list | pydicom.multival.MultiValue)
        for v in elem.value if many else [elem.value]:
            for part in re.split(r"[\^=]", str(v)):
                if len(part.strip()) >= 3:
                    values.add(part.strip())
    return values


def scrubber(values: set[str]) -> re.Pattern[str] | None:
    """One pattern of ``values``, longest first, case-insensitive."""
    if not values:
        return None
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(alternatives, re.IGNORECASE)
