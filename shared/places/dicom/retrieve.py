"""Reading a study's instances from the peer: C-GET, or C-MOVE to our own Storage SCP.

Both stream: each instance the peer sends is written to a temporary file as it arrives
(``event.encoded_dataset()``, the bytes as sent, never decoded), and yielded as an
``Instance`` whose ``path`` is that file. The files live in a temporary folder that is
removed when the last of its ``Instance`` objects is gone; no study is held in memory.

- **C-GET** (the default) needs no port of ours: the peer sends the instances back on
  the same association, so we propose the study's storage SOP classes (from C-FIND's
  SOPClassUID, at most 127 per association) in the SCP role with every transfer
  syntax pynetdicom knows; the peer picks one.
- **C-MOVE** (``Retrieve: move``) asks the peer to send to ``MoveAet``, which the peer
  must know as our address and ``ListenPort``; we run that Storage SCP from the first
  move until the place is closed. One move at a time per place (the SCP hands what
  arrives to the move in progress). The SCP accepts only associations whose calling
  AE title is the peer's (``CalledAet``), and C-STOREs only from an address the peer's
  ``Host`` resolves to; it listens on ``ListenAddress`` (default: every interface, as
  the peer must reach us). It is plain TCP: ``Retrieve: move`` with ``Tls`` is refused
  by the configuration check.

Whatever the retrieval, an instance of another study than the one asked for (or, for
a C-MOVE, not among ``only``) is refused with 0xC000 and never yielded.

A final failure status raises its mapped error after what arrived was yielded; a
warning (some sub-operations failed) does not: ``send``'s verify step then fails the
study for the instances missing.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import socket
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts

from dicomsync.errors import ConfigError, Unreachable
from dicomsync.identity import safe_component
from dicomsync.places.base import Instance
from dicomsync.places.dicom import failures
from dicomsync.places.dicom.association import MAX_CONTEXTS, Peer, nodelay, release
from dicomsync.places.dicom.connections import Connections

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
STUDY_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")  # Study Root Q/R - GET
STUDY_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")  # Study Root Q/R - MOVE
_DONE = object()
REFUSED = 0xC000  # "cannot understand": the instance is not one we asked for


def refuse(reason: str) -> Dataset:
    """A C-STORE failure status with ``reason`` (at most 64 characters) as its comment."""
    status = Dataset()
    status.Status = REFUSED
    status.ErrorComment = reason[:64]
    return status


class _Spool:
    """Where the instances of one retrieval land; hands each to the reading generator."""

    def __init__(
        self, study_uid: str, only: Collection[str] | None, *, strict: bool = False
    ) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="dicomsync-retrieve-")
        self.study_uid = study_uid
        self.only = set(only) if only is not None else None
        self.strict = strict  # refuse (not just drop) an instance outside ``only``
        self.arrived: queue.Queue[Any] = queue.Queue()
        self._n = 0
        self._lock = threading.Lock()

    def on_store(self, event: Any) -> int | Dataset:
        """EVT_C_STORE: write the instance as sent; 0x0000, 0xC000 for an instance of
        another study (or, ``strict``, outside ``only``), 0xA700 if we cannot keep it."""
        try:
            sop = str(event.request.AffectedSOPInstanceUID)
            if self.only is not None and sop not in self.only:
                if self.strict:
                    log.warning("refused C-STORE of %s: not an instance asked for", sop)
                    return refuse("not an instance of this retrieval")
                return 0x0000  # not asked for (a peer that sent the whole study)
            with self._lock:
                self._n += 1
                path = Path(self.folder.name) / f"{self._n:06d}.dcm"
            path.write_bytes(event.encoded_dataset())
            study = _study_of(path)
            if study != self.study_uid:
                path.unlink(missing_ok=True)
                log.warning(
                    "refused C-STORE of %s: study %s, not the study retrieved (%s)",
                    sop,
                    study,
                    self.study_uid,
                )
                return refuse("not an instance of the study retrieved")
            self.arrived.put((sop, path))
            return 0x0000
        except Exception:
            log.warning("cannot keep a retrieved instance", exc_info=True)
            return 0xA700

    def instances(self, run: Callable[[], None]) -> Iterator[Instance]:
        """Run the retrieval in a thread; yield what arrives; raise its error at the end."""
        error: list[BaseException] = []

        def go() -> None:
            try:
                run()
            except BaseException as exc:
                error.append(exc)
            finally:
                self.arrived.put(_DONE)

        threading.Thread(target=go, name="dicom-retrieve", daemon=True).start()
        folder = self.folder  # each Instance keeps the folder alive
        while (item := self.arrived.get()) is not _DONE:
            sop, path = item
            yield Instance(
                sop,
                f"{safe_component(sop)}.dcm",
                functools.partial(_read, path, folder),
                path=path,
            )
        if error:
            raise error[0]


def _read(path: Path, folder: object) -> bytes:
    return path.read_bytes()


def _study_of(path: Path) -> str | None:
    """The StudyInstanceUID of the file at ``path`` (None if it has none or is unreadable)."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], force=True
        )
        return str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None
    except Exception:
        return None


