"""The seed README's walk-through, with real files, through folders, zips and a real Orthanc."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pydicom

from conftest import Cli
from orthanc_server import OrthancProcess


def sop_uids_in_folder(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.rglob("*")
        if p.is_file()
    }


def sop_uids_in_zip(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return {
            str(pydicom.dcmread(zf.open(n), stop_before_pixels=True).SOPInstanceUID)
            for n in zf.namelist()
        }


def test_seed_walkthrough_folder_to_zip(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]]
) -> None:
    out = cli("place", "list").output
    assert out.splitlines() == [
        "key         place",
        "----------  " + "-" * len(f"Root folder at '{tmp_path / 'dicom_root'}'"),
        f"my_studies  Root folder at '{tmp_path / 'dicom_root'}'",
    ]
    assert cli("find", "my_studies:*").output.splitlines() == [
        "found 4:",
        "my_studies:patient1/study1",
        "my_studies:patient1/study2",
        "my_studies:patient1/study3",
        "my_studies:patient2/study1",
    ]
    assert cli("find", "my_studies:patient1*").output.splitlines()[0] == "found 3:"
    assert cli("find", "my_studies:*study1").output.splitlines() == [
        "found 2:",
        "my_studies:patient1/study1",
        "my_studies:patient2/study1",
    ]
    assert cli("find", "my_studies:patient1/study2").output.splitlines() == [
        "found 1:",
        "my_studies:patient1/study2",
    ]

    cli("place", "add", "zipped_root", "zipped", str(tmp_path / "dicom_zipped"))
    out = cli("send", "my_studies:patient1/study2", "zipped").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed")
    found = cli("find", "*:*").output.splitlines()
    assert found[0] == "found 5:"
    assert "zipped:patient1/study2" in found

    out = cli("send", "my_studies:*", "zipped").output
    assert out.splitlines()[-1].startswith("3 sent, 1 duplicate, 0 failed")
    zips = sorted((tmp_path / "dicom_zipped").rglob("*.zip"))
    assert [z.relative_to(tmp_path / "dicom_zipped").as_posix() for z in zips] == [
        "patient1/study1.zip",
        "patient1/study2.zip",
        "patient1/study3.zip",
        "patient2/study1.zip",
    ]
    for key, files in seed.items():
        assert sop_uids_in_zip(tmp_path / "dicom_zipped" / f"{key}.zip") == sop_uids_in_folder(
            tmp_path / "dicom_root" / key
        )
        assert len(files) == len(sop_uids_in_folder(tmp_path / "dicom_root" / key))

    mtimes = {z: z.stat().st_mtime_ns for z in zips}
    out = cli("send", "my_studies:*", "zipped").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed (0 instances")
    assert {z: z.stat().st_mtime_ns for z in zips} == mtimes, "a duplicate send wrote something"
    assert not [p for p in (tmp_path / "dicom_zipped").rglob("*") if p.name.startswith(".")]


def test_seed_walkthrough_through_orthanc(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], orthanc: OrthancProcess
) -> None:
    source_sets = {
        str(
            pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        ): sop_uids_in_folder(tmp_path / "dicom_root" / key)
        for key, files in seed.items()
    }
    cli("place", "add", "orthanc", "pacs", orthanc.url)
    out = cli("send", "my_studies:patient1/study2", "pacs").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed")
    assert cli("find", "*:*").output.splitlines()[0] == "found 5:"
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("3 sent, 1 duplicate, 0 failed")
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed")
    assert orthanc.study_sop_uids() == source_sets  # hop 1: folder -> Orthanc

    (tmp_path / "fresh").mkdir()
    cli("place", "add", "dicom_root", "fresh", str(tmp_path / "fresh"))
    out = cli("send", "pacs:*", "fresh").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
    fresh_sets = {}
    for study_dir in (tmp_path / "fresh").glob("*/*"):
        uids = sop_uids_in_folder(study_dir)
        fresh_sets[study_dir.name] = uids
    assert fresh_sets == source_sets  # hop 2: Orthanc -> folder, keyed PatientID/StudyUID
    out = cli("compare", "pacs", "fresh").output
    assert "only in pacs: 0" in out and "in both: 4" in out and "only in fresh: 0" in out
    # compare says what send would do: fresh holds these studies under other keys
    # (PatientID/StudyInstanceUID), so send would store them again, and compare says so
    lines = cli("compare", "my_studies", "fresh").output.splitlines()
    assert lines[0] == "only in my_studies: 4" and lines[-2:] == ["in both: 0", "only in fresh: 0"]
    assert all("(its StudyInstanceUID is at fresh:" in line for line in lines[1:5])
    dry = cli("send", "my_studies:*", "fresh", "--dry-run").output
    assert dry.splitlines()[-1].startswith("4 would be sent, 0 sent, 0 duplicate, 0 failed")
    out = cli("send", "pacs:*", "fresh").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed")
