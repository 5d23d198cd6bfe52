"""send between every kind of place, with the failure modes the original had."""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_walkthrough import sop_uids_in_folder, sop_uids_in_zip

from dicomsync.config import build_place
from dicomsync.errors import RemoteRejected
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Instance
from dicomsync.places.dicom_root import DicomRoot
from dicomsync.places.zipped_root import ZippedRoot
from dicomsync.transfer import send_study

from conftest import Cli
from dicomdata import make_instance
from orthanc_server import OrthancProcess


def make_study(folder: Path, n: int, patient: str = "P1", subfolders: bool = False) -> set[str]:
    study_uid = generate_uid()
    uids = set()
    for i in range(n):
        sub = f"series{i % 2}/" if subfolders else ""
        ds = make_instance(folder / f"{sub}im{i}.dcm", patient_id=patient, study_uid=study_uid)
        uids.add(str(ds.SOPInstanceUID))
    return uids


def places(tmp_path: Path, cli: Cli, *specs: tuple[str, str]) -> None:
    cli("init")
    for kind, key in specs:
        (tmp_path / key).mkdir(exist_ok=True)
        cli("place", "add", kind, key, str(tmp_path / key))


def test_folder_to_folder_keeps_subfolders(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("dicom_root", "dst"))
    uids = make_study(tmp_path / "src" / "p" / "s", 4, subfolders=True)
    cli("send", "src:*", "dst")
    assert sorted(
        p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*.dcm")
    ) == [
        "p/s/series0/im0.dcm",
        "p/s/series0/im2.dcm",
        "p/s/series1/im1.dcm",
        "p/s/series1/im3.dcm",
    ]
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / "s") == uids


