"""The C-MOVE Storage SCP takes only the moved study's instances, only from the peer.

A stranger (any other calling AE title) storing into our SCP during a move is refused
at association; the peer itself storing an instance of another study is refused with a
failure status; neither is yielded as the moved study's. ``Retrieve: move`` with
``Tls`` is one configuration error (the SCP is plain TCP).
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt

from dicomsync.errors import ConfigError
from dicomsync.places.base import PLACES
from dicomsync.places.dicom.association import Peer
from dicomsync.places.dicom.connections import Connections
from dicomsync.places.dicom.retrieve import MoveScp

from dicomdata import data_dir
from orthanc_server import free_port

CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"
MRImageStorage = "1.2.840.10008.5.1.4.1.1.4"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Q/R - MOVE

DATA = data_dir() / "images"
STUDY = "1.2.3.4.5"


def _instance(name: str, study: str, sop: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(DATA / name)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    return ds


def test_move_scp_refuses_strangers_and_other_studies() -> None:
    arch_port, our_port = free_port(), free_port()
    stranger_done = threading.Event()
    statuses: dict[str, int] = {}

    def on_move(event: Any) -> Any:  # the archive: other study, then the moved study
        yield ("127.0.0.1", our_port)
        yield 2
        stranger_done.wait(10)
        yield 0xFF00, _instance("MR_small.dcm", "9.9.9.9", "1.2.3.4.5.98")
        yield 0xFF00, _instance("MR_small.dcm", STUDY, "1.2.3.4.5.99")

    arch = AE(ae_title="ARCH")
    arch.add_supported_context(MOVE)
    arch.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
    srv = arch.start_server(
        ("127.0.0.1", arch_port), block=False, evt_handlers=[(evt.EVT_C_MOVE, on_move)]
    )
    peer = Peer(
        key="arch",
        host="127.0.0.1",
        port=arch_port,
        called_aet="ARCH",
        calling_aet="US",
        timeout=5,
        max_pdu=16384,
    )
    scp = MoveScp(Connections(peer, 2), "US", our_port, "127.0.0.1")
    got: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for inst in scp.instances(STUDY, None):
                ds = pydicom.dcmread(io.BytesIO(inst.read()))
                got.append((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while scp._server is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        ct = pydicom.dcmread(DATA / "CT_small.dcm")
        ct.StudyInstanceUID = STUDY  # even of the very study being moved
        for aet in ("ANYONE", "US"):
            evil = AE(ae_title=aet)
            evil.add_requested_context(CTImageStorage, ct.file_meta.TransferSyntaxUID)
            a = evil.associate("127.0.0.1", our_port, ae_title="US")
            statuses[aet] = int(a.send_c_store(ct).Status) if a.is_established else -1
            a.release() if a.is_established else a.abort()
    finally:
        stranger_done.set()
        reader.join(20)
        scp.close()
        assert srv is not None
        srv.shutdown()
    assert statuses == {"ANYONE": -1, "US": -1}  # strangers' associations rejected
    assert got == [(STUDY, "1.2.3.4.5.99")]  # the other study's instance: not yielded
    # the archive reports the refused sub-operation: a warning, or a failure raised
    assert not errors or "C-MOVE" in str(errors[0])


def test_move_scp_refuses_another_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The calling AE title is the peer's, the address is not: the C-STORE is refused."""
    from dicomsync.places.dicom import retrieve

    peer = Peer("p", "127.0.0.1", 1, "ARCH", "US", 5, 16384)
    scp = MoveScp(Connections(peer, 1), "US", 1)
    scp._current = retrieve._Spool(STUDY, None, strict=True)
    scp._senders = frozenset({"10.1.2.3"})

    class Req:
        address = "127.0.0.1"

    class Assoc:
        requestor = Req()

    class Event:
        assoc = Assoc()

    status = scp._on_store(Event())
    assert int(getattr(status, "Status", status)) == 0xC000
    assert scp._current.arrived.empty()


def test_move_with_tls_is_one_config_error(tmp_path: Path) -> None:
    section = {
        "Kind": "dicom",
        "Host": "pacs.example",
        "Port": 11112,
        "CalledAet": "PACS",
        "Tls": True,
        "Retrieve": "move",
        "MoveAet": "US",
        "ListenPort": 11113,
    }
    with pytest.raises(ConfigError) as info:
        PLACES.build("pacs", section, tmp_path)
    assert "Retrieve move" in str(info.value) and "Tls" in str(info.value)
    del section["Tls"]
    PLACES.build("pacs", section, tmp_path).close()
