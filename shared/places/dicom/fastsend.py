"""A C-STORE of a file written to the socket in one go, bypassing pynetdicom's per-PDU path.

pynetdicom sends each P-DATA-TF PDU (at most the peer's maximum length, 16 KiB for
Orthanc) through two queues, its state machine and an event, on its DUL thread: about
80 us of Python per PDU, 34 PDUs for a 0.5 MB instance. Here the C-STORE-RQ command
(encoded by pynetdicom) and the file's dataset are framed as PDUs by ``struct`` and
written with one ``sendall`` per megabyte from the sending thread, while pynetdicom
still reads and dispatches the C-STORE-RSP (its DUL thread reads the socket; nothing
else writes to it during a C-STORE, the association being ours alone).

Once a byte of the request is written, any failure aborts the association (it is left
mid-message: reused, the next C-STORE would continue the unfinished data set): a local
failure reading the file raises ``SourceUnreadable`` (that instance's error), a socket
failure or timeout (the socket's timeout is the place's ``Timeout``, set when the
connection opens: ``association.nodelay``) returns the empty status of a lost
association. Failures before the first byte leave the association as it was.

Used only for a plain TCP socket (a TLS socket must not be read and written from two
threads at once) on an association in pynetdicom 3's layout; anything else, and any
surprise, falls back to ``Association.send_c_store``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes handed to sendall at a time
_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


class SourceUnreadable(Exception):
    """The instance's file could not be read to the end (``reason`` says why)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _pdu(context_id: int, control: int, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5): type 4, length, item."""
    item_len = 2 + len(data)
    return struct.pack(">BBLLBB", 0x04, 0x00, item_len + 4, item_len, context_id, control)


def usable(assoc: Any) -> bool:
    """Whether the fast path applies to ``assoc`` (plain socket, pynetdicom 3 internals)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    return (
        sock is not None
        and type(sock).__name__ in ("socket", "_QuickAckSocket")
        and hasattr(assoc, "_reactor_checkpoint")
        and hasattr(assoc, "_is_paused")
        and hasattr(assoc, "dimse")
    )


def send_file(assoc: Any, path: Path, sop_class: str, ts: str) -> Dataset:
    """C-STORE ``path`` (its dataset as stored, syntax ``ts``) on ``assoc``; the status
    dataset (empty when no answer came: the association is then aborted)."""
    if not assoc.is_established:  # aborted (a failure part-way): no answer
        return Dataset()
    context = assoc._get_valid_context(sop_class, ts, "scu", allow_conversion=False)
    cx_id = int(context.context_id)
    max_pdu = int(assoc.acceptor.maximum_length or 0)
    room = (max_pdu - 6) if max_pdu else CHUNK
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    meta, offset = split_dataset(path)
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req._dataset_path = (path, offset)  # "a dataset follows"
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = encode(msg.command_set, True, True)
    assert command is not None
    sock = assoc.dul.socket.socket
    if sock.gettimeout() is None and assoc.network_timeout:  # as nodelay(): bounded writes
        sock.settimeout(float(assoc.network_timeout))

    assoc._reactor_checkpoint.clear()  # as send_c_store: the reactor must not take the answer
    while not assoc._is_paused:
        time.sleep(0.0001)
    written = False  # from the first byte on, a failure leaves the peer mid-message

    def send(data: bytearray) -> None:
        nonlocal written
        written = True
        sock.sendall(data)

    try:
        try:
            out = bytearray()
            for start in range(0, len(command), room):  # the command set: control 01, last 03
                part = command[start : start + room]
                last = start + room >= len(command)
                out += _pdu(cx_id, 0x03 if last else 0x01, part) + part
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise SourceUnreadable(path, exc.strerror or str(exc)) from None
            with f:
                f.seek(0, 2)
                left = f.tell() - offset
                f.seek(offset)
                while left > 0:  # the dataset: control 00, last 02
                    try:
                        part = f.read(min(room, left))
                    except OSError as exc:
                        raise SourceUnreadable(path, exc.strerror or str(exc)) from None
                    if not part:
                        raise SourceUnreadable(path, "the file ended early")
                    left -= len(part)
                    out += _pdu(cx_id, 0x02 if left <= 0 else 0x00, part) + part
                    if len(out) >= CHUNK:
                        send(out)
                        out.clear()
            if out:
                send(out)
        except OSError as exc:  # the socket: reset, closed, or no room within Timeout
            log.warning("C-STORE of %s: the connection failed: %s", path.name, exc or "timeout")
            assoc.abort()
            return Dataset()
        except BaseException:
            if written:  # the peer holds part of a message: the association is unusable
                assoc.abort()
            raise
        if _QUICKACK:  # acknowledge the answer's first segment at once, even before this
            try:  # process gets to read it (a peer with Nagle on waits for that ACK)
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)
