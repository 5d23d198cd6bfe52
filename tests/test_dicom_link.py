"""``dicom.link.Link``, our thread-free association: against real Orthanc and storescp, and
against a hostile fake peer that accepts the association and then misbehaves.

- every misbehaviour (a 4 GB PDU length, an unknown PDU type, an A-ABORT or A-RELEASE-RQ
  mid-operation, silence, an answer to another message ID or on a context we did not
  propose) is one clear, retryable error and a lost association, within the Timeout;
- pooled associations run no thread: the process's thread count does not grow with
  them, and four idle ones cost (almost) no CPU;
- an instance in memory is sent without a temporary file, its file meta parsed once;
- the C-STORE command we encode is byte for byte pynetdicom's, and our file meta parser
  finds what pydicom finds.
"""

from __future__ import annotations

import functools
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from dicomsync.errors import Unreachable
from dicomsync.places.base import Instance
from dicomsync.places.dicom import payload
from dicomsync.places.dicom.association import Peer
from dicomsync.places.dicom.connections import Connections
from dicomsync.places.dicom.link import Link, Lost, parse_command, store_command
from dicomsync.places.dicom.store import StoreScu

from dicom_peers import StoreScp, dicom_orthanc
from dicomdata import data_dir
from orthanc_server import OrthancProcess

DATA = data_dir()
CT_SMALL = DATA / "images" / "CT_small.dcm"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _instance_bytes(sop: str, pixel_bytes: int = 4096) -> bytes:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = b"\1" * pixel_bytes
    ds["PixelData"].VR = "OW"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _in_memory(sop: str, pixel_bytes: int = 4096) -> Instance:
    blob = _instance_bytes(sop, pixel_bytes)
    return Instance(sop, f"{sop}.dcm", functools.partial(bytes, blob))


# --- a hostile peer -------------------------------------------------------------------
def _pdv(cx: int, control: int, data: bytes) -> bytes:
    return struct.pack(">BBLLBB", 4, 0, len(data) + 6, len(data) + 2, cx, control) + data


