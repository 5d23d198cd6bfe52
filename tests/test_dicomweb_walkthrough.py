"""The seed walk-through against a real DICOMweb server: Orthanc with Debian's DICOMweb plugin.

As a destination (STOW-RS, duplicates by QIDO-RS) and as a source (QIDO-RS listing,
WADO-RS retrieval), through the CLI as a user runs it.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from test_walkthrough import sop_uids_in_folder

from conftest import Cli
from orthanc_server import OrthancProcess

pytestmark = pytest.mark.orthanc


def source_sets(tmp_path: Path, seed: dict[str, list[Path]]) -> dict[str, set[str]]:
    return {
        str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID): (
            sop_uids_in_folder(tmp_path / "dicom_root" / key)
        )
        for key, files in seed.items()
    }


def test_seed_walkthrough_through_dicomweb(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], web: OrthancProcess
) -> None:
    expected = source_sets(tmp_path, seed)
    out = cli("place", "add", "dicomweb", "web", web.dicomweb_url).output
    assert f"added dicomweb place 'web': DICOMweb at '{web.dicomweb_url}'" in out
    out = cli("send", "my_studies:patient1/study2", "web").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed")
    out = cli("send", "my_studies:*", "web").output
    assert out.splitlines()[-1].startswith("3 sent, 1 duplicate, 0 failed")
    assert web.study_sop_uids() == expected  # every SOP UID is there, over STOW-RS
    out = cli("send", "my_studies:*", "web").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed (0 instances")

    found = cli("find", "web:*").output.splitlines()
    assert found[0] == "found 4:" and len(found) == 5
    assert all(line.startswith("web:") for line in found[1:])
    assert {line.rsplit("/", 1)[1] for line in found[1:]} == set(expected)

    (tmp_path / "fresh").mkdir()
    cli("place", "add", "dicom_root", "fresh_root", str(tmp_path / "fresh"))
    out = cli("send", "web:*", "fresh_root").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
    fresh = {d.name: sop_uids_in_folder(d) for d in (tmp_path / "fresh").glob("*/*")}
    assert fresh == expected  # WADO-RS gave back the same SOP UID sets
    out = cli("send", "web:*", "fresh_root").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed")
    # the files are the files as stored (transfer-syntax=*), byte for byte
    by_sop = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes()
        for files in seed.values()
        for f in files
    }
    for f in (tmp_path / "fresh").rglob("*.dcm"):
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert pydicom.dcmread(f).PixelData == pydicom.dcmread(_io(by_sop[sop])).PixelData


def _io(data: bytes) -> BytesIO:
    return BytesIO(data)


def test_one_study_by_its_key_and_place_ls(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], web: OrthancProcess
) -> None:
    cli("place", "add", "dicomweb", "web", web.dicomweb_url)
    cli("send", "my_studies:*", "web")
    keys = cli("find", "web:*").output.splitlines()[1:]
    one = keys[0]
    assert cli("find", one).output.splitlines() == ["found 1:", one]
    rows = cli("place", "ls", "web").output.splitlines()
    assert rows[:2] == [f"DICOMweb at '{web.dicomweb_url}' answers QIDO-RS", "4 studies in web:"]
    assert sum(int(r.split()[2]) for r in rows[2:]) == 16
    status = json.loads(cli("status", "--json").output)
    (entry,) = [p for p in status["places"] if p["key"] == "web"]
    assert entry["probe"] == f"DICOMweb at '{web.dicomweb_url}' answers QIDO-RS"


def test_small_pages_and_batches_give_the_same_result(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], web: OrthancProcess
) -> None:
    """QIDO paging (PageSize 1) and STOW batches of 1 instance, 2 in flight."""
    cli("place", "add", "dicomweb", "web", web.dicomweb_url)
    config = json.loads(cli.config.read_text())
    config["Places"]["web"].update({"PageSize": 1, "InstancesPerRequest": 1, "RequestsInFlight": 2})
    cli.config.write_text(json.dumps(config))
    stow: list[int] = []
    real_post = requests.Session.post

    def counting_post(self: requests.Session, url: str, *a: Any, **kw: Any) -> Any:
        stow.append(1)
        return real_post(self, url, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests.Session, "post", counting_post)
        out = cli("send", "my_studies:*", "web").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
    assert len(stow) == 16  # one STOW-RS request per instance
    assert web.study_sop_uids() == source_sets(tmp_path, seed)
    assert cli("find", "web:*").output.splitlines()[0] == "found 4:"
    out = cli("send", "my_studies:*", "web").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed")
