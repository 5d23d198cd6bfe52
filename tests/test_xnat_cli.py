"""The seed walk-through with an XNAT place, through the CLI, against the XNAT stand-in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from conftest import Cli
from dicomdata import build_seed_tree
from servers.xnat import XnatServer

PASSWORD = "Zebra-Secret-4711"
PROJECT = "TESTPROJ"


@pytest.fixture
def server() -> Iterator[XnatServer]:
    srv = XnatServer(users={"tester": PASSWORD}, projects=[PROJECT]).start()
    yield srv
    srv.stop()


@pytest.fixture
def seed(
    tmp_path: Path, cli: Cli, server: XnatServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[Path]]:
    monkeypatch.setenv("XNAT_PASS", PASSWORD)
    layout = build_seed_tree(tmp_path / "dicom_root")
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "dicom_root"))
    cli("place", "add", "xnat_pre_archive", "the_xnat_project", server.url, PROJECT, "tester")
    return layout


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_place_add_stores_no_password(
    tmp_path: Path, cli: Cli, server: XnatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XNAT_PASS", raising=False)  # adding needs no password
    cli("init")
    out = cli("place", "add", "xnat_pre_archive", "x", server.url, PROJECT, "tester").output
    assert out == (
        f"added xnat_pre_archive place 'x': XNAT pre-archive project '{PROJECT}' "
        f"at {server.url} (user tester)\n"
    )
    cli(
        "place",
        "add",
        "xnat_pre_archive",
        "y",
        server.url,
        PROJECT,
        "tester",
        "--password-env",
        "OTHER_XNAT_PW",
    )
    config = json.loads((tmp_path / "dicomsync.json").read_text())
    assert config["Places"]["x"] == {
        "Kind": "xnat_pre_archive",
        "Server": server.url,
        "Project": PROJECT,
        "User": "tester",
        "PasswordEnv": "XNAT_PASS",
    }
    assert config["Places"]["y"]["PasswordEnv"] == "OTHER_XNAT_PW"
    assert server.requests == []  # adding a place does not connect
    listed = cli("place", "list").output.splitlines()
    assert listed[2] == f"x    XNAT pre-archive project '{PROJECT}' at {server.url} (user tester)"


def test_send_seed_tree_to_xnat_twice(
    cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    out = cli("send", "my_studies:*", "the_xnat_project").output.splitlines()
    assert out[:4] == [
        "sent my_studies:patient1/study1 (3 instances)",
        "sent my_studies:patient1/study2 (4 instances)",
        "sent my_studies:patient1/study3 (7 instances)",
        "sent my_studies:patient2/study1 (2 instances)",
    ]
    assert out[4].startswith("4 sent, 0 duplicate, 0 failed (16 instances in ")
    assert len(server.imports) == 4
    out = cli("send", "my_studies:*", "the_xnat_project").output.splitlines()
    assert out[0].startswith("0 sent, 4 duplicate, 0 failed (0 instances in ")
    assert len(server.imports) == 4  # the second send uploads nothing


def test_receiving_study_is_not_sent_again(
    cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    server.inject(
        PROJECT, seed["patient1/study2"][:1], subject="patient1", label="study2", status="RECEIVING"
    )
    out = cli("send", "my_studies:*", "the_xnat_project").output
    assert "sent my_studies:patient1/study2" not in out
    assert "3 sent, 1 duplicate, 0 failed" in out
    assert [i.query["session"] for i in server.imports] == ["study1", "study3", "study1"]


def test_broken_file_fails_one_study_others_arrive(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    """A file without SOP Class UID (XNAT's importer refuses it; a truncated Pixel Data it
    stores as it came)."""
    ds = pydicom.dcmread(seed["patient2/study1"][0])
    del ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.9")
    ds.save_as(tmp_path / "dicom_root" / "patient2" / "study1" / "file9.dcm")
    result = cli("send", "my_studies:*", "the_xnat_project", ok=False)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"failed my_studies:patient2/study1: XNAT {server.url} upload: rejected (400: "
        "object 000003_file9.dcm contains no SOP Class UID)"
    )
    assert "3 sent, 0 duplicate, 1 failed" in result.stdout
    # the partial patient2/study1 session was removed, patient1's "study1" was not
    assert {s.name for s in server.sessions(PROJECT)} == {"study1", "study2", "study3"}
    assert {s.subject for s in server.sessions(PROJECT)} == {"patient1"}


def test_xnat_as_source_find_compare_send(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    cli("send", "my_studies:*", "the_xnat_project")
    server.archive(PROJECT, label="study3")  # one archived, three in the prearchive
    assert cli("find", "the_xnat_project:*").output.splitlines() == [
        "found 4:",
        "the_xnat_project:patient1/study1",
        "the_xnat_project:patient1/study2",
        "the_xnat_project:patient1/study3",
        "the_xnat_project:patient2/study1",
    ]
    assert cli("find", "the_xnat_project:*study1").output.splitlines()[0] == "found 2:"
    compared = json.loads(cli("compare", "my_studies", "the_xnat_project", "--json").output)
    assert len(compared["both"]) == 4
    assert compared["only_a"] == compared["only_b"] == compared["partial"] == []

    (tmp_path / "back").mkdir()
    cli("place", "add", "dicom_root", "back", str(tmp_path / "back"))
    out = cli("send", "the_xnat_project:*", "back").output
    assert "4 sent, 0 duplicate, 0 failed (16 instances" in out
    for key, files in seed.items():
        assert sop_uids(list((tmp_path / "back" / key).rglob("*"))) == sop_uids(files)
    compared = json.loads(cli("compare", "back", "the_xnat_project", "--json").output)
    assert len(compared["both"]) == 4 and compared["partial"] == []


# --- bad input: one clear line, no secret -----------------------------------------------------


def _bad(cli: Cli, tmp_path: Path, *args: str) -> tuple[str, str]:
    log = tmp_path / "run.log"
    result = cli("-vv", "--log-file", str(log), *args, ok=False)
    assert result.exit_code == 1
    everything = result.output + log.read_text()
    assert PASSWORD not in everything
    return result.stderr, everything


def test_wrong_password_one_line(
    tmp_path: Path,
    cli: Cli,
    seed: dict[str, list[Path]],
    server: XnatServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XNAT_PASS", "Wrong-" + PASSWORD[::-1])
    result = cli("find", "the_xnat_project:*", ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: XNAT {server.url} refused the login of user 'tester' "
        "(check the password in XNAT_PASS)\n"
    )
    _, everything = _bad(cli, tmp_path, "send", "my_studies:*", "the_xnat_project")
    assert PASSWORD[::-1] not in everything
    assert "refused the login of user 'tester'" in everything
    assert len(server.imports) == 0


def test_unknown_project_one_line(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    cli("place", "add", "xnat_pre_archive", "nope", server.url, "NOPE", "tester")
    result = cli("find", "nope:*", ok=False)
    assert result.exit_code == 1
    assert result.stderr == f"Error: XNAT {server.url} has no project 'NOPE'\n"
    stderr, _ = _bad(cli, tmp_path, "send", "my_studies:*", "nope")
    # The batch stops at the destination's listing with one line, not one per study.
    assert stderr.splitlines()[-1] == f"Error: XNAT {server.url} has no project 'NOPE'"
    assert "failed my_studies:" not in stderr


def test_unreachable_server_one_line(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], server: XnatServer
) -> None:
    server.stop()
    result = cli("find", "the_xnat_project:*", ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: XNAT {server.url} is unreachable during login: no answer (Connection refused)\n"
    )
    _bad(cli, tmp_path, "send", "my_studies:*", "the_xnat_project")


def test_missing_password_variable_one_line(
    cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XNAT_PASS")
    result = cli("find", "the_xnat_project:*", ok=False)
    assert result.stderr == (
        "Error: xnat_pre_archive place 'the_xnat_project': set the "
        "password in the environment variable XNAT_PASS\n"
    )
