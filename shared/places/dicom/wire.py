"""The bytes we read and write ourselves on a ``link.Link``: PDU headers, the C-STORE-RQ
command set, and the command sets of answers (group 0000, Implicit VR Little Endian).

pynetdicom's DIMSE message classes encode a C-STORE-RQ in about 400 us (two pydicom
encodings); ``store_command`` builds the same bytes (a test compares them) with
``struct`` in a few microseconds. Answers are parsed into element -> bytes, and
anything malformed raises ``Lost`` (the association cannot be trusted after it).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

if TYPE_CHECKING:
    from dicomsync.places.dicom.association import Peer

HEAD = struct.Struct(">BBL")  # PDU type, reserved, length
PDV = struct.Struct(">BBLLBB")  # P-DATA-TF header with one PDV item: 12 bytes
C_STORE_RSP, C_FIND_RSP, C_ECHO_RSP = 0x8001, 0x8020, 0x8030
NO_DATASET = 0x0101


def frames(cx: int, control: int, data: memoryview, last: bool, room: int) -> Iterator[Any]:
    """Header / data pairs of P-DATA-TF PDUs of one PDV each, at most ``room`` bytes of
    ``data`` per PDV (``control`` | 2 on the last one when ``last``)."""
    for start in range(0, len(data), room):
        part = data[start : start + room]
        flag = control | 2 if last and start + room >= len(data) else control
        yield PDV.pack(0x04, 0, len(part) + 6, len(part) + 2, cx, flag)
        yield part


class Lost(Exception):
    """The association is gone (already aborted and closed); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


IOV_MAX = 1024  # buffers per sendmsg


def sendv(sock: socket.socket, bufs: list[Any], plain: bool) -> None:
    """Write ``bufs`` whole: by ``sendmsg`` of up to ``IOV_MAX`` buffers on a plain socket
    (no copy), joined on a TLS one (an ``ssl`` socket has no ``sendmsg``)."""
    if not plain:
        sock.sendall(b"".join(bufs))
        return
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i : i + IOV_MAX])
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        if sent:
            bufs[i] = memoryview(bufs[i])[sent:]


def split_pdvs(pdu: bytes) -> list[tuple[int, int, bytes]]:
    """A P-DATA-TF's PDVs: (context ID, message control header, fragment) each; ``Lost``
    for a malformed one."""
    pos, out = 6, []
    while pos < len(pdu):
        if pos + 6 > len(pdu):
            raise Lost("a malformed P-DATA-TF")
        (item_len,) = struct.unpack_from(">L", pdu, pos)
        end = pos + 4 + item_len
        if item_len < 2 or end > len(pdu):
            raise Lost("a malformed P-DATA-TF")
        out.append((pdu[pos + 4], pdu[pos + 5], pdu[pos + 6 : end]))
        pos = end
    return out


def store_command(msg_id: int, sop_class: str, sop_uid: str, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set (Implicit VR Little Endian), as pynetdicom's ``C_STORE_RQ``
    encodes it (a test checks that), at a tenth of the cost."""

    def ui(element: int, uid: str) -> bytes:
        value = uid.encode("ascii")
        if len(value) % 2:
            value += b"\0"
        return struct.pack("<HHL", 0, element, len(value)) + value

    def us(element: int, value: int) -> bytes:
        return struct.pack("<HHLH", 0, element, 2, value)

    body = b"".join(
        (
            ui(0x0002, sop_class),
            us(0x0100, 0x0001),
            us(0x0110, msg_id),
            us(0x0700, priority),
            us(0x0800, 0x0001),  # a dataset follows
            ui(0x1000, sop_uid),
        )
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """Element number -> value of a command set (group 0000, Implicit VR Little Endian)."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise Lost("a malformed command set")
        out[element] = bytes(data[pos : pos + length])
        pos += length
    return out


def us_value(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def status_of(command: dict[int, bytes]) -> Dataset:
    """The status dataset of an answer: Status, and ErrorComment when given."""
    status = Dataset()
    code = us_value(command, 0x0900)
    if code is None:
        raise Lost("an answer without a status")
    status.Status = code
    comment = command.get(0x0902)
    if comment:
        status.ErrorComment = comment.decode("ascii", "replace").rstrip("\0 ")
    return status


def find_command(msg_id: int, sop_class: str) -> bytes:
    """A C-FIND-RQ command set (an identifier follows), by pynetdicom's message class."""
    req = C_FIND()
    req.MessageID, req.AffectedSOPClassUID, req.Priority = msg_id, sop_class, 2
    req.Identifier = BytesIO(b"\0")  # "a dataset follows"
    msg = C_FIND_RQ()
    msg.primitive_to_message(req)
    return encode(msg.command_set, True, True) or b""


def echo_command(msg_id: int) -> bytes:
    """A C-ECHO-RQ command set, by pynetdicom's message class."""
    req = C_ECHO()
    req.MessageID, req.AffectedSOPClassUID = msg_id, "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return encode(msg.command_set, True, True) or b""


def associate_rq(peer: Peer, proposed: list[PresentationContext]) -> bytes:
    """The A-ASSOCIATE-RQ PDU: pynetdicom's AE user information (our maximum length, its
    implementation class UID and version name)."""
    rq = A_ASSOCIATE()
    rq.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    rq.calling_ae_title = peer.calling_aet
    rq.called_ae_title = peer.called_aet
    rq.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = peer.max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    rq.user_information = [length, uid, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return bytes(pdu.encode())
