"""Reading an instance up to its Pixel Data: ``read_header(data)``.

The transform reads every instance's header (everything before the Pixel Data, which
it never decodes). ``pydicom.dcmread(..., stop_before_pixels=True)`` spends a third of
that on the file meta, attribute by attribute. For the usual file (a 128-byte preamble,
``DICM``, a file meta that starts with its group length, in one of the little-endian
uncompressed syntaxes, no command set) the meta is read here by ``struct`` and the
data set by pydicom's own ``read_dataset``, as ``dcmread`` would; anything else (no
preamble, no group length, big endian, deflate, compressed, a command set, any
anomaly in the meta, an empty data set) is read by ``dcmread`` itself. Pure, thread-safe.
"""

from __future__ import annotations

import io
import struct

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

LITTLE_ENDIAN = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # -> implicit VR
_PIXELS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # (float, double) pixel data
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
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
    syntax = values.get(0x00020010, "")
    if syntax not in LITTLE_ENDIAN or data[end : end + 2] == b"\0\0":  # a command set
        return None
    return values, end, LITTLE_ENDIAN[syntax]
