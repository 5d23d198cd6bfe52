"""The ``dicom`` place when the peer says no: one clear line each, nothing lost.

A wrong called AE title (association rejected), an unreachable host, a peer that
refuses a SOP class or a transfer syntax, failure and warning statuses, and studies
with more SOP class/syntax pairs than one association's 128 presentation contexts.
"""

from __future__ import annotations

import functools
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicomsync import transfer
from dicomsync.errors import RemoteRejected, Unreachable
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import PLACES, Instance, Place
from dicomsync.places.dicom.association import MAX_CONTEXTS, contexts_for

from conftest import Cli
from dicom_peers import ScpPeer, StoreScp, dicom_orthanc, dicom_section
from dicomdata import data, make_instance
from orthanc_server import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"


def place(section: dict, base: Path) -> Place:
    return PLACES.build("peer", section, base)


def as_instance(path: Path) -> Instance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(str(ds.SOPInstanceUID), path.name, path.read_bytes, path=path)


def identity_of(paths: list[Path]) -> StudyIdentity:
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return StudyIdentity(study, frozenset(sops))


def test_wrong_called_aet_is_one_line_association_rejected(tmp_path: Path, cli: Cli) -> None:
    server = dicom_orthanc(tmp_path / "o", "pacs", config={"DicomCheckCalledAet": True}).start()
    try:
        cli("init")
        cli("place", "add", "dicom", "pacs", "127.0.0.1", str(server.dicom_port), "WRONG")
        result = cli("place", "ls", "pacs", ok=False)
        assert result.exit_code == 1
        lines = result.output.splitlines()
        assert lines == [
            f"Error: WRONG@127.0.0.1:{server.dicom_port}: association rejected (Rejected "
            "Permanent, Service User: Called AE title not recognised)"
        ], lines
        status = cli("status").output
        assert "association rejected (Rejected Permanent" in status
    finally:
        server.stop()


def test_unreachable_host_is_one_retryable_line(tmp_path: Path, cli: Cli) -> None:
    port = free_port()
    p = place({"Kind": "dicom", "Host": "127.0.0.1", "Port": port, "CalledAet": "X"}, tmp_path)
    with pytest.raises(Unreachable) as err:
        p.probe()
    assert err.value.retryable
    assert str(err.value) == (
        f"cannot reach DICOM node X@127.0.0.1:{port}: no answer (Connection refused)"
    )
    cli("init")
    cli("place", "add", "dicom", "gone", "127.0.0.1", str(port), "X")
    lines = cli("place", "ls", "gone", ok=False).output.splitlines()
    assert lines == [f"Error: {err.value}"]


def test_peer_refusing_a_sop_class_fails_that_instance_with_its_reason(tmp_path: Path) -> None:
    peer = ScpPeer(contexts={CT: [ExplicitVRLittleEndian, ImplicitVRLittleEndian]}, find=True)
    peer.start()
    try:
        ct, mr = data("images", "CT_small.dcm"), data("images", "MR_small.dcm")
        p = place(dicom_section(peer), tmp_path)
        ident = StudyIdentity("1.2.3", frozenset())
        with pytest.raises(RemoteRejected) as err:
            p.receive("a/b", [as_instance(mr), as_instance(ct)], ident)
        assert not err.value.retryable
        assert str(err.value) == (
            f"1 of 2 instances refused: TESTSCP@127.0.0.1:{peer.port}: refuses SOP class "
            "MR Image Storage (Abstract Syntax Not Supported)"
        )
        assert err.value.delivered == 1  # type: ignore[attr-defined]
        assert set(peer.stored) == {as_instance(ct).sop_uid}  # the CT was still sent
        p.close()
    finally:
        peer.stop()


def test_c_echo_refused_by_a_peer_without_verification(tmp_path: Path) -> None:
    scp = StoreScp(tmp_path / "scp", "--ignore").start()  # storescp answers C-ECHO
    try:
        assert "ok in" in str(place(dicom_section(scp), tmp_path).probe())
    finally:
        scp.stop()
    peer = ScpPeer(contexts={CT: [ExplicitVRLittleEndian]}, verification=False).start()
    try:
        with pytest.raises(RemoteRejected) as err:
            place(dicom_section(peer), tmp_path).probe()
        assert str(err.value) == (
            f"TESTSCP@127.0.0.1:{peer.port}: refuses SOP class Verification SOP Class "
            "(Abstract Syntax Not Supported)"
        )
    finally:
        peer.stop()