def _address(text: str) -> str:
    """An IP address in one spelling (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def resolve(host: str) -> frozenset[str]:
    """The addresses ``host`` resolves to; raises ``Unreachable`` when it does not."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise Unreachable(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return frozenset(_address(str(info[4][0])) for info in infos)


def query(level: str, study_uid: str, only: Collection[str] | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE" if only is not None else level
    ds.StudyInstanceUID = study_uid
    if only is not None:
        ds.SOPInstanceUID = sorted(only)
    return ds


def finish(peer: Peer, what: str, responses: Any) -> None:
    """Drain a C-GET/C-MOVE's responses; raise the mapped error of a final failure."""
    for status, _ in responses:
        code = getattr(status, "Status", None)
        if code is None:
            raise failures.aborted(peer.label, what)
        code = int(code)
        if code in PENDING:
            continue
        if not failures.status_ok(code):
            comment = str(getattr(status, "ErrorComment", "") or "")
            raise failures.status_error(code, f"{peer.label}: {what}", comment)
        if code != 0:
            failed = getattr(status, "NumberOfFailedSuboperations", 0)
            log.warning("%s: %s: warning 0x%04X, %s failed", peer.label, what, code, failed)


def get_instances(
    connections: Connections,
    study_uid: str,
    sop_classes: Sequence[str],
    only: Collection[str] | None,
) -> Iterator[Instance]:
    """C-GET the study (or just ``only``) and yield its instances as they arrive."""
    peer = connections.peer
    classes = list(dict.fromkeys(sop_classes)) or [
        str(c.abstract_syntax) for c in StoragePresentationContexts
    ]
    per = MAX_CONTEXTS - 1
    for start in range(0, len(classes), per):
        group = classes[start : start + per]
        spool = _Spool(study_uid, only)
        contexts = [build_context(STUDY_GET)] + [
            build_context(c, ALL_TRANSFER_SYNTAXES[:]) for c in group
        ]
        roles = [build_role(c, scp_role=True) for c in group]

        def run(contexts: Any = contexts, roles: Any = roles, spool: _Spool = spool) -> None:
            with connections.slot():
                assoc = peer.associate(
                    contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, spool.on_store)]
                )
                try:
                    responses = assoc.send_c_get(query("STUDY", study_uid, only), STUDY_GET)
                    finish(peer, "C-GET", responses)
                finally:
                    release(assoc)

        yield from spool.instances(run)


class MoveScp:
    """Our Storage SCP for C-MOVE, started at the first move, stopped by ``close``.

    Only the peer may store into it: associations whose calling AE title is not the
    peer's are rejected (``require_calling_aet``), a C-STORE from an address that is not
    one of the peer's ``Host`` is refused, and so is any instance that is not of the
    study being moved (``_Spool``). It listens on ``address`` ("" = every interface).
    """

    def __init__(
        self, connections: Connections, move_aet: str, port: int, address: str = ""
    ) -> None:
        self.connections = connections
        self.peer = connections.peer
        self.move_aet = move_aet
        self.port = port
        self.address = address
        self._server: Any = None
        self._current: _Spool | None = None
        self._senders: frozenset[str] = frozenset()  # the peer's addresses
        self._lock = threading.Lock()  # one move at a time
        self._start_lock = threading.Lock()

    def _on_store(self, event: Any) -> int | Dataset:
        spool = self._current
        if spool is None:
            return 0xA801  # no move in progress: we did not ask for this instance
        sender = _address(str(event.assoc.requestor.address))
        if sender not in self._senders:
            log.warning(
                "%s: refused a C-STORE from %s: not an address of %s",
                self.peer.label,
                sender,
                self.peer.host,
            )
            return refuse("not the peer's address")
        return spool.on_store(event)

    def _start(self) -> None:
        with self._start_lock:
            if self._server is not None:
                return
            ae = self.peer.ae()
            ae.ae_title = self.move_aet
            ae.require_calling_aet = [self.peer.called_aet]
            for cx in StoragePresentationContexts:
                ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES[:])
            try:
                self._server = ae.start_server(
                    (self.address, self.port),
                    block=False,
                    evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, nodelay)],
                )
            except OSError as exc:
                where = f"{self.address or '*'}:{self.port}"
                raise ConfigError(
                    f"{self.peer.key}: cannot listen on {where} for C-MOVE: {exc.strerror or exc}"
                ) from None

    def instances(self, study_uid: str, only: Collection[str] | None) -> Iterator[Instance]:
        self._start()
        spool = _Spool(study_uid, only, strict=True)

        def run() -> None:
            with self.connections.slot():
                assoc = self.peer.associate([build_context(STUDY_MOVE)])
                try:
                    responses = assoc.send_c_move(
                        query("STUDY", study_uid, only), self.move_aet, STUDY_MOVE
                    )
                    finish(self.peer, "C-MOVE", responses)
                finally:
                    release(assoc)

        with self._lock:
            self._senders = resolve(self.peer.host)
            self._current = spool
            try:
                yield from spool.instances(run)
            finally:
                self._current = None

    def close(self) -> None:
        with self._start_lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
