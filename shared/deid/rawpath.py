"""The byte path of the transform: ``deidentify(engine, data, study, name)``.

Most instances are one little-endian data set of plain elements before their Pixel
Data. For them the general path (``Deidentifier.instance``: pydicom reads every
element, the walk, the writer) spends most of its time building and reading pydicom
objects for elements whose fate is a table lookup and a few bytes. Here the data set's
elements are found by their headers alone (``scan``), and each is decided from its tag,
VR and bytes by the walk's own rules (``Deidentifier.raw_value``, ``text_uids``):

- kept elements are copied, their headers packed as the writer packs them;
- group lengths are dropped, and private elements unless the profile keeps safe ones
  (then the walk judges them);
- sequences, ``UN``, undefined lengths and the values a rule must decode are read by
  pydicom as one small data set (with the ``CONTEXT`` their decoding reads), walked by
  ``Deidentifier.walk`` and written by the writer, exactly as the general path would;
- the Specific Character Set is written decoded and encoded again, as the general
  path's writer writes it;
- PatientID, PatientName and the records are the profile's encoded elements;
- under a profile that cleans text, the instance's identifying values are read with the
  values to clean, as the general path reads them.

The output is byte for byte the general path's (``tests/test_deid_rawpath.py`` checks
every test file, variants, odd values and hostile mutations). ``None``, and the general
path runs, for anything else: big endian, deflate or a private transfer syntax, float
pixel data, elements after the Pixel Data, an explicit VR the dictionary does not give
the attribute, an ambiguous VR with a listed action, a non-ASCII pseudonym, tags out of
order, any header it cannot read, any value it cannot handle. Encapsulated pixel data
that ends the file is copied as native pixel data is. Pure, thread-safe.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING, NamedTuple

from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset

from dicomsync.deid import values
from dicomsync.deid.reading import meta_values, pixel_tail_at
from dicomsync.deid.values import (
    BURNED_IN,
    DELETE,
    KEEP,
    PATIENT_ID,
    PATIENT_NAME,
    SCANNED_VRS,
    SOP_CLASS,
    SOP_INSTANCE,
    element_header,
    encode_each,
    part10_meta,
)
from dicomsync.errors import DeidentificationRefused

if TYPE_CHECKING:
    from dicomsync.deid.transform import Deidentifier, StudyKeys

SYNTAX, CHARSET = 0x00020010, 0x00080005
# what decoding another element reads: the character set, and what resolves the
# ambiguous VRs (US or SS, OB or OW: PS3.5 6.2): bits allocated, pixel representation
CONTEXT = frozenset({0x00080005, 0x00280100, 0x00280103})
# what a profile that cleans text cuts out of it (``values.identifying_values``)
IDENTIFYING = frozenset(values.IDENTIFYING_TAGS)
_PIXELS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 32  # nested sequences skipped by headers; deeper: the general path
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                   b"UR", b"UT", b"UV"})  # fmt: skip
_SHORT = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                    b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                    b"US"})  # fmt: skip
_VRS: dict[int, str] = {}  # tag -> the dictionary's VR (implicit VR)
_CHARSETS: dict[tuple[bytes, bool], bytes] = {}  # Specific Character Sets as written
MAX_CHARSETS = 256


class Element(NamedTuple):
    tag: int
    vr: str  # as written (explicit VR); implicit VR: the dictionary's
    start: int  # of the header
    value: int  # of the value
    end: int  # past the value (past the delimiter of an undefined length)
    undefined: bool


def scan(data: bytes, pos: int, implicit: bool) -> tuple[list[Element], int] | None:
    """The top-level elements from ``pos`` to the Pixel Data (or the end), and the offset
    where they stopped; None for a header it cannot read, a truncated value or tags out
    of order."""
    out: list[Element] = []
    size, last = len(data), -1
    while pos < size:
        if pos + 8 > size:
            return None
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | elem
        if tag <= last:
            return None
        if tag in _PIXELS:
            return out, pos
        if group >= 0xFFFC:  # padding or a stray item or delimiter: pydicom's to judge
            return None
        header = _header(data, pos, implicit)
        if header is None:
            return None
        raw_vr, length, start = header
        vr = raw_vr.decode("ascii") if raw_vr else _dictionary_vr(tag)
        undefined = length == UNDEFINED
        if undefined:
            inner = implicit or raw_vr == b"UN"  # UN of undefined length: implicit VR inside
            end = _skip_items(data, start, inner, 0)
        else:
            end = start + length
        if end is None or end > size:
            return None
        out.append(Element(tag, vr, pos, start, end, undefined))
        pos, last = end, tag
    return out, pos


def _header(data: bytes, pos: int, implicit: bool) -> tuple[bytes, int, int] | None:
    """(VR as written or b"", value length, value offset) of the element at ``pos``."""
    if implicit:
        return b"", int.from_bytes(data[pos + 4 : pos + 8], "little"), pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG:
        if pos + 12 > len(data):
            return None
        return vr, int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
    if vr in _SHORT:
        return vr, int.from_bytes(data[pos + 6 : pos + 8], "little"), pos + 8
    return None


def _skip_items(data: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """Past the Sequence Delimitation Item of the items that start at ``pos``."""
    if depth > MAX_DEPTH:
        return None
    size = len(data)
    while pos + 8 <= size:
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, elem) != (0xFFFE, 0xE000):
            return None
        if length != UNDEFINED:
            pos += 8 + length
            continue
        end = _skip_elements(data, pos + 8, implicit, depth + 1)
        if end is None:
            return None
        pos = end
    return None


def _skip_elements(data: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """Past the Item Delimitation Item of the item whose elements start at ``pos``."""
    size = len(data)
    while pos + 8 <= size:
        group, elem = struct.unpack_from("<HH", data, pos)
        if (group, elem) == (0xFFFE, 0xE00D):
            return pos + 8
        header = _header(data, pos, implicit)
        if header is None:
            return None
        raw_vr, length, start = header
        if length == UNDEFINED:
            end = _skip_items(data, start, implicit or raw_vr == b"UN", depth + 1)
            if end is None:
                return None
            pos = end
        else:
            pos = start + length
    return None


def _dictionary_agrees(tag: int, vr: str) -> bool:
    """Whether an explicit ``vr`` is one the dictionary gives ``tag`` (any VR for a tag
    it does not know, and UN, which the general path resolves from the dictionary)."""
    known = _dictionary_vr(tag)
    return vr == known or vr == "UN" or known == "UN" or vr in known.split(" or ")


def _dictionary_vr(tag: int) -> str:
    vr = _VRS.get(tag)
    if vr is None:
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        else:  # a tag of the dictionary: the cache is bounded by it
            _VRS[tag] = vr
    return vr


def deidentify(engine: Deidentifier, data: bytes, study: StudyKeys, name: str) -> bytes | None:
    """``engine.instance(data, study)`` by the byte path, or None: use the general path.
    Raises ``DeidentificationRefused`` as the general path does, and nothing else."""
    try:
        return _deidentify(engine, data, study, name)
    except DeidentificationRefused:
        raise
    except Exception:  # a value it cannot handle: the general path reads it and says why
        return None


def _deidentify(engine: Deidentifier, data: bytes, study: StudyKeys, name: str) -> bytes | None:
    keeps_private = engine.actions.private != "X"  # retain-safe-private: the walk judges them
    found = meta_values(data)
    if found is None:
        return None
    meta, start, implicit = found
    scanned = scan(data, start, implicit)
    if scanned is None:
        return None
    elements, stop = scanned
    tail = None
    if stop < len(data):
        tail = pixel_tail_at(data, stop, implicit)
        if tail is None:
            return None
    encoded = engine.encoded(study, implicit)
    if PATIENT_ID not in encoded or PATIENT_NAME not in encoded:
        return None  # a pseudonym that is not ASCII: pydicom encodes it
    view = memoryview(data)
    parts: dict[int, tuple[bytes, bytes | memoryview]] = {}
    general: list[Element] = []
    context: list[Element] = []
    originals: dict[int, str] = {}
    wanted = CONTEXT | IDENTIFYING if engine.cleans_text else CONTEXT
    for el in elements:
        tag, vr = el.tag, el.vr
        if tag in wanted:
            context.append(el)
        if tag & 0xFFFF == 0:  # a group length
            continue
        if tag >> 16 & 1:  # a private attribute (and its creator: its VR follows from it)
            if keeps_private:
                general.append(el)
            continue
        if tag < 0x00080000:
            return None
        if not implicit and not _dictionary_agrees(tag, vr):
            return None  # a VR the dictionary does not give it: pydicom judges the value
        if tag in (SOP_CLASS, BURNED_IN):
            originals[tag] = data[el.value : el.end].decode("ascii", "replace")
        if tag in encoded:  # PatientID, PatientName and the records: given
            continue
        if tag == CHARSET:  # the general path's writer decodes it: written re-encoded
            charset = _charset_element(engine, el, data, implicit, study.date_offset)
            if charset is None:
                general.append(el)
            elif charset:
                parts[tag] = (charset, b"")
            continue
        if vr in ("SQ", "UN") or el.undefined:
            general.append(el)
            continue
        value = data[el.value : el.end]
        action = engine.actions.get(tag)
        if action is None:
            if vr != "UI":
                new = (
                    engine.text_uids(value)
                    if vr in SCANNED_VRS and not engine.retain_uids
                    else None
                )
                if not _put(
                    parts, el, new if new is not None else view[el.value : el.end], implicit
                ):
                    return None
                continue
            action = "U"
        if " or " in vr:
            return None
        verdict = engine.raw_value(tag, vr, value, action, study.date_offset)
        if verdict is None:
            general.append(el)
        elif isinstance(verdict, bytes):
            if not _put(parts, el, verdict, implicit):
                return None
        elif verdict is KEEP:
            if not _put(parts, el, view[el.value : el.end], implicit):
                return None
    engine.refuse_burned_in(originals.get(SOP_CLASS, ""), originals.get(BURNED_IN, ""), name)
    pieces: dict[int, tuple[bytes, ...] | tuple[bytes, bytes | memoryview]] = dict(parts)
    if general:  # pydicom's failures here: ``deidentify`` declines
        written = _general(engine, data, general, context, implicit, study)
        pieces.update((tag, (raw,)) for tag, raw in written)
    pieces.update((tag, (raw,)) for tag, raw in encoded.items())
    sop_class, sop_instance = _text(pieces.get(SOP_CLASS)), _text(pieces.get(SOP_INSTANCE))
    if not sop_class or not sop_instance:
        return None
    try:
        head = part10_meta(sop_class, sop_instance, meta.get(SYNTAX, ""), engine.implementation)
    except UnicodeEncodeError:
        return None
    out: list[bytes | memoryview] = [view[:128], head]
    for tag in sorted(pieces):
        out.extend(pieces[tag])
    if tail is not None:
        out.append(tail)
    return b"".join(out)


def _charset_element(
    engine: Deidentifier, el: Element, data: bytes, implicit: bool, days: int
) -> bytes | None:
    """The Specific Character Set as the general path writes it (its value as the walk
    leaves it, decoded and encoded again); b"": removed; None: for the general path."""
    value = data[el.value : el.end]
    action = engine.actions.get(el.tag)
    if action is not None:
        verdict = engine.raw_value(el.tag, el.vr, value, action, days)
        if verdict is None or verdict is DELETE:
            return None if verdict is None else b""
        if isinstance(verdict, bytes):
            value = verdict
    header = element_header(el.tag, el.vr, len(value), implicit)
    return None if header is None else _charset(header + value, implicit)


def _charset(raw: bytes, implicit: bool) -> bytes:
    """A Specific Character Set element (header and value as read) written as the general
    path writes it: decoded, then encoded by pydicom. Remembered per value."""
    key = (raw, implicit)
    found = _CHARSETS.get(key)
    if found is None:
        ds = read_dataset(io.BytesIO(raw), implicit, True)
        found = b"".join(piece for _, piece in encode_each(ds, implicit))
        if len(_CHARSETS) < MAX_CHARSETS:
            _CHARSETS[key] = found
    return found


def _put(
    parts: dict[int, tuple[bytes, bytes | memoryview]],
    el: Element,
    value: bytes | memoryview,
    implicit: bool,
) -> bool:
    header = element_header(el.tag, el.vr, len(value), implicit)
    if header is None:
        return False
    parts[el.tag] = (header, value)
    return True


def _general(
    engine: Deidentifier,
    data: bytes,
    elements: list[Element],
    context: list[Element],
    implicit: bool,
    study: StudyKeys,
) -> list[tuple[int, bytes]]:
    """The elements that need pydicom, read as one data set with the ``context`` their
    decoding reads (``CONTEXT``; and ``IDENTIFYING`` when the profile cleans text: the
    walk reads them before it changes anything), walked and written as the general path
    does; the context is not written again."""
    extra = [el for el in context if el not in elements]
    raw = b"".join(data[el.start : el.end] for el in sorted(elements + extra))
    ds = read_dataset(io.BytesIO(raw), implicit, True)
    engine.walk(ds, study)
    return encode_each(ds, implicit, {el.tag for el in extra})


def _text(piece: tuple[bytes, ...] | tuple[bytes, bytes | memoryview] | None) -> str:
    """A UI element's value as text, from its header and value; "" when it is missing or
    was written by the general path (then the general path writes the file)."""
    if piece is None or len(piece) != 2:
        return ""
    return bytes(piece[1]).decode("ascii", "replace").strip("\0 ")
