"""Values of the de-identification: dummies per VR, date shifts, the text scrubber, and
reading an element's VR or the Pixel Data's bytes without decoding them. Pure helpers of
``dicomsync.deid.transform``; thread-safe."""

from __future__ import annotations

import datetime
import re
import struct
from collections.abc import Callable, Collection, Mapping
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset

from dicomsync.deid.reading import little_endian_syntax

CONCEPT_NAME = 0x0040A043
SOP_CLASS, SOP_INSTANCE, BURNED_IN = 0x00080016, 0x00080018, 0x00280301
PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
# Values that name the patient, staff, site or device: cut out of cleaned text.
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StationName", "DeviceSerialNumber",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician",
)  # fmt: skip
IDENTIFYING_TAGS = tuple(int(tag_for_keyword(k) or 0) for k in IDENTIFYING)
NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "IS", "DS", "AT"})
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE", "UR"})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
         "AS": "000D", "IS": "0", "DS": "0"}  # fmt: skip
# VRs whose values the fast path rewrites as ASCII bytes (``Deidentifier._raw``)
RAW_VRS = frozenset({"UI", "DA", "DT", "TM", "LO", "SH", "CS", "AE", "AS", "IS", "DS", "PN",
                     "LT", "ST", "UT", "UC"})  # fmt: skip


class Verdict:
    """What ``Deidentifier.raw_value`` returns besides new bytes: ``KEEP``, ``DELETE``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


KEEP, DELETE = Verdict("KEEP"), Verdict("DELETE")


def map_values(value: Any, fn: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return [fn(str(v)) for v in value]
    return fn(str(value))


# One DA value: YYYYMMDD, or ACR-NEMA's dotted YYYY.MM.DD (read as the same date). One DT
# value: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] (PS3.5 6.2).
_DA_ONE = re.compile(r"\d{8}|\d{4}\.\d{2}\.\d{2}")
_DT_ONE = re.compile(r"\d{4}(?:\d{2}(?:\d{2}(?:\d{6}(?:\.\d{1,6})?|\d{2,4})?)?)?(?:[+-]\d{4})?")


def shift(value: str, days: int, vr: str) -> str:
    """A DA or DT value moved back ``days`` (times and timezone stay). A range
    (``A-B``, ``-B``, ``A-``) moves each side; a dotted ACR-NEMA date is written as
    ``YYYYMMDD``; a value that is no date becomes the dummy ``19000101``."""
    value = value.strip(" \0")
    if not value:
        return value
    one = _DA_ONE if vr == "DA" else _DT_ONE
    if one.fullmatch(value):
        return _shift_one(value, days)
    for i, char in enumerate(value):  # a range: the first '-' with a value on each side
        left, right = value[:i], value[i + 1 :]
        if char == "-" and (left or right):
            if (not left or one.fullmatch(left)) and (not right or one.fullmatch(right)):
                return "-".join(_shift_one(v, days) if v else "" for v in (left, right))
    return DUMMY["DA"]


def _shift_one(value: str, days: int) -> str:
    if len(value) == 10 and value[4] == "." and value[7] == ".":  # YYYY.MM.DD
        value = value.replace(".", "")
    head, tail = value[:8], value[8:]
    try:
        if len(head) != 8 or not head.isdigit():
            raise ValueError(head)
        date = datetime.date(int(head[:4]), int(head[4:6]), int(head[6:]))
        moved = date - datetime.timedelta(days=days)
        return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}" + tail
    except (ValueError, OverflowError):
        return DUMMY["DA"]


# A UID inside a text value (a RetrieveURL, a note): four or more dot-separated numbers.
# Shorter runs are dates, versions and the like more often than UIDs.
_UID_IN_TEXT = re.compile(rb"(?<![0-9])[0-9]+(?:\.[0-9]+){3,}")
_DICOM_UIDS = b"1.2.840.10008."  # DICOM's own (SOP classes, transfer syntaxes): kept
# VRs of free text scanned for UIDs (``remap_uids``)
SCANNED_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "UR"})


def remap_uids(value: bytes, uid: Callable[[str], str]) -> bytes | None:
    """``value`` with each UID in it replaced by ``uid(UID)``; None if it holds none."""
    if b"." not in value or not _UID_IN_TEXT.search(value):
        return None

    def one(match: re.Match[bytes]) -> bytes:
        found = match.group()
        if found.startswith(_DICOM_UIDS):
            return found
        return uid(found.decode("ascii")).encode("ascii")

    return _UID_IN_TEXT.sub(one, value)


def remap_uids_text(value: str, uid: Callable[[str], str]) -> str:
    """``remap_uids`` of a decoded value."""
    new = remap_uids(value.encode("utf-8", "surrogateescape"), uid)
    return value if new is None else new.decode("utf-8", "surrogateescape")


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
    """The instance's identifying values (parts of 3 characters and longer). Read from a
    decoded copy: the data set keeps each element as read (written back as it was)."""
    values: set[str] = set()
    for tag in IDENTIFYING_TAGS:
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            elem = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
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


BIG_ENDIAN = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired): pydicom's writer


def write_part10(
    ds: Dataset,
    implementation: tuple[str, str],
    encoded: Callable[[bool], Mapping[int, bytes]] | None = None,
) -> bytes | None:
    """``ds`` as a Part 10 file: preamble, ``DICM``, a new file meta (version, the data
    set's SOP class and instance, the transfer syntax, ``implementation``'s class UID and
    version name; nothing else of the old one) and the data set, written as ``dcmwrite``
    does but without its deep copy of the file meta and its attribute-by-attribute meta
    (together half the time of a small instance). ``encoded(implicit)`` gives elements
    already encoded (tag -> header and value, little endian, in that VR encoding): they
    are written as they are, in their place, instead of the data set's own (the
    de-identification records, the same for every instance, encoded once). Encapsulated
    (compressed) syntaxes are written too: their data set is explicit VR Little Endian.
    None for an encoding it does not handle (deflate, a private syntax) or without SOP
    UIDs: the caller uses ``dcmwrite``."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if "file_meta" in ds.__dict__ else ""
    implicit = little_endian_syntax(syntax)  # encapsulated syntaxes too: explicit VR LE
    encoding = (False, False) if syntax == BIG_ENDIAN else None
    if implicit is not None:
        encoding = (implicit, True)
    sop_class, sop_instance = _text_of(ds, SOP_CLASS), _text_of(ds, SOP_INSTANCE)
    if encoding is None or not sop_class or not sop_instance:
        return None
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = encoding
    preamble = getattr(ds, "preamble", None)
    fp.write(preamble if preamble and len(preamble) == 128 else b"\0" * 128)
    fp.write(part10_meta(sop_class, sop_instance, syntax, implementation))
    if encoding[1] and ds.original_encoding == encoding:
        done = encoded(encoding[0]) if encoded is not None else {}
        _write_little_endian(fp, ds, encoding[0], "iso8859", done)
    else:
        write_dataset(fp, ds)
    return bytes(fp.getvalue())


