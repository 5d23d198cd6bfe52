"""An ``xnat_pre_archive`` destination in plugin Routes, against the XNAT stand-in.

The real ``xnat`` client runs inside a real Orthanc (the plugin's venv); XNAT_PASS comes
from Orthanc's environment. Imports are counted at the stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from dicomdata import pcir_study_files
from orthanc_server import OrthancProcess
from plugin_helpers import jobs, plugin_orthanc, settled, status, wait_for
from servers.xnat import XnatServer

pytestmark = pytest.mark.orthanc

PASSWORD = "Xnat-Plugin-Secret-93"
PROJECT = "TESTPROJ"


@dataclass
class Setup:
    a: OrthancProcess
    xnat: XnatServer
    studies: list[list[Path]]  # files per study, in upload order


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("plugin-xnat")
    xnat = XnatServer(users={"tester": PASSWORD}, projects=[PROJECT]).start()
    studies = list(pcir_study_files().values())
    description = str(pydicom.dcmread(studies[4][0], stop_before_pixels=True).StudyDescription)
    place = {"Kind": "xnat_pre_archive", "Server": xnat.url, "Project": PROJECT, "User": "tester"}
    a = plugin_orthanc(
        root / "a",
        "a",
        {
            "xnat": {**place, "Timeout": 10},
            "xnat_wrong_pw": {**place, "PasswordEnv": "DS_TEST_WRONG_XNAT_PASS", "Timeout": 10},
        },
        [
            {"Destination": "xnat"},
            {"Destination": "xnat_wrong_pw", "Filter": {"StudyDescription": description}},
        ],
        sync={"Retry": {"BaseDelay": 0.5, "MaxDelay": 2, "MaxAttempts": 100}},
        env={"XNAT_PASS": PASSWORD, "DS_TEST_WRONG_XNAT_PASS": "not-" + PASSWORD},
    ).start()
    try:
        yield Setup(a, xnat, studies)
    finally:
        try:
            a.stop()
        finally:
            xnat.stop()


def sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def imports(xnat: XnatServer) -> int:
    return sum(1 for i in xnat.imports if i.status == 200)


def test_ingest_reaches_xnat_exactly_once_also_after_it_was_down(setup: Setup) -> None:
    a, xnat, studies = setup.a, setup.xnat, setup.studies
    a.upload_files(studies[0] + studies[1])
    wait_for(lambda: settled(a, {"xnat": 2}), what="two studies in XNAT")
    assert imports(xnat) == 2
    assert xnat.sop_uids(PROJECT) == sop_uids(studies[0] + studies[1])
    assert {s.tag for s in xnat.sessions(PROJECT)} == {
        str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies[:2]
    }

    # sent again on request: the duplicate check finds the sessions, nothing is uploaded
    uid = str(pydicom.dcmread(studies[0][0], stop_before_pixels=True).StudyInstanceUID)
    r = requests.post(
        a.url + "/dicomsync/send", json={"Resources": [uid], "Destination": "xnat"}, timeout=30
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["Jobs"][0]["JobId"]
    wait_for(lambda: a.get(f"/dicomsync/jobs/{job_id}")["State"] == "done", what="re-send done")
    assert imports(xnat) == 2

    # XNAT goes down for a while: the jobs retry, then deliver once it is back
    xnat.stop()
    a.upload_files(studies[2] + studies[3])

    def retrying() -> bool:
        waiting = [
            j for j in jobs(a, destination="xnat") if j["State"] == "queued" and j["Attempts"] >= 2
        ]
        return len(waiting) == 2 and all("unreachable" in j["LastError"] for j in waiting)

    wait_for(retrying, timeout=60, what="two jobs retrying while XNAT is down")
    assert imports(xnat) == 2
    xnat.start()  # same port, same data
    wait_for(lambda: settled(a, {"xnat": 4}), timeout=60, what="delivered after XNAT came back")
    assert imports(xnat) == 4  # one upload per study, none repeated
    assert xnat.sop_uids(PROJECT) == sop_uids([f for s in studies[:4] for f in s])
    assert len(xnat.sessions(PROJECT)) == 4
    st = status(a)["Destinations"]["xnat"]
    assert st["Failed"] == 0 and st["Delivered"] == sum(len(s) for s in studies[:4])
    assert PASSWORD not in a.log_text()


def test_wrong_password_fails_the_job_with_one_clear_line_and_no_secret(setup: Setup) -> None:
    a, xnat = setup.a, setup.xnat
    before = len(xnat.imports)
    a.upload_files(setup.studies[4])
    wait_for(
        lambda: status(a)["Destinations"]["xnat_wrong_pw"]["Failed"] == 1, what="the job failed"
    )
    job = jobs(a, destination="xnat_wrong_pw")[0]
    assert "refused the login of user 'tester'" in job["LastError"]
    assert "DS_TEST_WRONG_XNAT_PASS" in job["LastError"]
    assert PASSWORD not in a.log_text() and PASSWORD not in job["LastError"]
    lines = [line for line in a.log_text().splitlines() if f"job {job['Id']} " in line]
    assert len(lines) == 1 and "failed" in lines[0]
    wait_for(lambda: settled(a, {"xnat": 5}), what="the good route delivered it")
    assert len(xnat.imports) == before + 1  # by "xnat"; the wrong password uploaded nothing
    # the queue keeps the job: it can be requeued once the password is fixed
    r = requests.post(
        a.url + "/dicomsync/retry-failed", json={"Destination": "xnat_wrong_pw"}, timeout=30
    )
    assert r.json() == {"Requeued": 1}
