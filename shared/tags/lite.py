"""A small, fast reader for the nested sequences of SR documents.

pydicom turns every item of a sequence into a ``Dataset`` with per-element
bookkeeping; for a dose report with thousands of content items that is most of the
flattening time (measured: ~25 ms per report). The flattener only needs, per item,
a few string values and sub-sequences, so this module parses a sequence's raw
value bytes into plain dicts: ``{tag (int): bytes | list[item]}``.

- Explicit and implicit VR, little and big endian, defined and undefined lengths.
- Values stay raw bytes; ``Node.text`` decodes them on demand (ASCII directly,
  anything else through ``pydicom.charset.decode_bytes`` with the dataset's
  SpecificCharacterSet).
- ``Node`` wraps either a lite dict or a pydicom ``Dataset`` so the flattener works
  on both (pydicom already parses undefined-length sequences while reading).

Anything unexpected raises ``LiteError``; callers fall back to pydicom. So does a
sequence nested deeper than ``MAX_DEPTH`` levels: the parser recurses once per level
and a hostile file may nest thousands. pydicom then reads one level at a time, and
the flattener stops at its own, smaller, depth limit (``dicomsync.tags.sr.MAX_DEPTH``).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomsync.tags.simplify import element_text

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQ_END = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TEXT_TAGS = frozenset({0x0040A160})  # TextValue (UT): no backslash splitting
_PN_TAGS = frozenset({0x0040A123})
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C}
_PN_DELIMS = {0x5C, 0x3D, 0x5E}
_MULTI_DELIMS = {0x5C}

MAX_DEPTH = 64
"""Deepest sequence nesting parsed here (real reports nest fewer than 10 levels)."""

LiteItem = dict[int, Any]
LITTLE = -1  # key in every lite item: True when its binary values are little endian


class LiteError(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _is_sq(tag: int) -> bool:
    try:
        return str(dictionary_VR(tag)) == "SQ"
    except KeyError:
        return False


def parse_sequence(data: bytes, *, implicit: bool, little: bool) -> list[LiteItem]:
    items, _ = _sequence(memoryview(data), 0, len(data), implicit, little, 1)
    return items


def _sequence(
    buf: memoryview, pos: int, end: int, implicit: bool, little: bool, depth: int
) -> tuple[list[LiteItem], int]:
    """Items of a sequence value in buf[pos:end] (end may be the buffer end for undefined);
    ``depth`` is this sequence's nesting level (1 for the sequence being parsed)."""
    if depth > MAX_DEPTH:
        raise LiteError(f"sequences nested deeper than {MAX_DEPTH} levels")
    fmt = "<HHI" if little else ">HHI"
    items: list[LiteItem] = []
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from(fmt, buf, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == SEQ_END:
            return items, pos
        if tag != ITEM:
            raise LiteError(f"expected an item tag, got {tag:08x}")
        if length == UNDEFINED:
            item, pos = _dataset(buf, pos, len(buf), implicit, little, depth, until_item_end=True)
        else:
            if pos + length > len(buf):
                raise LiteError("item runs past the end of the data")
            item, _ = _dataset(
                buf, pos, pos + length, implicit, little, depth, until_item_end=False
            )
            pos += length
        items.append(item)
    return items, pos


def _dataset(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    depth: int,
    *,
    until_item_end: bool,
) -> tuple[LiteItem, int]:
    tag_fmt = "<HH" if little else ">HH"
    u32 = "<I" if little else ">I"
    u16 = "<H" if little else ">H"
    out: LiteItem = {LITTLE: little}
    while pos + 8 <= end:
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        if tag == ITEM_END:
            return out, pos + 8
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack_from(u32, buf, pos + 4)
            vr = b""
            pos += 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from(u32, buf, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from(u16, buf, pos + 6)
                pos += 8
        sq = vr == b"SQ" or (not vr and _is_sq(tag))
        if length == UNDEFINED:
            if sq or vr == b"UN" or not vr:
                # undefined-length UN is an implicit-VR little-endian sequence (PS3.5 6.2.2)
                inner_implicit = implicit or vr == b"UN"
                inner_little = little or vr == b"UN"
                value, pos = _sequence(buf, pos, len(buf), inner_implicit, inner_little, depth + 1)
                out[tag] = value
                continue
            raise LiteError(f"undefined length for non-sequence {tag:08x}")
        if pos + length > end:
            raise LiteError(f"element {tag:08x} runs past its item")
        if sq:
            value, _ = _sequence(buf, pos, pos + length, implicit, little, depth + 1)
            out[tag] = value
        else:
            out[tag] = bytes(buf[pos : pos + length])
        pos += length
    if until_item_end:
        raise LiteError("item without an item delimiter")
    return out, pos


class Reader:
    """Reads values from lite items or pydicom Datasets, with one charset."""

    def __init__(self, encodings: Sequence[str] | None, *, lite: bool = True) -> None:
        """``lite=False`` reads sequences through pydicom only (the reference path)."""
        self.encodings = list(encodings or ["iso8859"])
        self.lite = lite
        # Sequences parsed from a Dataset's raw bytes, so a second look costs nothing.
        self._parsed: dict[tuple[int, int], tuple[Any, list[LiteItem]]] = {}

    def decode(self, raw: bytes, tag: int) -> str:
        if raw.isascii() and b"\x1b" not in raw:
            text = raw.decode("ascii")
        else:
            delims = (
                _TEXT_DELIMS
                if tag in _TEXT_TAGS
                else _PN_DELIMS
                if tag in _PN_TAGS
                else _MULTI_DELIMS
            )
            text = decode_bytes(raw, self.encodings, delims)
        text = text.rstrip(" \x00")
        return text if tag in _TEXT_TAGS else text.lstrip(" ")

    def text(self, node: Any, tag: int) -> str | None:
        """A string value, or None when absent (``""`` when present but empty)."""
        if isinstance(node, dict):
            raw = node.get(tag)
            if raw is None:
                return None
            if isinstance(raw, list):
                raise LiteError(f"{tag:08x} is a sequence, not a value")
            return self.decode(raw, tag)
        elem = node.get_item(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            return self.decode(elem.value, tag)
        return element_text(node, tag)

    def raw(self, node: Any, tag: int) -> bytes | str | None:
        """Undecoded bytes when available (numbers), else the converted value as text."""
        if isinstance(node, dict):
            value = node.get(tag)
            return value if isinstance(value, bytes) else None
        elem = node.get_item(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            return elem.value
        return self.text(node, tag)

    def numbers(self, node: Any, tag: int, fmt: str) -> list[float] | None:
        """A binary numeric value (``fmt`` "f", "d", "I"...) as a list, or None."""
        if isinstance(node, dict):
            raw = node.get(tag)
            if not isinstance(raw, bytes):
                return None
            size = struct.calcsize(fmt)
            order = "<" if node.get(LITTLE, True) else ">"
            return [float(v) for v in struct.unpack(order + fmt * (len(raw) // size), raw)]
        if node.get_item(tag) is None:
            return None
        value = node[tag].value
        values = value if isinstance(value, MultiValue | list | tuple) else [value]
        return [float(v) for v in values]

    def has(self, node: Any, tag: int) -> bool:
        if isinstance(node, dict):
            return tag in node
        return node.get_item(tag) is not None

    def seq(self, node: Any, tag: int) -> list[Any] | None:
        """A sequence's items (lite dicts or Datasets), or None when absent."""
        if isinstance(node, dict):
            value = node.get(tag)
            if value is None or isinstance(value, list):
                return value
            raise LiteError(f"{tag:08x} is not a sequence")
        elem = node.get_item(tag)
        if elem is None:
            return None
        if self.lite and isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            cached = self._parsed.get((id(node), tag))
            if cached is not None and cached[0] is node:
                return cached[1]
            try:
                items = parse_sequence(
                    elem.value,
                    implicit=bool(elem.is_implicit_VR),
                    little=bool(elem.is_little_endian),
                )
                self._parsed[(id(node), tag)] = (node, items)
                return items
            except (LiteError, struct.error):
                pass  # let pydicom try (and raise if it is really corrupt)
        value = node[tag].value
        return list(value) if value is not None else None


def reader_for(ds: Dataset, *, lite: bool = True) -> Reader:
    from pydicom.charset import convert_encodings

    value = ds.get("SpecificCharacterSet")
    if value is None or value == "":
        return Reader(None, lite=lite)
    names = list(value) if isinstance(value, MultiValue | list) else [value]
    try:
        return Reader(convert_encodings([str(n) for n in names]), lite=lite)
    except Exception:
        return Reader(None, lite=lite)