class FakePeer:
    """Accepts every association (each proposed context with its first syntax), reads one
    whole DIMSE request, then does ``then(conn, cx, msg_id)``."""

    def __init__(self, then: Callable[[socket.socket, int, int], None], max_length: int = 16384):
        self.then = then
        self.max_length = max_length
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        head = self._exact(conn, 6)
        kind, _, length = struct.unpack(">BBL", head)
        return kind, self._exact(conn, length)

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = conn.recv(n - len(out))
            if not part:
                raise ConnectionError("closed")
            out += part
        return out

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            kind, body = self._read_pdu(conn)
            rq = A_ASSOCIATE_RQ()
            rq.decode(struct.pack(">BBL", kind, 0, len(body)) + body)
            p = rq.to_primitive()
            ac = A_ASSOCIATE()
            ac.application_context_name = p.application_context_name
            ac.calling_ae_title, ac.called_ae_title = p.calling_ae_title, p.called_ae_title
            ac.result = 0x00
            results = []
            for proposed in p.presentation_context_definition_list:
                out = PresentationContext()
                out.context_id = proposed.context_id
                out.abstract_syntax = proposed.abstract_syntax
                out.transfer_syntax = [proposed.transfer_syntax[0]]
                out.result = 0
                results.append(out)
            ac.presentation_context_definition_results_list = results
            length = MaximumLengthNotification()
            length.maximum_length_received = self.max_length
            ac.user_information = [length]
            pdu = A_ASSOCIATE_AC()
            pdu.from_primitive(ac)
            conn.sendall(pdu.encode())
            while True:  # one request: command, then the dataset's last fragment
                kind, body = self._read_pdu(conn)
                if kind != 4:
                    return
                cx, control = body[4], body[5]
                if control == 0x03:
                    command = parse_command(body[6:])
                    msg_id = struct.unpack("<H", command[0x0110])[0]
                if control == 0x02 or (control == 0x03 and command[0x0800] == b"\x01\x01"):
                    break
            self.then(conn, cx, msg_id)
        except (OSError, ConnectionError):
            pass

    def stop(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


def _store_rsp(msg_id: int, sop: str = "1.2.3", status: int = 0) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return encode(msg.command_set, True, True) or b""


def _no_status(msg_id: int) -> bytes:
    """A C-STORE-RSP command set without its Status element."""
    body = b"".join(
        struct.pack("<HHLH", 0, e, 2, v)
        for e, v in ((0x100, 0x8001), (0x120, msg_id), (0x800, 0x101))
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _answer_ok(conn: socket.socket, cx: int, msg_id: int) -> None:
    conn.sendall(_pdv(cx, 0x03, _store_rsp(msg_id)))
    time.sleep(5)


HOSTILE: dict[str, tuple[Callable[[socket.socket, int, int], None], str]] = {
    "a 4 GB PDU length": (
        lambda c, cx, i: c.sendall(struct.pack(">BBL", 4, 0, 0xFFFFFFFF) + b"\0" * 64),
        "over our limit",
    ),
    "an unknown PDU type": (lambda c, cx, i: c.sendall(b"\x55\0\0\0\0\4abcd"), "unknown PDU"),
    "an A-ABORT mid-operation": (
        lambda c, cx, i: c.sendall(b"\x07\0\0\0\0\4\0\0\2\0"),
        "aborted",
    ),
    "an A-RELEASE-RQ mid-operation": (
        lambda c, cx, i: c.sendall(b"\x05\0\0\0\0\4\0\0\0\0"),
        "release",
    ),
    "silence": (lambda c, cx, i: time.sleep(10), "no answer within"),
    "an answer to another message": (
        lambda c, cx, i: c.sendall(_pdv(cx, 0x03, _store_rsp(i + 7))),
        "an answer to message",
    ),
    "an answer on a context we did not propose": (
        lambda c, cx, i: c.sendall(_pdv(201, 0x03, _store_rsp(i))),
        "on context 201",
    ),
    "a closed connection": (lambda c, cx, i: c.close(), "closed the connection"),
    "an answer without a status": (
        lambda c, cx, i: c.sendall(_pdv(cx, 0x03, _no_status(i))),
        "without a status",
    ),
}


def _fake_scu(fake: FakePeer, timeout: float = 1.5) -> StoreScu:
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", timeout, 16384)
    return StoreScu(Connections(peer, 1))


def test_the_fake_peer_stores_when_it_behaves() -> None:
    fake = FakePeer(_answer_ok)
    store = _fake_scu(fake)
    try:
        sop = generate_uid()
        result = store.store([_in_memory(sop)])
    finally:
        store.connections.close()
        fake.stop()
    assert result.stored == [sop] and result.lost is None


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_peer_is_one_clear_retryable_error_and_a_lost_association(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    behaviour, reason = HOSTILE[case]
    fake = FakePeer(behaviour)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 1.5, 16384)
    try:
        link = Link.open(peer, [_storage_context()])
        start = time.monotonic()
        blob = _instance_bytes(generate_uid())
        meta = payload.parse_meta(blob)
        assert meta is not None
        with pytest.raises(Lost) as err:
            link.store(1, CT, meta[1], [memoryview(blob)[meta[3] :]], len(blob) - meta[3])
        assert time.monotonic() - start < 5  # within a few Timeouts, never a hang
        assert reason in err.value.reason
        assert not link.is_established and not link.alive()
        # through the C-STORE SCU: one line, retryable; the association is not pooled
        store = _fake_scu(fake)
        result = store.store([_in_memory(generate_uid())])
        assert isinstance(result.lost, Unreachable) and result.lost.retryable
        assert "aborted the association or did not answer" in str(result.lost)
        assert reason in str(result.lost)
        assert not store.connections._idle
        store.connections.close()
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("an A-ABORT mid-operation", "aborted"),
        ("an answer to another message", "an unexpected command 0x8001"),  # a C-STORE-RSP
        ("silence", "no answer within 1.5 s"),
    ],
)
def test_a_hostile_peer_during_c_find_is_a_lost_association(case: str, reason: str) -> None:
    from dicomsync.places.dicom.find import Finder

    behaviour, _ = HOSTILE[case]
    fake = FakePeer(behaviour)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 1.5, 16384)
    conns = Connections(peer, 1)
    try:
        with pytest.raises(Unreachable) as err:
            Finder(conns).find("IMAGE", {"StudyInstanceUID": "1.2.3", "SOPInstanceUID": ""})
        assert err.value.retryable
        assert "C-FIND IMAGE: the peer aborted the association or did not answer" in str(err.value)
        assert reason in str(err.value)
        assert not conns._idle and conns._open == 0
    finally:
        conns.close()
        fake.stop()


