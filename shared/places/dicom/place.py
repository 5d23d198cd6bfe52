"""``dicom``: a DICOM node (an AE), over the DICOM network with pynetdicom.

Keys are ``<PatientID>/<StudyInstanceUID>``, each made a safe path component, as for
the ``orthanc`` place.

- Listing: C-FIND at STUDY level (Study Root); a literal patient part of the query
  is sent as the PatientID key, so a PACS lists one patient, not all.
- Identity: C-FIND at IMAGE level (SOPInstanceUID, SOPClassUID) for the study.
- Reading: C-GET (``retrieve.get_instances``) or C-MOVE to our Storage SCP
  (``retrieve.MoveScp``), streamed through temporary files.
- Writing: C-STORE over ``Associations`` parallel associations (``store.StoreScu``).
- Duplicate check: C-FIND at IMAGE level when the peer answers C-FIND (probed once,
  ``find.Finder.supported``); otherwise our per-destination ledger of what the peer
  acknowledged (``LedgerFile``): duplicates are then judged by our record, and a study
  deleted at the peer is not sent again until its ledger entries are removed.
- ``probe()``: C-ECHO, for ``place ls``, ``status`` and the plugin's startup check.

Errors are mapped in ``dicom.failures``.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomSyncError, NotFound, RemoteRejected, StorageError
from dicomsync.identity import StudyIdentity, safe_component
from dicomsync.options import parse
from dicomsync.places.base import Instance, Place, Receipt, StudyRef
from dicomsync.places.dicom import options as dopts
from dicomsync.places.dicom.association import Peer
from dicomsync.places.dicom.connections import Connections
from dicomsync.places.dicom.find import Finder
from dicomsync.places.dicom.options import DicomOptions
from dicomsync.places.dicom.retrieve import MoveScp, get_instances
from dicomsync.places.dicom.store import StoreScu
from dicomsync.query import StudyQuery

META_CACHE = 1024
_DICOM_WILDCARDS = set("*?\\")


class DicomPlace(Place):
    kind = "dicom"
    label = "DICOM node"
    Options = DicomOptions

    def __init__(self, key: str, opts: DicomOptions, base_dir: Path) -> None:
        super().__init__(key)
        self.opts = opts
        where = f"{self.kind} place {key!r}"
        tls = functools.partial(dopts.tls_context, opts, base_dir, where) if opts.tls else None
        self.peer = Peer(
            key,
            opts.host,
            opts.port,
            opts.called_aet.strip(),
            opts.calling_aet.strip(),
            opts.timeout,
            opts.max_pdu_size,
            tls,
        )
        # one bound per node for the whole process (the plugin has a place per worker)
        shared_key = (
            opts.host,
            opts.port,
            opts.called_aet,
            opts.calling_aet,
            opts.timeout,
            opts.max_pdu_size,
            opts.tls,
            opts.verify_tls,
            opts.ca_bundle,
            opts.cert,
            opts.key,
            opts.key_password_env,
            str(base_dir),
        )
        self.connections = Connections.shared(shared_key, self.peer, opts.associations)
        self.store = StoreScu(self.connections)
        self.finder = Finder(self.connections)
        self.mover = (
            MoveScp(
                self.connections, str(opts.move_aet), opts.listen_port or 0, opts.listen_address
            )
            if opts.retrieve == "move"
            else None
        )
        self.ledger_path = (
            base_dir / opts.ledger_file
            if opts.ledger_file
            else base_dir / ".dicomsync" / "places" / f"{safe_component(key)}.ledger.sqlite"
        )
        self._ledger: Any = None
        self._lock = threading.Lock()
        self._closed = False
        # StudyInstanceUID -> (PatientID, SOP UIDs, SOP classes), least recently used first
        self._meta: OrderedDict[str, tuple[str, frozenset[str], tuple[str, ...]]] = OrderedDict()

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        where = f"{cls.kind} place {key!r}"
        opts = parse(DicomOptions, section, where)
        dopts.check(opts, where)
        return cls(key, opts, base_dir)

    def to_config(self) -> dict[str, Any]:
        o = self.opts
        section: dict[str, Any] = {
            "Kind": self.kind,
            "Host": o.host,
            "Port": o.port,
            "CalledAet": o.called_aet,
        }
        defaults = DicomOptions(host="", port=1, called_aet="")
        for name, attr in (
            ("CallingAet", "calling_aet"),
            ("Associations", "associations"),
            ("Timeout", "timeout"),
            ("MaxPduSize", "max_pdu_size"),
            ("Tls", "tls"),
            ("VerifyTls", "verify_tls"),
            ("CaBundle", "ca_bundle"),
            ("Cert", "cert"),
            ("Key", "key"),
            ("KeyPasswordEnv", "key_password_env"),
            ("Retrieve", "retrieve"),
            ("MoveAet", "move_aet"),
            ("ListenPort", "listen_port"),
            ("ListenAddress", "listen_address"),
            ("LedgerFile", "ledger_file"),
        ):
            value = getattr(o, attr)
            if value != getattr(defaults, attr):
                section[name] = value
        return section

    def describe(self) -> str:
        tls = " over TLS" if self.opts.tls else ""
        return f"DICOM node {self.peer.label}{tls} as {self.peer.calling_aet}"

    def check_environment(self) -> None:
        dopts.key_password(self.opts, f"{self.kind} place {self.key!r}")

    def probe(self) -> str:
        """C-ECHO, and how duplicates are checked: one line (raises the mapped error)."""
        with self.connections.slot():  # its own association: says exactly what failed
            seconds = self.peer.echo()
        line = f"C-ECHO {self.peer.label}: ok in {seconds * 1000:.0f} ms"
        if self.finder.supported():
            return f"{line}; duplicates checked by C-FIND"
        return (
            f"{line}; it answers no C-FIND: duplicates are judged by our record of what it "
            f"acknowledged ({self.ledger_path})"
        )

    # --- metadata cache -------------------------------------------------------------------
    def _remember(self, uid: str, meta: tuple[str, frozenset[str], tuple[str, ...]]) -> None:
        with self._lock:
            self._meta[uid] = meta
            self._meta.move_to_end(uid)
            while len(self._meta) > META_CACHE:
                self._meta.popitem(last=False)

    def _recall(self, uid: str) -> tuple[str, frozenset[str], tuple[str, ...]] | None:
        with self._lock:
            return self._meta.get(uid)

    # --- source ---------------------------------------------------------------------------
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        query = query or StudyQuery(self.key)
        if not self.finder.supported():
            raise RemoteRejected(
                f"{self.peer.label} answers no C-FIND: it can receive studies, not list them"
            )
        keys: dict[str, Any] = {"PatientID": "", "StudyInstanceUID": ""}
        patient = query.patient if query.study is not None else ""
        if patient and not (_DICOM_WILDCARDS & set(patient)) and safe_component(patient) == patient:
            keys["PatientID"] = patient
        refs = []
        for ds in self.finder.find("STUDY", keys):
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            if not uid:
                continue
            pid = str(ds.get("PatientID", "") or "").rstrip()
            old = self._recall(uid)
            self._remember(uid, (pid, *old[1:]) if old else (pid, frozenset(), ()))
            refs.append(StudyRef(self.key, safe_component(pid), safe_component(uid), handle=uid))
        for ref in sorted(set(refs)):
            if query.matches(ref.patient, ref.study):
                yield ref

    def _study_uid(self, ref: StudyRef) -> str:
        if ref.handle:
            return ref.handle
        for candidate in self.studies(StudyQuery(self.key, ref.patient, ref.study)):
            return candidate.handle
        raise NotFound(f"{ref}: no such study at {self.peer.label}")

    def identity(self, ref: StudyRef) -> StudyIdentity:
        uid = self._study_uid(ref)
        found = self.finder.find(
            "IMAGE", {"StudyInstanceUID": uid, "SOPInstanceUID": "", "SOPClassUID": ""}
        )
        sops = frozenset(str(d.SOPInstanceUID) for d in found if d.get("SOPInstanceUID"))
        classes = tuple(dict.fromkeys(str(d.SOPClassUID) for d in found if d.get("SOPClassUID")))
        meta = self._recall(uid)
        pid = meta[0] if meta else ""
        self._remember(uid, (pid, sops, classes))
        return StudyIdentity(study_uid=uid, sop_uids=sops, patient_id=pid)

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        uid = self._study_uid(ref)
        meta = self._recall(uid)
        if meta is None or not meta[1]:
            self.identity(ref)
            meta = self._recall(uid)
        assert meta is not None
        wanted = None if only is None or meta[1] <= set(only) else frozenset(only)
        if self.mover is not None:
            return self.mover.instances(uid, wanted)
        return get_instances(self.connections, uid, meta[2], wanted)

    # --- destination ----------------------------------------------------------------------
    def _ledger_if_needed(self) -> Any:
        """The ledger, when the peer answers no C-FIND; else None."""
        if self.finder.supported():
            return None
        with self._lock:
            if self._ledger is None:
                from dicomsync.sinks.base import Ledger

                try:
                    self._ledger = Ledger(self.ledger_path)
                except DicomSyncError as exc:
                    raise StorageError(f"{self.kind} place {self.key!r}: {exc}") from None
            return self._ledger

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        ledger = self._ledger_if_needed()
        if ledger is not None:
            return frozenset(ledger.known(identity.sop_uids))
        held: set[str] = set()
        for uid in identity.all_study_uids:
            found = self.finder.find("IMAGE", {"StudyInstanceUID": uid, "SOPInstanceUID": ""})
            held.update(str(d.SOPInstanceUID) for d in found if d.get("SOPInstanceUID"))
        return frozenset(held) & identity.sop_uids

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        """C-STORE every instance; an instance the peer refuses fails the study (after the
        others were sent) with the peer's reason, and a lost association stops it. The
        raised error carries the number stored as ``delivered``."""
        ledger = self._ledger_if_needed()
        result = self.store.store(instances)
        if ledger is not None and result.stored:
            try:
                ledger.add(result.stored)
            except DicomSyncError as exc:
                raise StorageError(f"{self.kind} place {self.key!r}: {exc}") from None
        error: DicomSyncError | None = result.lost
        if error is None and result.refused:
            first = next(iter(result.refused.values()))
            n = len(result.refused)
            error = RemoteRejected(
                f"{n} of {n + len(result.stored)} instances refused: {first}",
                retryable=all(e.retryable for e in result.refused.values()),
            )
        if error is not None:
            error.delivered = len(result.stored)  # type: ignore[attr-defined]
            raise error
        return Receipt(len(result.stored), self.describe())

    def close(self) -> None:
        with self._lock:
            closed, self._closed = self._closed, True
        if not closed:
            self.connections.unshare()
        if self.mover is not None:
            self.mover.close()
        with self._lock:
            ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger.close()
