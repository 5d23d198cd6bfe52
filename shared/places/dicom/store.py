"""C-STORE SCU: send instances to the peer over a few parallel associations.

Each instance is sent as it is stored, from its bytes in memory or from its file
(``payload.load``: never spooled, its file meta parsed once), with the presentation
context of its own SOP class and transfer syntax, over a ``link.Link`` (our own
association: framed as PDUs and written by the sending thread, no polling thread).
Where the peer refused that syntax but accepted Explicit or Implicit VR Little Endian
for the SOP class, the instance is decoded and sent in that syntax (encoded once,
whatever the retries), decompressed first when pydicom can (it has decoders for RLE,
and for JPEG with Pillow/pylibjpeg installed); otherwise the instance fails with the
peer's reason.

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
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicomsync.errors import DicomSyncError, RemoteRejected, StorageError, Unreachable
from dicomsync.places.base import Instance
from dicomsync.places.dicom import failures
from dicomsync.places.dicom.association import UNCOMPRESSED, Pair, refusal
from dicomsync.places.dicom.connections import Connections, Pooled
from dicomsync.places.dicom.link import Link, Lost
from dicomsync.places.dicom.payload import Payload, SourceUnreadable, load

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
        if conn is not None and conn.link.is_established and pair in conn.pairs:
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
                        self._send(inst, slot)
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

    def _send(self, inst: Instance, slot: _Slot) -> None:
        try:
            payload = load(inst)
        except SourceUnreadable as exc:
            raise self._unreadable(inst, exc.reason) from None
        try:
            self._send_payload(inst, payload, slot)
        except SourceUnreadable as exc:  # e.g. while converting it to another syntax
            raise self._unreadable(inst, exc.reason) from None
        finally:
            payload.close()

    def _send_payload(self, inst: Instance, payload: Payload, slot: _Slot) -> None:
        sop_class, ts = payload.sop_class, payload.ts
        status: Dataset | None = None
        for attempt in (1, 2):
            conn = self._connect(slot, (sop_class, ts))
            cx, parts, size = self._prepared(conn.link, payload)
            try:
                status = conn.link.store(cx, sop_class, payload.sop_uid, parts, size)
            except Lost as exc:
                # no answer: a dead association; one that had not yet carried an instance
                # (from the pool, idle) is replaced once
                slot.conn = None
                self.connections.discard(conn)
                if slot.proven or attempt == 2:
                    raise failures.aborted(
                        self.peer.label, f"C-STORE of {inst.name}", exc.reason
                    ) from None
                continue
            except BaseException as exc:
                # it may have stopped mid-message: never reuse that association
                slot.conn = None
                self.connections.discard(conn, abort=True)
                if isinstance(exc, SourceUnreadable):
                    raise self._unreadable(inst, exc.reason) from None
                raise
            slot.proven = True
            break
        assert status is not None
        code = int(status.Status)
        if not failures.status_ok(code):
            comment = str(getattr(status, "ErrorComment", "") or "")
            raise failures.status_error(code, f"{self.peer.label}: C-STORE of {inst.name}", comment)

    def _unreadable(self, inst: Instance, reason: str) -> StorageError:
        """A local failure reading the instance: that instance fails, the send goes on."""
        return StorageError(f"{self.peer.label}: C-STORE of {inst.name}: cannot read it: {reason}")

    def _prepared(
        self, link: Link, payload: Payload
    ) -> tuple[int, Iterable[bytes | memoryview], int]:
        """(context, dataset parts, size): the instance as it is when its own syntax was
        accepted, else converted to an accepted uncompressed one (encoded once)."""
        sop_class, ts = payload.sop_class, payload.ts
        cx = link.context_id(sop_class, ts)
        if cx is not None:
            return cx, payload.parts(), payload.size
        fallback = [str(u) for u in UNCOMPRESSED if link.context_id(sop_class, str(u))]
        name = UID(sop_class).name
        if not fallback:
            raise failures.refused_context(self.peer.label, name, refusal(link, sop_class))
        syntax = fallback[0]
        data = payload.converted.get(syntax)
        if data is None:
            try:
                ds = payload.dataset()
                if UID(ts).is_compressed:
                    ds.decompress(generate_instance_uid=False)  # to Explicit VR Little Endian
                implicit = syntax == ImplicitVRLittleEndian
                data = encode(ds, implicit, True)
                if data is None:
                    raise ValueError("pydicom could not encode it")
            except SourceUnreadable:
                raise
            except Exception as exc:
                raise RemoteRejected(
                    f"{self.peer.label}: refuses {UID(ts).name} for {name} and the instance "
                    f"cannot be decompressed ({type(exc).__name__}: {exc})"
                ) from None
            payload.converted[syntax] = data
        cx = link.context_id(sop_class, syntax)
        assert cx is not None
        return cx, [data], len(data)
