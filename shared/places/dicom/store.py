"""C-STORE SCU: send instances to the peer over a few parallel associations.

Each instance is sent from a file (its own, or a temporary spool file when it only
exists as bytes), in PDU-sized chunks, with the presentation context of its own SOP
class and transfer syntax: framed and written by ``fastsend`` on a plain socket (a
third of pynetdicom's CPU per instance), by pynetdicom itself over TLS. Where the peer refused that syntax but accepted Explicit or
Implicit VR Little Endian for the SOP class, the instance is decoded and sent in that
syntax, decompressed first when pydicom can (it has decoders for RLE, and for JPEG
with Pillow/pylibjpeg installed); otherwise the instance fails with the peer's reason.

Statuses: 0x0000 and the warnings (0xB000 range) count as stored; any failure status
fails that instance with its code (``failures.status_error``), and the other instances
are still sent. A lost association (reset, or no progress within ``Timeout``) stops the
send with ``Unreachable`` (retryable); a pooled association found dead on its first use
is replaced once. An association whose send raised is aborted, never pooled again (it
may be mid-message); a local failure reading the instance's file fails that instance
(``StorageError``), not the send.

Associations come from the place's ``Connections`` (at most ``Associations`` open),
each knowing the (SOP class, transfer syntax) pairs it proposed: the pairs seen
recently are proposed together, so a stream of similar studies needs no new one.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomsync.errors import DicomSyncError, RemoteRejected, StorageError, Unreachable
from dicomsync.places.base import Instance
from dicomsync.places.dicom import failures, fastsend
from dicomsync.places.dicom.association import UNCOMPRESSED, Pair, accepted, refusal
from dicomsync.places.dicom.connections import Connections, Pooled

log = logging.getLogger(__name__)


@dataclass
class StoreResult:
    """What one ``store`` call did: SOP UIDs stored, and SOP UID -> error of the refused."""

    stored: list[str] = field(default_factory=list)
    refused: dict[str, DicomSyncError] = field(default_factory=dict)
    lost: DicomSyncError | None = None  # the association was lost: the send stopped


@dataclass
class _Slot:
    """A worker's association and whether it has been used since it was (re)opened."""

    conn: Pooled | None = None
    proven: bool = False