@pytest.mark.parametrize(
    ("code", "stored"), [(0xB000, True), (0xB007, True), (0xA900, False), (0xA700, False)]
)
def test_statuses_warnings_are_stored_failures_fail_with_their_code(
    tmp_path: Path, code: int, stored: bool
) -> None:
    peer = ScpPeer(status=lambda ds: code, find=True).start()
    try:
        ct = data("images", "CT_small.dcm")
        p = place(dicom_section(peer), tmp_path)
        ident = identity_of([ct])
        if stored:
            assert p.receive("a/b", [as_instance(ct)], ident).written == 1
            assert p.holds("a/b", ident) == ident.sop_uids
        else:
            with pytest.raises(RemoteRejected) as err:
                p.receive("a/b", [as_instance(ct)], ident)
            assert f"refused with status 0x{code:04X}" in str(err.value)
            assert err.value.retryable == (code == 0xA700)  # out of resources: later
        p.close()
    finally:
        peer.stop()


def test_a_failed_instance_fails_the_study_through_send(tmp_path: Path) -> None:
    bad = {"sop": ""}
    peer = ScpPeer(
        status=lambda ds: 0xC000 if str(ds.SOPInstanceUID) == bad["sop"] else 0, find=True
    )
    peer.start()
    try:
        root = tmp_path / "root"
        uid = generate_uid()
        files = [root / "p" / "s" / f"{i}.dcm" for i in range(3)]
        for f in files:
            make_instance(f, patient_id="p", study_uid=uid)
        bad["sop"] = str(pydicom.dcmread(files[1]).SOPInstanceUID)
        src = place({"Kind": "dicom_root", "Path": str(root)}, tmp_path)
        dst = place(dicom_section(peer), tmp_path)
        summary = transfer.send([(src, r) for r in src.studies()], dst)
        assert summary.failed == 1 and "refused with status 0xC000" in str(
            summary.outcomes[0].error
        )
        assert len(peer.stored) == 2
    finally:
        peer.stop()


def compressed(tmp_path: Path, syntax: UID) -> Path:
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.compress(syntax)
    path = tmp_path / f"{syntax.name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_implicit_vr_only_peer_gets_converted_and_decompressed_instances(tmp_path: Path) -> None:
    scp = StoreScp(tmp_path / "scp", "+xi").start()  # accepts Implicit VR Little Endian only
    try:
        files = [
            data("images", "CT_small.dcm"),  # explicit VR LE: re-encoded
            data("odd", "image_dfl.dcm"),  # deflated: inflated and re-encoded
            compressed(tmp_path, RLELossless),  # RLE: decompressed (pydicom's own decoder)
        ]
        p = place(dicom_section(scp), tmp_path)
        assert p.receive("a/b", [as_instance(f) for f in files], identity_of(files)).written == 3
        got = {
            str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f).file_meta.TransferSyntaxUID
            for f in scp.folder.iterdir()
        }
        assert set(got) == {as_instance(f).sop_uid for f in files}
        assert set(got.values()) == {ImplicitVRLittleEndian}
        # a syntax pydicom cannot decode here (12-bit JPEG Extended): the peer's reason
        jpeg = data("images", "JPGExtended.dcm")
        with pytest.raises(RemoteRejected) as err:
            p.receive("a/b", [as_instance(jpeg)], identity_of([jpeg]))
        assert "refuses JPEG Extended (Process 2 and 4) for Secondary Capture Image Storage" in str(
            err.value
        )
        assert "cannot be decompressed" in str(err.value)
        p.close()
    finally:
        scp.stop()


def test_jpeg_ls_only_peer_gets_jpeg_ls_as_is_and_refuses_the_rest_with_its_reason(
    tmp_path: Path,
) -> None:
    peer = ScpPeer(contexts={CT: [JPEGLSLossless]}, find=True).start()
    try:
        p = place(dicom_section(peer), tmp_path)
        jls = tmp_path / "jls.dcm"
        ds = pydicom.dcmread(data("images", "CT_small.dcm"))
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # bytes as-is: the peer only parses
        ds.SOPInstanceUID = generate_uid()
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 60])
        ds.save_as(jls, enforce_file_format=False)
        assert p.receive("a/b", [as_instance(jls)], identity_of([jls])).written == 1
        assert peer.syntaxes[as_instance(jls).sop_uid] == JPEGLSLossless
        ct = data("images", "CT_small.dcm")
        with pytest.raises(RemoteRejected) as err:
            p.receive("a/b", [as_instance(ct)], identity_of([ct]))
        assert "refuses SOP class CT Image Storage (Transfer Syntax(es) Not Supported)" in str(
            err.value
        )
        p.close()
    finally:
        peer.stop()


