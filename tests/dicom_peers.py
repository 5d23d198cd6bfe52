"""DICOM peers for the ``dicom`` place's tests and bench: a pynetdicom SCP we control, and
dcmtk's ``storescp``; plus helpers for an Orthanc that is a full DICOM peer.

``ScpPeer`` runs in this process (a thread): it accepts the presentation contexts it is
told to (every storage SOP class with every syntax by default, or only some), answers
C-STORE with a chosen status, optionally answers C-FIND at IMAGE/STUDY level from what
it stored, and counts every C-STORE it received per SOP UID (duplicates included),
which is how tests see "exactly once" on the wire.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import StoragePresentationContexts

from orthanc_server import OrthancProcess, free_port

VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass
class ScpPeer:
    aet: str = "TESTSCP"
    port: int = 0
    contexts: dict[str, list[str]] | None = None  # SOP class -> syntaxes; None: all storage
    find: bool = False
    verification: bool = True
    require_called_aet: bool = False  # reject an association that calls another AET
    max_pdu: int = 16382  # the largest PDU it receives (Orthanc: 16384)
    keep_raw: bool = False  # keep each dataset's bytes as received, in ``raw``
    raw: dict[str, bytes] = field(default_factory=dict)
    status: Callable[[Dataset], int] = lambda ds: 0x0000
    received: Counter[str] = field(default_factory=Counter)
    stored: dict[str, tuple[str, str]] = field(default_factory=dict)  # SOP -> (study, class)
    syntaxes: dict[str, str] = field(default_factory=dict)  # SOP -> transfer syntax received
    open_now: int = 0
    most_open: int = 0  # the most associations open at once
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        sop = str(ds.SOPInstanceUID)
        code = self.status(ds)
        with self._lock:
            self.received[sop] += 1
            if code == 0 or 0xB000 <= code <= 0xBFFF:
                self.stored[sop] = (str(ds.StudyInstanceUID), str(ds.SOPClassUID))
                self.syntaxes[sop] = str(event.context.transfer_syntax)
                if self.keep_raw:
                    self.raw[sop] = event.encoded_dataset(include_meta=False)
        return code

    def _on_open(self, event: Any) -> None:
        with self._lock:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)

    def _on_close(self, event: Any) -> None:
        with self._lock:
            self.open_now -= 1

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        q = event.identifier
        level = str(q.QueryRetrieveLevel)
        with self._lock:
            items = list(self.stored.items())
        study = str(q.get("StudyInstanceUID", "") or "")
        if level == "STUDY":
            for uid in sorted({s for _, (s, _) in items if not study or s == study}):
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = uid
                ds.PatientID = ""
                yield 0xFF00, ds
        else:
            for sop, (uid, sop_class) in items:
                if study and uid != study:
                    continue
                ds = Dataset()
                ds.QueryRetrieveLevel = level
                ds.StudyInstanceUID = uid
                ds.SOPInstanceUID = sop
                ds.SOPClassUID = sop_class
                yield 0xFF00, ds
        yield 0x0000, None

    def start(self) -> ScpPeer:
        ae = AE(ae_title=self.aet)
        if self.verification:
            ae.add_supported_context(VERIFICATION)
        if self.find:
            ae.add_supported_context(STUDY_FIND)
        if self.contexts is None:
            for cx in StoragePresentationContexts:
                ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES[:])
        else:
            for sop, syntaxes in self.contexts.items():
                ae.add_supported_context(sop, syntaxes)
        ae.maximum_associations = 32
        ae.require_called_aet = self.require_called_aet
        ae.maximum_pdu_size = self.max_pdu
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class StoreScp:
    """dcmtk's ``storescp``: stores every instance as <SOP UID>.dcm, answers no C-FIND."""

    def __init__(self, folder: Path, *args: str, aet: str = "STORESCP") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScp:
        self.proc = subprocess.Popen(
            [
                "storescp",
                "-od",
                str(self.folder),
                "-uf",
                "-aet",
                self.aet,
                *self.args,
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def files(self) -> dict[str, int]:
        """File name -> mtime_ns of what storescp wrote."""
        return {p.name: p.stat().st_mtime_ns for p in self.folder.iterdir() if p.is_file()}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


MOVE_AET = "DSMOVE"


def dicom_orthanc(workdir: Path, name: str, move_port: int = 0, **kw: Any) -> OrthancProcess:
    """An Orthanc that is a full DICOM peer: C-FIND, C-GET and C-MOVE allowed for any AE,
    with our C-MOVE SCP (``MOVE_AET`` at 127.0.0.1:``move_port``) as a modality."""
    config: dict[str, Any] = {
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        **kw.pop("config", {}),
    }
    if move_port:
        config["DicomModalities"] = {"dsmove": [MOVE_AET, "127.0.0.1", move_port]}
    return OrthancProcess(workdir, name, config=config, **kw)


def dicom_section(server: OrthancProcess | ScpPeer | StoreScp, **extra: Any) -> dict[str, Any]:
    """A ``dicom`` place section for one of these peers."""
    if isinstance(server, OrthancProcess):
        port, aet = server.dicom_port, server.full_config()["DicomAet"]
    else:
        port, aet = server.port, server.aet
    return {"Kind": "dicom", "Host": "127.0.0.1", "Port": port, "CalledAet": aet, **extra}