class StoreScu:
    """Sends instances to the peer through ``connections``; thread-safe, one per place."""

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.peer = connections.peer

    def _connect(self, slot: _Slot, pair: Pair) -> Pooled:
        """The slot's association if it proposed ``pair``; else another one."""
        conn = slot.conn
        if conn is not None and conn.assoc.is_established and pair in conn.pairs:
            self.connections._remember(pair)
            return conn
        if conn is not None:
            slot.conn = None
            self.connections.give(conn)
        slot.conn = self.connections.acquire(pair)
        slot.proven = False
        return slot.conn

    # --- sending -----------------------------------------------------------------------
    def store(
        self, instances: Iterable[Instance], on_stored: Callable[[str], None] | None = None
    ) -> StoreResult:
        """Send every instance; never raises for one instance (see ``StoreResult``)."""
        result = StoreResult()
        source: Iterator[Instance] = iter(instances)
        lock = threading.Lock()
        stop = threading.Event()
        with tempfile.TemporaryDirectory(prefix="dicomsync-store-") as spool:

            def next_instance() -> Instance | None:
                with lock:
                    if stop.is_set():
                        return None
                    try:
                        return next(source)
                    except StopIteration:
                        return None
                    except DicomSyncError as exc:  # the source failed to read
                        result.lost = exc
                        stop.set()
                        return None

            def work() -> None:
                slot = _Slot()
                try:
                    while (inst := next_instance()) is not None:
                        try:
                            self._send(inst, slot, Path(spool))
                        except Unreachable as exc:
                            with lock:
                                result.lost = result.lost or exc
                            stop.set()
                            return
                        except DicomSyncError as exc:
                            log.warning("%s: %s", self.peer.label, exc)
                            with lock:
                                result.refused[inst.sop_uid] = exc
                            continue
                        with lock:
                            result.stored.append(inst.sop_uid)
                        if on_stored is not None:
                            on_stored(inst.sop_uid)
                except BaseException as exc:  # a bug: fail the send, not the thread silently
                    with lock:
                        result.lost = result.lost or Unreachable(
                            f"{self.peer.label}: C-STORE failed: {type(exc).__name__}: {exc}"
                        )
                    stop.set()
                finally:
                    if slot.conn is not None:
                        self.connections.give(slot.conn)

            threads = [
                threading.Thread(target=work, name=f"dicom-store-{i}", daemon=True)
                for i in range(self.connections.size)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return result

    def _send(self, inst: Instance, slot: _Slot, spool: Path) -> None:
        try:
            path, temporary = spooled(inst, spool)
        except OSError as exc:
            raise self._unreadable(inst, exc.strerror or str(exc)) from None
        try:
            try:
                sop_class, ts = file_pair(path)
            except OSError as exc:
                raise self._unreadable(inst, exc.strerror or str(exc)) from None
            code = 0
            for attempt in (1, 2):
                conn = self._connect(slot, (sop_class, ts))
                payload = self._payload(conn, path, sop_class, ts)
                try:
                    if isinstance(payload, Path) and fastsend.usable(conn.assoc):
                        status = fastsend.send_file(conn.assoc, path, sop_class, ts)
                    else:
                        status = conn.assoc.send_c_store(payload)
                except BaseException as exc:
                    # it may have stopped mid-message: never reuse that association
                    slot.conn = None
                    self.connections.discard(conn, abort=True)
                    if isinstance(exc, fastsend.SourceUnreadable):
                        raise self._unreadable(inst, exc.reason) from None
                    if isinstance(exc, OSError):  # pynetdicom reading the file
                        raise self._unreadable(inst, exc.strerror or str(exc)) from None
                    raise
                if getattr(status, "Status", None) is not None:
                    code = int(status.Status)
                    slot.proven = True
                    break
                # no answer: a dead association; one that had not yet carried an instance
                # (from the pool, idle) is replaced once
                slot.conn = None
                self.connections.discard(conn)
                if slot.proven or attempt == 2:
                    raise failures.aborted(self.peer.label, f"C-STORE of {inst.name}")
            if not failures.status_ok(code):
                comment = str(getattr(status, "ErrorComment", "") or "")
                raise failures.status_error(
                    code, f"{self.peer.label}: C-STORE of {inst.name}", comment
                )
        finally:
            if temporary:
                path.unlink(missing_ok=True)

    def _unreadable(self, inst: Instance, reason: str) -> StorageError:
        """A local failure reading the instance: that instance fails, the send goes on."""
        return StorageError(f"{self.peer.label}: C-STORE of {inst.name}: cannot read it: {reason}")

    def _payload(self, conn: Pooled, path: Path, sop_class: str, ts: str) -> Path | Dataset:
        """The file itself when its own syntax was accepted, else a converted dataset."""
        assoc = conn.assoc
        if accepted(assoc, sop_class, ts):
            return path
        fallback = [str(u) for u in UNCOMPRESSED if accepted(assoc, sop_class, str(u))]
        name = UID(sop_class).name
        if not fallback:
            raise failures.refused_context(self.peer.label, name, refusal(assoc, sop_class))
        try:
            ds = pydicom.dcmread(path, force=True)
            syntax = UID(ts)
            if syntax.is_compressed:
                ds.decompress(generate_instance_uid=False)  # to Explicit VR Little Endian
            elif syntax not in UNCOMPRESSED:  # deflated, big endian: decoded already
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        except Exception as exc:
            raise RemoteRejected(
                f"{self.peer.label}: refuses {UID(ts).name} for {name} and the instance "
                f"cannot be decompressed ({type(exc).__name__}: {exc})"
            ) from None
        return ds


def spooled(inst: Instance, spool: Path) -> tuple[Path, bool]:
    """A file holding the instance with its file meta: its own, or a temporary one."""
    if inst.path is not None and inst.path.is_file() and has_meta(inst.path):
        return inst.path, False
    data = inst.read()
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=spool)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path = Path(name)
    if not has_meta(path):  # a file without meta: written again with one
        ds = pydicom.dcmread(path, force=True)
        ds.save_as(path, enforce_file_format=True)
    return path, True


def has_meta(path: Path) -> bool:
    try:
        meta = read_file_meta_info(path)
    except Exception:
        return False
    return all(
        k in meta
        for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    )


def file_pair(path: Path) -> Pair:
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
