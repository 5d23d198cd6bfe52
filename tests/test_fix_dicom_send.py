"""C-STORE failures part-way never leave a half-sent association in the pool.

- the file ends early while it is sent (a folder file rewritten): that instance fails
  with its own error, the association is aborted, and the next instance reaches the
  peer intact, byte for byte (it was merged into the unfinished data set before);
- a source that cannot be read at all fails that instance only, not the whole send;
- a peer that stops reading: the send ends within a few ``Timeout`` (it blocked for
  ever: pynetdicom leaves the socket without a timeout after connecting), as a lost,
  retryable association.
"""

from __future__ import annotations

import builtins
import io
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset

from dicomsync.errors import StorageError, Unreachable
from dicomsync.places.base import Instance
from dicomsync.places.dicom import payload
from dicomsync.places.dicom.association import Peer
from dicomsync.places.dicom.connections import Connections
from dicomsync.places.dicom.store import StoreScu

from dicomdata import data_dir
from orthanc_server import free_port

CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"

CT_SMALL = data_dir() / "images" / "CT_small.dcm"


def _write(path: Path, sop: str, pixel_bytes: int, fill: bytes) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = fill * pixel_bytes
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def _instance(path: Path) -> Instance:
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return Instance(sop, path.name, path.read_bytes, path=path)


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


class _Scp:
    """A Storage SCP keeping each dataset as received; ``stall`` stops it reading."""

    def __init__(self, stall: threading.Event | None = None) -> None:
        self.port = free_port()
        self.received: dict[str, bytes] = {}
        ae = AE(ae_title="SCP")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        handlers: list[Any] = [(evt.EVT_C_STORE, self.on_store)]
        if stall is not None:

            def on_pdu(event: Any) -> None:  # on the DUL thread: stop reading
                if type(event.pdu).__name__ == "P_DATA_TF":
                    stall.wait(60)

            handlers.append((evt.EVT_PDU_RECV, on_pdu))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def on_store(self, event: Any) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    def place(self, timeout: float = 5, size: int = 1) -> StoreScu:
        peer = Peer("scp", "127.0.0.1", self.port, "SCP", "US", timeout, 16384)
        return StoreScu(Connections(peer, size))


def test_a_file_ending_early_fails_alone_and_the_next_arrives_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = _write(tmp_path / "short.dcm", "1.2.826.0.1.3680043.8.498.1", 3 << 20, b"\1")
    whole = _write(tmp_path / "whole.dcm", "1.2.826.0.1.3680043.8.498.2", 1 << 20, b"\2")
    whole_bytes = _dataset_bytes(whole)

    class Short(io.FileIO):  # the file is 2 MB shorter than when it was measured
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > (1 << 20) + 4096:
                return b""
            return super().read(n)

    real_open = builtins.open
    monkeypatch.setattr(
        payload,
        "open",
        lambda p, m="r", *a, **k: (
            Short(p, "r") if str(p) == str(short) else real_open(p, m, *a, **k)
        ),
        raising=False,
    )
    scp = _Scp()
    store = scp.place(size=1)  # one association: the second instance goes where the first did
    try:
        result = store.store([_instance(short), _instance(whole)])
        again = store.store([_instance(whole)])  # on the pooled association, if any
    finally:
        store.connections.close()
        assert scp.server is not None
        scp.server.shutdown()
    assert scp.received["1.2.826.0.1.3680043.8.498.2"] == whole_bytes
    assert again.stored == ["1.2.826.0.1.3680043.8.498.2"]
    assert result.lost is None
    assert result.stored == ["1.2.826.0.1.3680043.8.498.2"]
    error = result.refused["1.2.826.0.1.3680043.8.498.1"]
    assert isinstance(error, StorageError) and "ended early" in str(error)
    assert scp.received["1.2.826.0.1.3680043.8.498.2"] == whole_bytes
    assert "1.2.826.0.1.3680043.8.498.1" not in scp.received


def test_an_unreadable_source_fails_that_instance_only(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.dcm", "1.2.826.0.1.3680043.8.498.3", 4096, b"\3")

    def unreadable() -> bytes:
        raise PermissionError(13, "Permission denied")

    gone = Instance("1.2.826.0.1.3680043.8.498.4", "gone.dcm", unreadable, path=None)
    scp = _Scp()
    store = scp.place(size=1)
    try:
        result = store.store([gone, _instance(whole)])
    finally:
        store.connections.close()
        assert scp.server is not None
        scp.server.shutdown()
    assert result.lost is None
    assert result.stored == ["1.2.826.0.1.3680043.8.498.3"]
    assert isinstance(result.refused["1.2.826.0.1.3680043.8.498.4"], StorageError)


def test_a_peer_that_stops_reading_is_a_lost_association_within_the_timeout(
    tmp_path: Path,
) -> None:
    big = _write(tmp_path / "big.dcm", "1.2.826.0.1.3680043.8.498.5", 40 << 20, b"\0")
    stall = threading.Event()
    scp = _Scp(stall)
    store = scp.place(timeout=1.5, size=1)
    done: dict[str, Any] = {}

    def go() -> None:
        start = time.monotonic()
        done["result"] = store.store([_instance(big)])
        done["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=go, daemon=True)
    sender.start()
    sender.join(30)
    blocked = sender.is_alive()
    stall.set()
    sender.join(30)
    store.connections.close()
    assert scp.server is not None
    scp.server.shutdown()
    assert not blocked, "the send blocked past 20 Timeouts"
    lost = done["result"].lost
    assert isinstance(lost, Unreachable) and lost.retryable
    assert done["seconds"] < 15