def test_zip_to_folder_and_back(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"), ("dicom_root", "out"))
    uids = make_study(tmp_path / "src" / "p" / "s", 3, subfolders=True)
    cli("send", "src:*", "zips")
    out = cli("send", "zips:*", "out").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (3 instances")
    assert sop_uids_in_folder(tmp_path / "out" / "p" / "s") == uids


def test_brackets_in_names_are_duplicates(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    make_study(tmp_path / "src" / "patient [a]" / "study [1]", 2)
    cli("send", "src:*", "zips")
    assert cli("find", "zips:patient [a]/study [1]").output.splitlines()[0] == "found 1:"
    out = cli("send", "src:patient [a]/study [1]", "zips").output
    assert out.splitlines()[-1].startswith("0 sent, 1 duplicate")


def test_partial_destination_gets_only_missing(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"), ("dicom_root", "dst"))
    uids = make_study(tmp_path / "src" / "p" / "s", 4)
    cli("send", "src:*", "zips")
    cli("send", "src:*", "dst")
    # Remove one instance from each destination.
    (tmp_path / "dst" / "p" / "s" / "im2.dcm").unlink()
    zpath = tmp_path / "zips" / "p" / "s.zip"
    with zipfile.ZipFile(zpath) as zf, zipfile.ZipFile(tmp_path / "cut.zip", "w") as cut:
        for name in zf.namelist():
            if name != "im2.dcm":
                cut.writestr(name, zf.read(name))
    shutil.move(tmp_path / "cut.zip", zpath)
    assert len(sop_uids_in_zip(zpath)) == 3
    for dest in ("zips", "dst"):
        out = cli("send", "src:*", dest).output
        assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (1 instances"), out
    assert sop_uids_in_zip(zpath) == uids
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / "s") == uids


def test_interrupted_zip_never_counts_as_sent(tmp_path: Path) -> None:
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 3)
    zips = ZippedRoot("zips", tmp_path / "zips")
    (tmp_path / "zips").mkdir()
    ref = next(src.studies())
    ident = src.identity(ref)

    def exploding() -> bytes:
        raise RemoteRejected("disk gone")

    good = list(src.instances(ref))
    broken = [*good[:2], Instance("x", "x.dcm", exploding)]
    with pytest.raises(RemoteRejected):
        zips.receive(ref.key, broken, ident)
    assert list((tmp_path / "zips").rglob("*")) == [tmp_path / "zips" / "p"]  # no zip, no temp file
    assert zips.holds(ref.key, ident) == frozenset()
    assert send_study(src, ref, zips).status == "sent"
    assert sop_uids_in_zip(tmp_path / "zips" / "p" / "s.zip") == uids


def test_one_failure_does_not_stop_the_batch(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    for s in ("a", "b", "c"):
        make_study(tmp_path / "src" / "p" / s, 2)
    (tmp_path / "zips" / "p" / "b.zip").mkdir(parents=True)  # the zip can't be written there
    result = cli("send", "src:*", "zips", ok=False)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("2 sent, 0 duplicate, 1 failed")
    assert "failed src:p/b:" in result.stderr
    assert (tmp_path / "zips" / "p" / "a.zip").is_file() and (
        tmp_path / "zips" / "p" / "c.zip"
    ).is_file()


def test_dry_run_sends_nothing(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    make_study(tmp_path / "src" / "p" / "s", 2)
    out = cli("send", "src:*", "zips", "--dry-run").output
    assert "would send src:p/s (2 instances)" in out
    assert out.splitlines()[-1].startswith("1 would be sent, 0 sent, 0 duplicate, 0 failed")
    assert not list((tmp_path / "zips").rglob("*.zip"))


def test_broken_and_odd_files(
    tmp_path: Path, cli: Cli, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    study = tmp_path / "src" / "p" / "s"
    study.mkdir(parents=True)
    for sub in ("broken", "odd"):
        for f in sorted((shared_data / sub).iterdir()):
            shutil.copyfile(f, study / f"{sub}_{f.name}")
    caplog.set_level(logging.WARNING)
    out = cli("send", "src:*", "zips").output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unreadable = [w for w in warnings if w.startswith("skipping unreadable file")]
    # The two files without a DICOM preamble and meta header are skipped, one line each;
    # MR_truncated still has a readable header, so it is delivered as it is.
    assert sorted(w.split(": ")[0].rsplit("/", 1)[1] for w in unreadable) == [
        "broken_no_meta_no_preamble.dcm",
        "broken_no_meta_stray_leading_byte.dcm",
    ]
    assert all(w.count("\n") == 0 for w in unreadable)
    with zipfile.ZipFile(tmp_path / "zips" / "p" / "s.zip") as zf:
        delivered = sorted(zf.namelist())
    assert delivered == [
        "broken_MR_truncated.dcm",
        "odd_ExplVR_BigEnd.dcm",
        "odd_image_dfl.dcm",
        "odd_priv_SQ.dcm",
    ]
    for name in delivered:
        assert (study / name).read_bytes() == zipfile.ZipFile(
            tmp_path / "zips" / "p" / "s.zip"
        ).read(name)
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (4 instances")


def test_charsets_round_trip_every_place(
    tmp_path: Path, cli: Cli, shared_data: Path, orthanc: OrthancProcess
) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"), ("dicom_root", "back"))
    cli("place", "add", "orthanc", "pacs", orthanc.url)
    names = {}
    for f in sorted((shared_data / "charset").iterdir()):
        ds = pydicom.dcmread(f)
        names[str(ds.SOPInstanceUID)] = (ds.SpecificCharacterSet, str(ds.PatientName))
        dest = tmp_path / "src" / (ds.PatientID or "anon") / f.stem
        dest.mkdir(parents=True)
        shutil.copyfile(f, dest / f.name)
    cli("send", "src:*", "zips")
    # zipped -> Orthanc -> folder
    out = cli("send", "zips:*", "pacs").output
    assert out.splitlines()[-1].startswith("4 sent"), out
    cli("send", "pacs:*", "back")
    seen = {}
    for p in (tmp_path / "back").rglob("*.dcm"):
        ds = pydicom.dcmread(p)
        seen[str(ds.SOPInstanceUID)] = (ds.SpecificCharacterSet, str(ds.PatientName))
    assert seen == names
    assert any(not n.isascii() for _, n in names.values())


def test_patient_id_cannot_escape_the_root(
    tmp_path: Path, cli: Cli, orthanc: OrthancProcess
) -> None:
    ds = make_instance(tmp_path / "evil.dcm", patient_id="../../etc", study_uid=generate_uid())
    orthanc.upload((tmp_path / "evil.dcm").read_bytes())
    places(tmp_path, cli, ("zipped_root", "zips"), ("dicom_root", "out"))
    cli("place", "add", "orthanc", "pacs", orthanc.url)
    cli("send", "pacs:*", "zips")
    cli("send", "pacs:*", "out")
    zips = list((tmp_path / "zips").rglob("*.zip"))
    # Made safe, not hidden, and kept apart from a literal "_._.._etc" by a hash.
    assert [z.relative_to(tmp_path / "zips").parts[0] for z in zips] == ["_._.._etc~7baf5cb6"]
    files = list((tmp_path / "out").rglob("*.dcm"))
    assert [f.relative_to(tmp_path / "out").parts[0] for f in files] == ["_._.._etc~7baf5cb6"]
    assert not (tmp_path.parent / "etc").exists()
    assert sop_uids_in_zip(zips[0]) == {str(ds.SOPInstanceUID)}


def test_orthanc_partial_and_lookup_fallback(tmp_path: Path, orthanc: OrthancProcess) -> None:
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 3, patient="PAT")
    pacs = build_place("pacs", {"Kind": "orthanc", "Url": orthanc.url}, tmp_path)
    ref = next(src.studies())
    first = next(src.instances(ref))
    orthanc.upload(first.read())
    assert send_study(src, ref, pacs).sent == 2  # only the missing two
    assert orthanc.study_sop_uids() == {src.identity(ref).study_uid: uids}
    # The same study UID under another PatientID: found through /tools/lookup.
    other = StudyIdentity(src.identity(ref).study_uid, frozenset(uids), patient_id="OTHER")
    assert pacs.holds("x/y", other) == uids


def test_partials_of_dead_writers_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dicomsync.places.local import partial_file

    src = DicomRoot("src", tmp_path / "src")
    make_study(tmp_path / "src" / "p" / "s", 2)
    zips = ZippedRoot("zips", tmp_path / "zips")
    (tmp_path / "zips" / "p").mkdir(parents=True)
    target = tmp_path / "zips" / "p" / "s.zip"
    # A write interrupted by kill -9: a child process makes a partial file, then dies.
    code = (
        "import os, sys; from pathlib import Path; "
        "from dicomsync.places.local import partial_file; "
        "fd, p = partial_file(Path(sys.argv[1])); print(p)"
    )
    dead = Path(
        subprocess.run(
            [sys.executable, "-c", code, str(target)], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    fd, alive = partial_file(target)  # this process is alive: its partial must stay
    os.close(fd)
    assert dead.exists() and dead.name.startswith(".s.zip.")
    ref = next(src.studies())
    assert send_study(src, ref, zips).status == "sent"
    assert not dead.exists()
    assert Path(alive).exists()
    assert [
        p.name for p in (tmp_path / "zips" / "p").iterdir() if not p.name.endswith(".partial")
    ] == ["s.zip"]


@pytest.mark.parametrize("dest_kind", ["zipped_root", "dicom_root"])
def test_unsafe_names_are_duplicates_on_the_second_send(
    tmp_path: Path, cli: Cli, dest_kind: str
) -> None:
    import unicodedata

    places(tmp_path, cli, ("dicom_root", "src"), (dest_kind, "dst"))
    nfd = unicodedata.normalize("NFD", "Müller")
    make_study(tmp_path / "src" / "pat?1" / "stud:1", 2)
    make_study(tmp_path / "src" / nfd / "s", 1)
    first = cli("send", "src:*", "dst").output
    assert first.splitlines()[-1].startswith("2 sent, 0 duplicate, 0 failed (3 instances"), first
    second = cli("send", "src:*", "dst").output
    assert second.splitlines()[-1].startswith("0 sent, 2 duplicate, 0 failed (0 instances"), second
    stored = sorted(
        p.relative_to(tmp_path / "dst").as_posix()
        for p in (tmp_path / "dst").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    # Changed names keep a hash of the original (NFD "Müller" is not NFC "Müller").
    pat, stud, mul = "pat_1~bd721d9c", "stud_1~887b2940", "Müller~c905c3a7"
    if dest_kind == "zipped_root":
        assert stored == [f"{mul}/s.zip", f"{pat}/{stud}.zip"]
    else:
        assert stored == [f"{mul}/s/im0.dcm", f"{pat}/{stud}/im0.dcm", f"{pat}/{stud}/im1.dcm"]


def test_corrupt_destination_zip_is_replaced(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    uids = make_study(tmp_path / "src" / "p" / "s", 2)
    (tmp_path / "zips" / "p").mkdir()
    (tmp_path / "zips" / "p" / "s.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    out = cli("send", "src:*", "zips").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (2 instances"), out
    assert sop_uids_in_zip(tmp_path / "zips" / "p" / "s.zip") == uids


def test_source_file_vanishing_mid_send_fails_only_that_study(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("dicom_root", "dst"))
    make_study(tmp_path / "src" / "p" / "a", 2)
    make_study(tmp_path / "src" / "p" / "b", 2)
    src = DicomRoot("src", tmp_path / "src")
    dst = DicomRoot("dst", tmp_path / "dst")
    refs = list(src.studies())
    idents = [src.identity(r) for r in refs]
    (tmp_path / "src" / "p" / "a" / "im1.dcm").unlink()  # gone after its header was read
    outcomes = [send_study(src, r, dst, identity=i) for r, i in zip(refs, idents, strict=True)]
    assert [o.status for o in outcomes] == ["failed", "sent"]
    assert outcomes[0].error is not None and "cannot read" in outcomes[0].error


def test_concurrent_writers_to_one_zip_keep_both(tmp_path: Path) -> None:
    import threading
    import time

    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 6)
    (tmp_path / "zips").mkdir()
    ref = next(src.studies())
    ident = src.identity(ref)
    insts = list(src.instances(ref))
    barrier = threading.Barrier(2)

    def write(part: list[Instance]) -> None:
        zips = ZippedRoot("zips", tmp_path / "zips")  # separate place objects, like two processes

        def slow() -> Iterator[Instance]:
            for inst in part:
                time.sleep(0.05)  # keep both writes in flight at once
                yield inst

        barrier.wait()
        zips.receive(ref.key, slow(), ident)

    threads = [threading.Thread(target=write, args=(insts[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sop_uids_in_zip(tmp_path / "zips" / "p" / "s.zip") == uids


def test_orthanc_url_with_credentials_is_refused(tmp_path: Path) -> None:
    from dicomsync.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build_place("pacs", {"Kind": "orthanc", "Url": "http://u:s3cr3t-v4lue@host:8042"}, tmp_path)
    assert "s3cr3t-v4lue" not in str(err.value)
    with pytest.raises(ConfigError, match="Timeout must be a positive number"):
        build_place("pacs", {"Kind": "orthanc", "Url": "http://h", "Timeout": "x"}, tmp_path)