def test_more_pairs_than_128_contexts_are_sent_over_several_associations(tmp_path: Path) -> None:
    storage = [str(c.abstract_syntax) for c in StoragePresentationContexts]
    classes = [c for c in storage if uid_to_service_class(c) is StorageServiceClass][:70]
    pairs = [(c, ExplicitVRLittleEndian) for c in classes]
    contexts, covered = contexts_for(pairs)
    assert len(contexts) <= MAX_CONTEXTS and len(covered) < len(pairs)
    peer = ScpPeer(find=True).start()
    try:
        uid = generate_uid()
        instances = []
        for i, sop_class in enumerate(classes):
            ds = make_instance(None, patient_id="many", study_uid=uid, pixel_bytes=16)
            ds.SOPClassUID = UID(sop_class)
            ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            blob = buf.getvalue()
            instances.append(
                Instance(str(ds.SOPInstanceUID), f"{i}.dcm", functools.partial(bytes, blob))
            )
        p = place(dicom_section(peer, Associations=2), tmp_path)
        ident = StudyIdentity(uid, frozenset(i.sop_uid for i in instances))
        assert p.receive("many/x", instances, ident).written == 70
        assert p.holds("many/x", ident) == ident.sop_uids
        assert {c for _, c in peer.stored.values()} == set(classes)
        p.close()
    finally:
        peer.stop()


def test_sockets_have_nodelay_and_the_place_opens_at_most_associations(tmp_path: Path) -> None:
    import socket
    import threading

    from dicomsync.places.dicom.association import VERIFICATION, build_context

    peer = ScpPeer(find=True).start()
    try:
        p = place(dicom_section(peer, Associations=2), tmp_path)
        pooled = p.connections.acquire()  # type: ignore[attr-defined]
        assert pooled.link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        p.connections.discard(pooled)  # type: ignore[attr-defined]
        assoc = p.peer.associate([build_context(VERIFICATION)])  # type: ignore[attr-defined]
        sock = assoc.dul.socket.socket  # C-GET / C-MOVE: pynetdicom's own association
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assoc.release()
        uid = generate_uid()
        batches = []
        for b in range(3):
            blobs = []
            for i in range(6):
                ds = make_instance(None, patient_id="bound", study_uid=uid, pixel_bytes=20_000)
                buf = BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                blobs.append(
                    Instance(
                        str(ds.SOPInstanceUID), f"{b}{i}", functools.partial(bytes, buf.getvalue())
                    )
                )
            batches.append(blobs)
        ident = StudyIdentity(uid, frozenset(i.sop_uid for b in batches for i in b))
        # the plugin builds one place object per worker thread: they share the bound
        others = [place(dicom_section(peer, Associations=2), tmp_path) for _ in range(2)]
        threads = [
            threading.Thread(target=q.receive, args=("a/b", batch, ident))
            for q, batch in zip([p, *others], batches, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(peer.stored) == 18
        assert peer.most_open <= 2  # three sends at once, never more than Associations
        assert p.holds("a/b", ident) == ident.sop_uids
        for q in [p, *others]:
            q.close()
    finally:
        peer.stop()


@pytest.mark.parametrize("max_pdu", [4096, 16382, 0])
def test_files_are_sent_byte_for_byte_in_pdus_the_peer_accepts(
    tmp_path: Path, max_pdu: int
) -> None:
    """The link frames the command and the file's dataset as P-DATA PDUs itself."""
    from pynetdicom.dsutils import split_dataset

    from dicomsync.places.dicom.link import Link

    peer = ScpPeer(find=True, max_pdu=max_pdu, keep_raw=True).start()
    try:
        root = tmp_path / "root"
        uid = generate_uid()
        files = [root / f"{i}.dcm" for i in range(3)]
        for i, f in enumerate(files):
            make_instance(
                f, patient_id="bytes", study_uid=uid, pixel_bytes=[10, 70_001, 300_000][i]
            )
        p = place(dicom_section(peer), tmp_path)
        calls = []
        real = Link.store

        def counting(*args: object) -> object:
            calls.append(args)
            return real(*args)  # type: ignore[arg-type]

        Link.store = counting  # type: ignore[method-assign,assignment]
        try:
            assert (
                p.receive("a/b", [as_instance(f) for f in files], identity_of(files)).written == 3
            )
        finally:
            Link.store = real  # type: ignore[method-assign]
        assert len(calls) == 3
        for f in files:
            _, offset = split_dataset(f)
            assert peer.raw[as_instance(f).sop_uid] == f.read_bytes()[offset:]
        p.close()
    finally:
        peer.stop()