def test_a_converted_instance_is_encoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer taking CT only in Implicit VR: the Explicit VR instance is decoded and
    encoded once, and arrives in Implicit VR."""
    from dicomsync.places.dicom import store as store_module

    from dicom_peers import ScpPeer

    encodes: list[int] = []
    real = store_module.encode

    def counted(*args: Any) -> Any:
        encodes.append(1)
        return real(*args)

    monkeypatch.setattr(store_module, "encode", counted)
    scp = ScpPeer(contexts={CT: ["1.2.840.10008.1.2"]}, find=True).start()
    try:
        peer = Peer("s", "127.0.0.1", scp.port, scp.aet, "US", 10, 16384)
        store = StoreScu(Connections(peer, 1))
        sops = [generate_uid() for _ in range(3)]
        result = store.store([_in_memory(s) for s in sops])
        store.connections.close()
    finally:
        scp.stop()
    assert result.lost is None and sorted(result.stored) == sorted(sops)
    assert len(encodes) == 3
    assert {scp.syntaxes[s] for s in sops} == {"1.2.840.10008.1.2"}


def test_a_peer_maximum_length_too_small_for_a_pdv_is_refused_at_once() -> None:
    from dicomsync.errors import RemoteRejected

    fake = FakePeer(_answer_ok, max_length=6)  # no room for one byte of data per PDU
    store = _fake_scu(fake)
    try:
        result = store.store([_in_memory(generate_uid())])
    finally:
        store.connections.close()
        fake.stop()
    refused = list(result.refused.values())
    assert len(refused) == 1 and isinstance(refused[0], RemoteRejected)
    assert "maximum PDU length 6 is too small" in str(refused[0])


def test_an_idle_association_the_peer_released_is_not_reused() -> None:
    def answer_then_release(conn: socket.socket, cx: int, msg_id: int) -> None:
        conn.sendall(_pdv(cx, 0x03, _store_rsp(msg_id)))
        time.sleep(0.1)
        conn.sendall(b"\x05\0\0\0\0\4\0\0\0\0")  # A-RELEASE-RQ while we are idle
        time.sleep(5)

    fake = FakePeer(answer_then_release)
    store = _fake_scu(fake)
    try:
        assert store.store([_in_memory(generate_uid())]).lost is None
        time.sleep(0.5)
        pooled = store.connections.acquire()
        assert pooled.uses == 0  # a new association, not the released one
        assert len(fake.conns) == 2
        store.connections.give(pooled)
    finally:
        store.connections.close()
        fake.stop()


def _storage_context() -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = CT
    cx.transfer_syntax = [ExplicitVRLittleEndian]
    return cx


def test_a_pdu_length_over_our_limit_is_never_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4 GB length is refused from the header alone: nothing waits for 4 GB."""
    behaviour, _ = HOSTILE["a 4 GB PDU length"]
    fake = FakePeer(behaviour)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 30, 16384)
    try:
        link = Link.open(peer, [_storage_context()])
        assert link.limit < 1 << 20
        start = time.monotonic()
        with pytest.raises(Lost):
            link.store(1, CT, "1.2.3", [b"\0\0"], 2)
        assert time.monotonic() - start < 5  # not waiting out the 30 s Timeout
    finally:
        fake.stop()


# --- real peers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    server = dicom_orthanc(tmp_path_factory.mktemp("link"), "b").start()
    yield server
    server.stop()


def _orthanc_peer(server: OrthancProcess) -> Peer:
    aet = server.full_config()["DicomAet"]
    return Peer("b", "127.0.0.1", server.dicom_port, aet, "US", 10, 262144)


def _threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


@pytest.mark.orthanc
def test_pooled_associations_run_no_thread_and_cost_no_cpu_when_idle(
    orthanc_b: OrthancProcess,
) -> None:
    peer = _orthanc_peer(orthanc_b)
    conns = Connections(peer, 4)
    before = _threads()
    pooled = [conns.acquire() for _ in range(4)]
    try:
        assert all(p.link.is_established for p in pooled)
        assert _threads() == before  # no reactor threads per association
        start = time.process_time()
        time.sleep(1.0)
        idle_cpu = time.process_time() - start
        assert idle_cpu < 0.05, f"4 idle associations used {idle_cpu:.3f} s of CPU in 1 s"
        for p in pooled:
            p.link.echo(p.link.context_id("1.2.840.10008.1.1") or 0)
    finally:
        for p in pooled:
            conns.give(p)
        conns.close()