META_DROPPED = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028,
                0x00020100, 0x00020102)  # fmt: skip


def meta_for_dcmwrite(
    ds: Dataset, uid: Callable[[str], str], implementation: tuple[str, str]
) -> None:
    """``ds``'s file meta made anew for pydicom's ``dcmwrite`` (a syntax ``write_part10``
    does not write): the SOP class and instance of the de-identified data set (else the
    old instance UID through ``uid``), ``implementation``; nothing else of the old one."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    for tag in META_DROPPED:
        if tag in meta:
            del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    elif "MediaStorageSOPInstanceUID" in meta:  # the original's, nowhere else remapped
        meta.MediaStorageSOPInstanceUID = uid(str(meta.MediaStorageSOPInstanceUID))
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.ImplementationClassUID, meta.ImplementationVersionName = implementation


def part10_meta(
    sop_class: str, sop_instance: str, syntax: str, implementation: tuple[str, str]
) -> bytes:
    """``DICM`` and the file meta ``write_part10`` writes (version, SOP class and instance,
    transfer syntax, implementation class UID and version name). Raises
    ``UnicodeEncodeError`` on a value that is not ASCII."""
    body = b"".join(
        (
            _meta_element(0x00020001, b"OB", b"\0\1"),
            _meta_element(0x00020002, b"UI", sop_class.encode("ascii")),
            _meta_element(0x00020003, b"UI", sop_instance.encode("ascii")),
            _meta_element(0x00020010, b"UI", syntax.encode("ascii")),
            _meta_element(0x00020012, b"UI", implementation[0].encode("ascii")),
            _meta_element(0x00020013, b"SH", implementation[1].encode("ascii")),
        )
    )
    return b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VR_NAMES = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                            "UT", "UV"})  # fmt: skip


def _write_little_endian(
    fp: DicomBytesIO,
    ds: Dataset,
    implicit: bool,
    parent_charset: Any,
    encoded: Mapping[int, bytes],
) -> None:
    """``write_dataset`` for a data set written in its own little-endian encoding: an
    element still as read is written as its header and its bytes (what pydicom does too,
    at a tenth of the cost), a sequence as its items, each written the same way (with
    undefined lengths), an element of ``encoded`` as given; any other decoded element by
    pydicom's ``write_data_element``. Items inherit the character set of the data set
    that holds them."""
    charset = ds.get("SpecificCharacterSet", None) or parent_charset  # decodes it: see rawpath
    for tag in sorted(ds._dict):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # retired group lengths
            continue
        if tag in encoded:
            fp.write(encoded[tag])
            continue
        _write_element(fp, ds, tag, implicit, charset)


def _write_element(fp: DicomBytesIO, ds: Dataset, tag: Any, implicit: bool, charset: Any) -> None:
    elem = ds._dict[tag]
    value = getattr(elem, "value", None)
    if (
        isinstance(elem, RawDataElement)
        and isinstance(value, bytes)
        and elem.length != 0xFFFFFFFF
        and (implicit or elem.VR)
    ):
        header = element_header(int(tag), str(elem.VR), len(value), implicit)
        if header is not None:
            fp.write(header)
            fp.write(value)
        else:
            write_data_element(fp, ds[tag], charset)
    elif not isinstance(elem, RawDataElement) and elem.VR == "SQ" and value is not None:
        _write_sequence(fp, elem, implicit, charset)
    else:
        write_data_element(fp, ds.get_item(tag), charset)


def element_header(tag: int, vr: str, size: int, implicit: bool) -> bytes | None:
    """An element's header, little endian, as ``write_part10`` writes it; None: a
    short-length VR with a value of more than 64 KiB (pydicom writes that one)."""
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, element, size)
    if vr in _LONG_VR_NAMES:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, size)
    if size <= 0xFFFF:
        return struct.pack("<HH2sH", group, element, vr.encode(), size)
    return None


def encode_each(ds: Dataset, implicit: bool, skip: Collection[int] = ()) -> list[tuple[int, bytes]]:
    """Each element of ``ds`` (read in little endian, ``implicit`` or explicit VR) but
    ``skip``, encoded on its own as ``write_part10`` writes it, with the data set's
    character set; in tag order."""
    charset = ds.get("SpecificCharacterSet", None) or "iso8859"
    out = []
    for tag in sorted(ds._dict):
        if tag in skip or (tag & 0xFFFF == 0 and tag >> 16 > 6):
            continue
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, True
        _write_element(fp, ds, tag, implicit, charset)
        out.append((int(tag), bytes(fp.getvalue())))
    return out


def _write_sequence(fp: DicomBytesIO, elem: Any, implicit: bool, charset: Any) -> None:
    """A decoded sequence, each item by ``_write_little_endian`` (by pydicom's
    ``write_dataset`` when read in another encoding), with the lengths pydicom gives
    (undefined where the element or item was read so, else the byte counts)."""
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = implicit, True
    for item in elem.value:
        part = DicomBytesIO()
        part.is_implicit_VR, part.is_little_endian = implicit, True
        if getattr(item, "original_encoding", None) in ((implicit, True), (None, None)):
            _write_little_endian(part, item, implicit, charset, _NONE)
        else:  # read in another encoding (a sequence that came as UN: implicit VR)
            write_dataset(part, item, parent_encoding=charset)
        content = part.getvalue()
        if getattr(item, "is_undefined_length_sequence_item", False):
            body.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
            body.write(content)
            body.write(struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
        else:
            body.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(content)))
            body.write(content)
    content = body.getvalue()
    undefined = bool(elem.is_undefined_length)
    length = 0xFFFFFFFF if undefined else len(content)
    group, element = int(elem.tag) >> 16, int(elem.tag) & 0xFFFF
    if implicit:
        fp.write(struct.pack("<HHI", group, element, length))
    else:
        fp.write(struct.pack("<HH2sHI", group, element, b"SQ", 0, length))
    fp.write(content)
    if undefined:
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


_NONE: Mapping[int, bytes] = {}


def encode_elements(ds: Dataset, implicit: bool) -> dict[int, bytes]:
    """Each element of ``ds`` encoded on its own, header and value, little endian, in
    ``implicit`` or explicit VR: for ``write_part10``'s ``encoded``."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, True
        write_data_element(fp, elem)
        out[int(elem.tag)] = bytes(fp.getvalue())
    return out


def text_element(tag: int, vr: str, value: str, implicit: bool) -> bytes | None:
    """A short text element (LO, PN, ...) of an ASCII value, encoded little endian; None
    when the value is not printable ASCII (pydicom encodes it in the data set's charset)."""
    if not (value.isascii() and value.isprintable()):
        return None
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    if len(raw) > 0xFFFF:
        return None
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def as_text(elem: Any) -> str:
    """An element's value as text, several values joined by a backslash: as read (bytes,
    decoded as ASCII) or decoded."""
    value = getattr(elem, "value", None)
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _text_of(ds: Dataset, tag: int) -> str:
    """A UI value as text, decoded or still raw, its padding stripped."""
    return as_text(ds.get_item(tag)).strip("\0 ")
