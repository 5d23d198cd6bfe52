"""What a C-STORE sends of one instance: ``Payload``, its file meta parsed once.

``load(inst)`` reads an instance without a usable ``path`` once (``inst.read()``) and
keeps the bytes: the dataset part is sent from a memoryview of them, never spooled to a
file. An instance with a file is read from it, the first megabyte at once (which holds
the file meta, and the whole of a typical instance) and the rest in one-megabyte chunks
while it is sent. The file meta (SOP class, SOP instance, transfer syntax, where the
dataset begins) is parsed once, from the first bytes, by ``parse_meta``; bytes without
a usable file meta are given one by pydicom (decoded and written again, in memory).

A local failure (the file cannot be opened or read, it ends before the size it had
when it was opened, bytes that are not DICOM, no data set after the file meta, a
file meta UID that is not ASCII) raises ``SourceUnreadable``: that
instance fails, the send goes on.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset

from dicomsync.places.base import Instance

CHUNK = 1 << 20
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV"}
_LONG_VRS |= {b"UV"}


class SourceUnreadable(Exception):
    """The instance could not be read (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_meta(data: bytes | memoryview) -> tuple[str, str, str, int] | None:
    """(SOP class, SOP instance, transfer syntax, dataset offset) from a file's first bytes,
    or None without a complete file meta (Explicit VR Little Endian, group 0002)."""
    view = memoryview(data)
    pos = 132 if bytes(view[128:132]) == b"DICM" else 0
    found: dict[int, str] = {}
    while pos + 8 <= len(view):
        group, element = struct.unpack_from("<HH", view, pos)
        if group != 2:
            break
        vr = bytes(view[pos + 4 : pos + 6])
        if not vr.isalpha() or not vr.isupper():
            return None
        if vr in _LONG_VRS:
            if pos + 12 > len(view):
                return None
            (length,) = struct.unpack_from("<L", view, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", view, pos + 6)
            start = pos + 8
        if start + length > len(view):
            return None
        if element in (0x0002, 0x0003, 0x0010):
            try:  # a UID is ASCII: anything else is not a usable file meta
                value = bytes(view[start : start + length]).decode("ascii")
            except UnicodeDecodeError:
                return None
            found[element] = value.rstrip("\0 ").strip()
        pos = start + length
    if pos == 0 or not all(found.get(e) for e in (0x0002, 0x0003, 0x0010)):
        return None
    return found[0x0002], found[0x0003], found[0x0010], pos


@dataclass
class Payload:
    """One instance ready to send: its pair, UID, and its dataset's bytes."""

    sop_class: str
    sop_uid: str
    ts: str
    size: int  # bytes of dataset
    head: memoryview  # the first bytes of the dataset (all of them, without a file)
    file: BinaryIO | None = None  # the rest is read from here, from ``rest_at``
    rest_at: int = 0
    converted: dict[str, bytes] = field(default_factory=dict)  # syntax -> dataset bytes

    def parts(self) -> Iterator[memoryview | bytes]:
        """The dataset's bytes, in parts (again from the start on each call)."""
        if len(self.head):
            yield self.head
        left = self.size - len(self.head)
        if left <= 0:
            return
        assert self.file is not None
        try:
            self.file.seek(self.rest_at)
            while left > 0:
                part = self.file.read(min(CHUNK, left))
                if not part:
                    raise SourceUnreadable("the file ended early")
                left -= len(part)
                yield part
        except OSError as exc:
            raise SourceUnreadable(exc.strerror or str(exc)) from None

    def dataset(self) -> Dataset:
        """The instance decoded by pydicom (for a conversion to another syntax)."""
        if self.file is None:
            whole = self.head.obj
            assert isinstance(whole, bytes)
            return pydicom.dcmread(BytesIO(whole), force=True)
        try:
            self.file.seek(0)
            return pydicom.dcmread(self.file, force=True)
        except OSError as exc:
            raise SourceUnreadable(exc.strerror or str(exc)) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def load(inst: Instance) -> Payload:
    """The instance's payload (see the module docstring); raises ``SourceUnreadable``."""
    if inst.path is not None and inst.path.is_file():
        try:
            f = open(inst.path, "rb")  # kept open while it is sent
        except OSError as exc:
            raise SourceUnreadable(exc.strerror or str(exc)) from None
        try:
            total = os.fstat(f.fileno()).st_size
            head = f.read(CHUNK)
            meta = parse_meta(head)
            if meta is not None and total > len(head):
                sop_class, sop_uid, ts, offset = meta
                view = memoryview(head)[offset:]
                return Payload(sop_class, sop_uid, ts, total - offset, view, f, len(head))
            data = head + f.read()
        except OSError as exc:
            f.close()
            raise SourceUnreadable(exc.strerror or str(exc)) from None
        except BaseException:
            f.close()
            raise
        f.close()
    else:
        try:
            data = inst.read()
        except OSError as exc:
            raise SourceUnreadable(exc.strerror or str(exc)) from None
    return in_memory(data)


def in_memory(data: bytes) -> Payload:
    meta = parse_meta(data)
    if meta is None:  # no usable file meta: given one by pydicom
        try:
            ds = pydicom.dcmread(BytesIO(data), force=True)
            out = BytesIO()
            ds.save_as(out, enforce_file_format=True)
        except Exception as exc:
            raise SourceUnreadable(f"not a DICOM instance ({type(exc).__name__}: {exc})") from None
        data = out.getvalue()
        meta = parse_meta(data)
        if meta is None:
            raise SourceUnreadable("it has no SOP class, SOP instance or transfer syntax")
    sop_class, sop_uid, ts, offset = meta
    if offset >= len(data):  # a C-STORE-RQ announces a data set: never an empty one
        raise SourceUnreadable("no data set")
    return Payload(sop_class, sop_uid, ts, len(data) - offset, memoryview(data)[offset:])
