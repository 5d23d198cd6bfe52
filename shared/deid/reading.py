"""Reading an instance up to its Pixel Data: ``read_header(data)``.

The transform reads every instance's header (everything before the Pixel Data, which
it never decodes). ``pydicom.dcmread(..., stop_before_pixels=True)`` spends a third of
that on the file meta, attribute by attribute. For the usual file (a 128-byte preamble,
``DICM``, a file meta that starts with its group length, a syntax whose data set is
little endian and not deflated (``little_endian_syntax``: the uncompressed ones and the
encapsulated ones), no command set) the meta is read here by ``struct`` and the data set
by pydicom's own ``read_dataset``, as ``dcmread`` would; anything else (no preamble, no
group length, big endian, deflate, a private syntax, a command set, any anomaly in the
meta, an empty data set) is read by ``dcmread`` itself. ``pixel_tail`` finds the Pixel
Data that ends the file, to be copied as it is. Pure, thread-safe.
"""

from __future__ import annotations

import io
import struct

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

LITTLE_ENDIAN = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # -> implicit VR
_PIXELS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # (float, double) pixel data
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_KEPT = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
         0x00020010: "TransferSyntaxUID"}  # fmt: skip


def _before_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXELS


def read_header(data: bytes) -> tuple[Dataset, int]:
    """The data set before the Pixel Data (and its file meta), and the offset where the
    reading stopped. Raises whatever pydicom raises on data it cannot read."""
    fast = _meta(data)
    if fast is None:
        fp = io.BytesIO(data)
        whole: Dataset = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
        return whole, fp.tell()
    meta, start, implicit = fast
    fp = io.BytesIO(data)
    fp.seek(start)
    ds = read_dataset(fp, implicit, True, stop_when=_before_pixels)
    ds.file_meta = meta
    ds.preamble = data[:128]
    return ds, fp.tell()


def _meta(data: bytes) -> tuple[FileMetaDataset, int, bool] | None:
    """The file meta read by ``struct`` (the SOP class, instance and transfer syntax), the
    data set's offset and whether it is implicit VR; None: leave the file to ``dcmread``."""
    found = meta_values(data)
    if found is None:
        return None
    values, end, implicit = found
    meta = FileMetaDataset()
    for tag, keyword in _KEPT.items():
        if tag in values:
            setattr(meta, keyword, values[tag])
    return meta, end, implicit


def meta_values(data: bytes) -> tuple[dict[int, str], int, bool] | None:
    """``_meta``'s reading: the kept values by tag (as text), the data set's offset and
    whether it is implicit VR; None for a file ``dcmread`` must read."""
    if data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH or len(data) < 144:
        return None
    end = 144 + int.from_bytes(data[140:144], "little")
    if end >= len(data):  # no data set (pydicom then calls it implicit VR)
        return None
    pos, values = 144, {}
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, vr = struct.unpack_from("<HH2s", data, pos)
        if group != 2:
            return None
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            pos += 12
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            return None
        tag = 0x00020000 | element
        if tag in _KEPT:
            values[tag] = data[pos : pos + length].decode("ascii", "replace").strip("\0 ")
        pos += length
    implicit = little_endian_syntax(values.get(0x00020010, ""))
    if implicit is None or data[end : end + 2] == b"\0\0":  # a command set
        return None
    return values, end, implicit


def little_endian_syntax(syntax: str) -> bool | None:
    """Whether a transfer syntax's data set is implicit VR, for those whose data set is
    little endian and not deflated: implicit and explicit VR Little Endian, and the
    encapsulated (compressed) ones, whose data set is explicit VR Little Endian. None
    for any other (big endian, deflate, a private or unknown syntax)."""
    if syntax in LITTLE_ENDIAN:
        return LITTLE_ENDIAN[syntax]
    try:
        uid = UID(syntax)
        if uid.is_transfer_syntax and uid.is_encapsulated and not uid.is_deflated:
            return False if uid.is_little_endian and not uid.is_implicit_VR else None
    except ValueError:  # not a transfer syntax pydicom knows
        pass
    return None


def pixel_tail(data: bytes, pos: int, ds: Dataset) -> memoryview | None:
    """The Pixel Data element's bytes, when it is the file's last element, in a
    little-endian, not deflated encoding: native with a defined length, or encapsulated
    (its items and their delimiter ending the file). Then it is copied as it is, never
    decoded. None otherwise (no pixel data, elements after it, big endian, deflate): the
    caller reads the whole file."""
    meta = getattr(ds, "file_meta", None)
    implicit = little_endian_syntax(str(meta.get("TransferSyntaxUID", "")) if meta else "")
    return None if implicit is None else pixel_tail_at(data, pos, implicit)


def pixel_tail_at(data: bytes, pos: int, implicit: bool) -> memoryview | None:
    """``pixel_tail`` of a little-endian data set, ``implicit`` VR or explicit."""
    if data[pos : pos + 4] != _PIXEL_TAG:
        return None
    if implicit:  # tag, 4-byte length
        header, length = 8, int.from_bytes(data[pos + 4 : pos + 8], "little")
    elif data[pos + 4 : pos + 6] in _PIXEL_VRS:  # tag, VR, 2 reserved, 4-byte length
        header, length = 12, int.from_bytes(data[pos + 8 : pos + 12], "little")
    else:
        return None
    if length == 0xFFFFFFFF:
        if _fragments_end(data, pos + header) != len(data):
            return None
    elif pos + header + length != len(data):
        return None
    return memoryview(data)[pos:]


def _fragments_end(data: bytes, pos: int) -> int | None:
    """Past the Sequence Delimitation Item of encapsulated pixel data's items (each of a
    defined length) that start at ``pos``; None if they are not that."""
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return None
        pos += 8 + length
    return None