@pytest.mark.orthanc
def test_in_memory_instances_are_sent_without_a_temporary_file_and_one_meta_parse(
    orthanc_b: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_temp(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an instance in memory was spooled to a file")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_temp)
    parses: list[int] = []
    real = payload.parse_meta

    def counted(data: Any) -> Any:
        parses.append(1)
        return real(data)

    monkeypatch.setattr(payload, "parse_meta", counted)
    monkeypatch.setattr(pydicom.filereader, "read_file_meta_info", no_temp)
    peer = _orthanc_peer(orthanc_b)
    store = StoreScu(Connections(peer, 2))
    sops = [generate_uid() for _ in range(6)]
    try:
        result = store.store([_in_memory(s, 300_000) for s in sops])
    finally:
        store.connections.close()
    assert result.lost is None and sorted(result.stored) == sorted(sops)
    assert len(parses) == len(sops)
    held = {
        orthanc_b.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
        for i in orthanc_b.get("/instances")
    }
    assert set(sops) <= held


@pytest.mark.orthanc
def test_find_and_echo_over_a_link_against_orthanc(orthanc_b: OrthancProcess) -> None:
    peer = _orthanc_peer(orthanc_b)
    assert peer.echo() < 5
    study = generate_uid()
    store = StoreScu(Connections(peer, 1))
    sops = []
    for _ in range(3):
        ds = pydicom.dcmread(BytesIO(_instance_bytes(generate_uid())))
        ds.StudyInstanceUID = study
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
        one = Instance(sops[-1], "x", functools.partial(bytes, out.getvalue()))
        assert store.store([one]).stored == [sops[-1]]
    from dicomsync.places.dicom.find import Finder

    finder = Finder(store.connections)
    found = finder.find("IMAGE", {"StudyInstanceUID": study, "SOPInstanceUID": ""})
    store.connections.close()
    assert sorted(str(d.SOPInstanceUID) for d in found) == sorted(sops)


def test_storescp_receives_over_a_link(tmp_path: Path) -> None:
    scp = StoreScp(tmp_path / "scp").start()
    try:
        peer = Peer("s", "127.0.0.1", scp.port, scp.aet, "US", 10, 262144)
        store = StoreScu(Connections(peer, 2))
        sops = [generate_uid() for _ in range(4)]
        result = store.store([_in_memory(s, 100_000) for s in sops])
        store.connections.close()
        assert result.lost is None and sorted(result.stored) == sorted(sops)
        assert len(scp.files()) == 4
    finally:
        scp.stop()


# --- encodings ------------------------------------------------------------------------
@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", generate_uid(), generate_uid()[:63]])
def test_our_c_store_command_is_pynetdicoms(sop: str) -> None:
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CT, sop
    req.DataSet = BytesIO(b"\0")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    assert store_command(7, CT, sop) == encode(msg.command_set, True, True)


def test_our_file_meta_parser_finds_what_pydicom_finds() -> None:
    files = [p for p in sorted(DATA.rglob("*.dcm"))[:60] if p.stat().st_size < 8 << 20]
    checked = 0
    for f in files:
        try:
            meta = pydicom.filereader.read_file_meta_info(f)
            _, offset = split_dataset(f)
        except Exception:
            continue
        keys = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        if not all(k in meta for k in keys):
            continue
        assert payload.parse_meta(f.read_bytes()) == (
            *(str(meta[k].value) for k in keys),
            offset,
        ), f
        checked += 1
    assert checked >= 5
    assert payload.parse_meta(b"\0" * 200) is None


@pytest.mark.orthanc
def test_a_tls_link_stores_finds_and_is_reused_when_idle(tmp_path: Path) -> None:
    import ssl

    from test_dicom_tls import make_pki, tls_orthanc

    from dicomsync.places.dicom.find import Finder

    pki = make_pki(tmp_path / "pki")
    server = tls_orthanc(tmp_path / "o", "tls", pki).start()

    def context() -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        return ctx

    try:
        aet = server.full_config()["DicomAet"]
        peer = Peer("t", "127.0.0.1", server.dicom_port, aet, "US", 10, 262144, context)
        conns = Connections(peer, 1)
        store = StoreScu(conns)
        sops = [generate_uid() for _ in range(3)]
        assert sorted(store.store([_in_memory(s, 200_000) for s in sops]).stored) == sorted(sops)
        time.sleep(0.5)  # idle: TLS records (session tickets) must not make it look dead
        pooled = conns.acquire()
        assert pooled.uses >= 1 and not pooled.link._plain
        conns.give(pooled)
        found = Finder(conns).find("IMAGE", {"SOPInstanceUID": sops[0]})
        assert [str(d.SOPInstanceUID) for d in found] == [sops[0]]
        conns.close()
    finally:
        server.stop()


# --- bounds on what a peer may send, and instances that fail alone (review fixes) --------
def _find_rsp(msg_id: int, status: int, dataset: bool) -> bytes:
    """A C-FIND-RSP command set; ``dataset``: an identifier follows."""
    fields = ((0x100, 0x8020), (0x120, msg_id), (0x800, 1 if dataset else 0x101), (0x900, status))
    body = b"".join(struct.pack("<HHLH", 0, e, 2, v) for e, v in fields)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _query() -> pydicom.Dataset:
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    return query


_IDENT = encode(_query(), False, True) or b""


def _find_context() -> PresentationContext:
    from dicomsync.places.dicom.association import STUDY_FIND

    cx = PresentationContext()
    cx.abstract_syntax = STUDY_FIND
    cx.transfer_syntax = [ExplicitVRLittleEndian]
    return cx


def _pending_forever(pause: float) -> Callable[[socket.socket, int, int], None]:
    def then(conn: socket.socket, cx: int, msg_id: int) -> None:
        for _ in range(100):  # long enough to outlast every bound below
            conn.sendall(_pdv(cx, 0x03, _find_rsp(msg_id, 0xFF00, True)) + _pdv(cx, 2, _IDENT))
            time.sleep(pause)

    return then


@pytest.mark.parametrize(
    ("bound", "value", "pause", "reason"),
    [
        ("MAX_ANSWERS", 20, 0.01, "more than 20 C-FIND answers"),
        ("FIND_SECONDS", 0.5, 0.1, "C-FIND answers for more than 1 s"),
    ],
)
def test_endless_pending_c_find_answers_lose_the_association_within_a_bound(
    bound: str, value: float, pause: float, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pending answer comes within Timeout, but there is no end to them: the query
    stops at a count or an overall time, the association is lost, its slot given back."""
    from dicomsync.places.dicom import link as link_module
    from dicomsync.places.dicom.find import Finder

    monkeypatch.setattr(link_module, bound, value)
    fake = FakePeer(_pending_forever(pause))
    conns = Connections(Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 1.0, 16384), 1)
    try:
        start = time.monotonic()
        with pytest.raises(Unreachable) as err:
            Finder(conns).find("IMAGE", {"SOPInstanceUID": ""})
        assert time.monotonic() - start < 4
        assert err.value.retryable and reason in str(err.value)
        assert not conns._idle and conns._open == 0
    finally:
        conns.close()
        fake.stop()


def _fragments_forever(first: Callable[[int, int], bytes], control: int) -> Any:
    def then(conn: socket.socket, cx: int, msg_id: int) -> None:
        conn.sendall(first(cx, msg_id))
        for _ in range(2000):  # ~32 MB, never the last fragment
            conn.sendall(_pdv(cx, control, b"\0" * 16000))

    return then


@pytest.mark.parametrize(
    ("then", "reason"),
    [
        (_fragments_forever(lambda cx, i: b"", 0x01), "a command set over 65536 bytes"),
        (
            _fragments_forever(lambda cx, i: _pdv(cx, 0x03, _find_rsp(i, 0xFF00, True)), 0x00),
            "data set over 200000 bytes",
        ),
    ],
    ids=["command fragments", "data set fragments"],
)
def test_endless_fragments_are_bounded(
    then: Any, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomsync.places.dicom import link as link_module
    from dicomsync.places.dicom.association import STUDY_FIND

    monkeypatch.setattr(link_module, "MAX_DATASET", 200_000)
    fake = FakePeer(then)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 5.0, 16384)
    try:
        link = Link.open(peer, [_find_context()])
        with pytest.raises(Lost) as err:
            list(link.find(1, STUDY_FIND, _query()))
        assert reason in err.value.reason and not link.is_established
    finally:
        fake.stop()


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """One P-DATA-TF of several PDVs."""
    items = b"".join(struct.pack(">LBB", len(d) + 2, cx, c) + d for cx, c, d in pdvs)
    return struct.pack(">BBL", 4, 0, len(items)) + items


def test_answers_that_share_pdus_are_each_read_whole() -> None:
    """A peer may put the next answer's command in the PDU that ends this answer's data
    set: every answer arrives, and the association stays usable."""
    from dicomsync.places.dicom.association import STUDY_FIND

    ident = encode(_query(), False, True) or b""
    half = len(ident) // 2

    def then(conn: socket.socket, cx: int, msg_id: int) -> None:
        pending, final = _find_rsp(msg_id, 0xFF00, True), _find_rsp(msg_id, 0, False)
        conn.sendall(_pdu((cx, 0x03, pending), (cx, 0x00, ident[:half])))
        conn.sendall(_pdu((cx, 0x02, ident[half:]), (cx, 0x03, pending), (cx, 0x02, ident)))
        conn.sendall(_pdu((cx, 0x03, final)))
        time.sleep(5)

    fake = FakePeer(then)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 1.5, 16384)
    try:
        link = Link.open(peer, [_find_context()])
        answers = list(link.find(1, STUDY_FIND, _query()))
        assert [int(status.Status) for status, _ in answers] == [0xFF00, 0xFF00, 0]
        assert [found.QueryRetrieveLevel for _, found in answers[:2]] == ["IMAGE", "IMAGE"]
        assert link.is_established and link.alive()
    finally:
        fake.stop()


def test_an_answer_that_stops_half_way_is_lost_within_its_timeout() -> None:
    """Part of the answer comes late, then nothing: the link gives up at its Timeout,
    not a whole Timeout after the last byte."""

    def then(conn: socket.socket, cx: int, msg_id: int) -> None:
        time.sleep(1.2)
        conn.sendall(_pdv(cx, 0x03, _store_rsp(msg_id))[:9])
        time.sleep(10)

    fake = FakePeer(then)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 1.5, 16384)
    try:
        link = Link.open(peer, [_storage_context()])
        blob = _instance_bytes(generate_uid())
        meta = payload.parse_meta(blob)
        assert meta is not None
        start = time.monotonic()
        with pytest.raises(Lost, match=r"no answer within 1\.5 s"):
            link.store(1, CT, meta[1], [memoryview(blob)[meta[3] :]], len(blob) - meta[3])
        assert time.monotonic() - start < 2.2  # was 1.2 + 1.5 s
    finally:
        fake.stop()


def _meta_only(sop: str) -> bytes:
    blob = _instance_bytes(sop)
    meta = payload.parse_meta(blob)
    assert meta is not None
    return blob[: meta[3]]


def _non_ascii_uid(sop: str) -> bytes:
    blob = _instance_bytes(sop)
    return blob.replace(sop.encode(), sop.encode()[:-1] + b"\xe9")  # file meta and data set


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_meta_only, "no data set"), (_non_ascii_uid, "cannot read it")],
    ids=["an empty data set", "a non-ASCII UID in the file meta"],
)
def test_an_instance_the_link_cannot_send_fails_alone(
    make: Callable[[str], bytes], reason: str, tmp_path: Path
) -> None:
    """In memory and from a file: that instance is refused, the others are stored."""
    fake = FakePeer(_answer_ok)
    store = _fake_scu(fake)
    try:
        bad, on_disk, good = generate_uid(), generate_uid(), generate_uid()
        path = tmp_path / "bad.dcm"
        path.write_bytes(make(on_disk))
        blob = make(bad)
        insts = [
            Instance(bad, "bad", functools.partial(bytes, blob)),
            Instance(on_disk, "disk", path.read_bytes, path=path),
            _in_memory(good),
        ]
        start = time.monotonic()
        result = store.store(insts)
        assert time.monotonic() - start < 3  # no waiting out a Timeout
    finally:
        store.connections.close()
        fake.stop()
    assert result.lost is None and result.stored == [good]
    assert sorted(result.refused) == sorted([bad, on_disk])
    assert all(reason in str(e) for e in result.refused.values())


def test_a_query_pydicom_cannot_encode_is_refused_before_a_byte_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomsync.places.dicom import link as link_module
    from dicomsync.places.dicom.association import STUDY_FIND

    fake = FakePeer(_answer_ok)
    peer = Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 5.0, 16384)
    monkeypatch.setattr(link_module, "encode", lambda *args: None)
    try:
        link = Link.open(peer, [_find_context()])
        start = time.monotonic()
        with pytest.raises(ValueError, match="could not encode"):
            list(link.find(1, STUDY_FIND, _query()))
        assert time.monotonic() - start < 1
    finally:
        fake.stop()


def test_an_unreadable_source_while_preparing_fails_that_instance_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SourceUnreadable raised while the instance is prepared (e.g. decoded for a
    conversion to another syntax) is that instance's StorageError, not a stopped send."""
    from dicomsync.errors import StorageError

    fake = FakePeer(_answer_ok)
    store = _fake_scu(fake)
    real = StoreScu._prepared
    bad = generate_uid()

    def prepared(self: StoreScu, link: Link, p: payload.Payload) -> Any:
        if p.sop_uid == bad:
            raise payload.SourceUnreadable("the file vanished")
        return real(self, link, p)

    monkeypatch.setattr(StoreScu, "_prepared", prepared)
    try:
        good = generate_uid()
        result = store.store([_in_memory(bad), _in_memory(good)])
    finally:
        store.connections.close()
        fake.stop()
    assert result.lost is None and result.stored == [good]
    assert isinstance(result.refused[bad], StorageError)
    assert "the file vanished" in str(result.refused[bad])


class RawPeer:
    """Reads the A-ASSOCIATE-RQ and answers ``answer(rq bytes)``, then waits."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        threading.Thread(target=self._one, daemon=True).start()

    def _one(self) -> None:
        try:
            conn, _ = self.listener.accept()
            head = FakePeer._exact(conn, 6)
            body = FakePeer._exact(conn, struct.unpack(">BBL", head)[2])
            conn.sendall(self.answer(head + body))
            time.sleep(3)
            conn.close()
        except OSError:
            pass


def _ac_without_syntax(rq_bytes: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting the first context (result 0) with no syntax sub-item."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(rq_bytes)
    p = rq.to_primitive()
    ac = A_ASSOCIATE()
    ac.application_context_name = p.application_context_name
    ac.calling_ae_title, ac.called_ae_title = p.calling_ae_title, p.called_ae_title
    ac.result = 0
    out = PresentationContext()
    out.context_id, out.result = 1, 0
    out.abstract_syntax = CT
    out.transfer_syntax = [ExplicitVRLittleEndian]
    ac.presentation_context_definition_results_list = [out]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    ac.user_information = [length]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    raw = bytes(pdu.encode())
    pos, items = 74, b""
    while pos < len(raw):
        kind, _, n = struct.unpack_from(">BBH", raw, pos)
        item = raw[pos : pos + 4 + n]
        if kind == 0x21:  # keep its ID, result; drop its transfer syntax sub-item
            item = struct.pack(">BBH", 0x21, 0, 4) + item[4:8]
        items += item
        pos += 4 + n
    body = raw[6:74] + items
    return struct.pack(">BBL", 2, 0, len(body)) + body


@pytest.mark.parametrize(
    "answer",
    [
        lambda rq: b"\x03\0\0\0\0\2\0\0",  # a truncated A-ASSOCIATE-RJ
        lambda rq: b"\x02\0\0\0\0\x10" + b"\x01" * 16,  # a garbled A-ASSOCIATE-AC
        lambda rq: (
            b"\x02\0" + struct.pack(">L", 80) + b"\0\1" + b"\0" * 66 + b"\x21\0\0\x08" + b"\xff" * 8
        ),
        _ac_without_syntax,
    ],
    ids=["truncated RJ", "garbled AC", "garbled AC item", "context without a syntax"],
)
def test_a_malformed_association_answer_is_a_dicomsync_error(
    answer: Callable[[bytes], bytes],
) -> None:
    from dicomsync.errors import DicomSyncError

    raw = RawPeer(answer)
    peer = Peer("raw", "127.0.0.1", raw.port, "RAW", "US", 2.0, 16384)
    try:
        with pytest.raises(DicomSyncError):
            link = Link.open(peer, [_storage_context()])
            link.context_id(CT, ExplicitVRLittleEndian)  # the accepted context's syntax
    finally:
        raw.listener.close()


def test_an_unexpected_failure_of_a_query_gives_its_association_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomsync.places.dicom.find import Finder

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Link, "find", broken)
    fake = FakePeer(_answer_ok)
    conns = Connections(Peer("fake", "127.0.0.1", fake.port, "FAKE", "US", 2.0, 16384), 1)
    try:
        with pytest.raises(RuntimeError):
            Finder(conns).find("IMAGE", {"SOPInstanceUID": ""})
        assert conns._open == 0 and not conns._idle
    finally:
        conns.close()
        fake.stop()
