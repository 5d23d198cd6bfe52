"""The ``dicom`` place against real peers: Orthanc B's DICOM port as a full SCP, dcmtk's
``storescp`` (no C-FIND: the ledger), and the seed walk-through over C-STORE, C-FIND,
C-GET and C-MOVE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from conftest import Cli, clear_orthanc
from dicom_peers import MOVE_AET, StoreScp, dicom_orthanc
from dicomdata import build_seed_tree
from orthanc_server import OrthancProcess, free_port

pytestmark = pytest.mark.orthanc


def folder_sets(root: Path) -> dict[str, set[str]]:
    """StudyInstanceUID -> SOP UIDs of every file under ``root``."""
    out: dict[str, set[str]] = {}
    for p in root.rglob("*"):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs_server(
    tmp_path_factory: pytest.TempPathFactory, move_port: int
) -> Iterator[OrthancProcess]:
    server = dicom_orthanc(tmp_path_factory.mktemp("pacs"), "pacs", move_port).start()
    yield server
    server.stop()


@pytest.fixture
def pacs(pacs_server: OrthancProcess) -> OrthancProcess:
    clear_orthanc(pacs_server)
    return pacs_server


@pytest.fixture
def seed(tmp_path: Path, cli: Cli) -> Path:
    build_seed_tree(tmp_path / "dicom_root")
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "dicom_root"))
    return tmp_path / "dicom_root"


def test_seed_walkthrough_over_c_store_c_find_c_get_and_c_move(
    tmp_path: Path, cli: Cli, seed: Path, pacs: OrthancProcess, move_port: int
) -> None:
    source = folder_sets(seed)
    cli("place", "add", "dicom", "pacs", "127.0.0.1", str(pacs.dicom_port), "PACS")
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
    assert pacs.study_sop_uids() == source  # every SOP UID is there
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed (0 instances")

    found = cli("find", "pacs:*").output.splitlines()
    assert found[0] == "found 4:" and all(line.startswith("pacs:") for line in found[1:])
    ls = cli("place", "ls", "pacs").output.splitlines()
    assert ls[0].startswith("C-ECHO PACS@127.0.0.1:") and "duplicates checked by C-FIND" in ls[0]
    assert ls[1] == "4 studies in pacs:"

    for mode, extra in (
        ("get", []),
        ("move", ["--retrieve", "move", "--move-aet", MOVE_AET, "--listen-port", str(move_port)]),
    ):
        key = f"pacs_{mode}"
        cli("place", "add", "dicom", key, "127.0.0.1", str(pacs.dicom_port), "PACS", *extra)
        fresh = tmp_path / f"fresh_{mode}"
        fresh.mkdir()
        cli("place", "add", "dicom_root", f"fresh_{mode}", str(fresh))
        out = cli("send", f"{key}:*", f"fresh_{mode}").output
        assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances"), out
        assert folder_sets(fresh) == source, mode  # identical SOP UID sets
        out = cli("send", f"{key}:*", f"fresh_{mode}").output
        assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed"), out


def test_one_patient_is_listed_with_a_patient_id_key(
    cli: Cli, seed: Path, pacs: OrthancProcess
) -> None:
    cli("place", "add", "dicom", "pacs", "127.0.0.1", str(pacs.dicom_port), "PACS")
    cli("send", "my_studies:*", "pacs")
    patients = sorted(
        {line.split(":")[1].split("/")[0] for line in cli("find", "pacs:*").output.splitlines()[1:]}
    )
    first = cli("find", f"pacs:{patients[0]}/*").output.splitlines()
    assert first[0].startswith("found ") and len(first) > 1
    assert all(line.startswith(f"pacs:{patients[0]}/") for line in first[1:])


def test_storescp_no_c_find_the_ledger_judges_and_nothing_is_sent_twice(
    tmp_path: Path, cli: Cli, seed: Path
) -> None:
    scp = StoreScp(tmp_path / "scp").start()
    try:
        cli("place", "add", "dicom", "scp", "127.0.0.1", str(scp.port), scp.aet)
        ls = cli("place", "ls", "scp", ok=False).output.splitlines()
        assert "it answers no C-FIND: duplicates are judged by our record" in ls[0]
        assert ls[1].endswith("answers no C-FIND: it can receive studies, not list them")
        out = cli("send", "my_studies:*", "scp").output
        assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
        written = scp.files()
        assert len(written) == 16
        stored = {
            str(pydicom.dcmread(scp.folder / n, stop_before_pixels=True).SOPInstanceUID)
            for n in written
        }
        assert stored == set().union(*folder_sets(seed).values())
        out = cli("send", "my_studies:*", "scp").output
        assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed (0 instances")
        assert scp.files() == written  # re-sent nothing
        assert (tmp_path / ".dicomsync" / "places" / "scp.ledger.sqlite").is_file()
    finally:
        scp.stop()
