"""A de-identifying route inside real Orthanc processes (issue 13): A (plugin) routes to
Orthanc B with ``"Deidentify"``. Delivered exactly once, nothing re-sent after a restart,
A's own storage untouched; a missing secret sends nothing and says why."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomsync.deid.keys import Keys

from dicomdata import data, pcir_study_files
from plugin_helpers import counting_orthanc, jobs, plugin_orthanc, posted, settled, status, wait_for

pytestmark = pytest.mark.orthanc

SECRET = "plugin route secret"
PROFILES = {
    "research": {
        "Profile": "basic",
        "Options": ["retain-longitudinal-modified-dates"],
        "SecretEnv": "DEID_SECRET",
        "PatientIds": "pseudonyms",
    }
}


def stored(server: Any) -> dict[str, str]:
    """Orthanc instance ID -> SHA-256 of its stored file: what A holds."""
    out = {}
    for i in server.get("/instances"):
        r = requests.get(f"{server.url}/instances/{i}/file", timeout=30)
        r.raise_for_status()
        out[i] = hashlib.sha256(r.content).hexdigest()
    return out


def storage_files(server: Any) -> dict[str, str]:
    """The attachment files of A's storage folder (the index database left out)."""
    root = server.workdir / "storage"
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and "index" not in p.name.lower()
    }


def test_deidentifying_route_delivers_once_resends_nothing_and_leaves_a_untouched(
    tmp_path: Path,
) -> None:
    files = [f for fs in pcir_study_files().values() for f in fs]
    files.append(data("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm"))
    b = counting_orthanc(tmp_path / "b", "b").start()
    places = {"b": {"Kind": "orthanc", "Url": b.url}}
    routes = [{"Destination": "b", "Deidentify": "research"}]
    a = plugin_orthanc(
        tmp_path / "a", "a", places, routes, sync={"Deidentify": PROFILES},
        env={"DEID_SECRET": SECRET},
    )  # fmt: skip
    try:
        a.start()
        a.upload_files(files)
        originals = stored(a)
        disk = storage_files(a)
        n_studies = len(a.get("/studies"))
        wait_for(lambda: settled(a, {"b": n_studies}), what="every study routed")
        assert posted(b) == len(files)  # exactly once
        keys = Keys(SECRET.encode())
        b_uids = {
            a_inst["MainDicomTags"]["SOPInstanceUID"] for a_inst in b.get("/instances?expand")
        }
        a_uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in a.get("/instances?expand")}
        assert b_uids == {keys.uid(u) for u in a_uids}
        for inst in b.get("/instances"):
            tags = b.get(f"/instances/{inst}/simplified-tags")
            assert tags["PatientIdentityRemoved"] == "YES"
            assert tags["PatientID"].startswith("DS")
        assert stored(a) == originals and storage_files(a) == disk  # nothing stored into A

        # A restart re-sends nothing: the catch-up finds every study done or a duplicate.
        a.stop()
        a.start()
        wait_for(lambda: status(a).get("Configured"), what="A restarted")
        wait_for(lambda: settled(a, {"b": n_studies}), what="settled after restart")
        assert posted(b) == len(files)
        assert all(j["State"] == "done" for j in jobs(a, destination="b"))
        assert stored(a) == originals
        a.stop()
        assert SECRET not in a.log_path.read_text(errors="replace")  # never in a log
        assert SECRET not in a.config_path.read_text()
    finally:
        try:
            a.stop()
        finally:
            b.stop()


def test_missing_secret_sends_nothing_and_names_the_variable(tmp_path: Path) -> None:
    b = counting_orthanc(tmp_path / "b", "b").start()
    places = {"b": {"Kind": "orthanc", "Url": b.url}}
    routes = [{"Destination": "b", "Deidentify": "research"}]
    a = plugin_orthanc(tmp_path / "a", "a", places, routes, sync={"Deidentify": PROFILES})
    try:
        a.start()
        a.upload_files(pcir_study_files().popitem()[1])
        job = wait_for(
            lambda: [j for j in jobs(a, destination="b") if j["State"] == "failed"],
            what="the job failed",
        )[0]
        assert "DEID_SECRET" in job["LastError"] and "not set" in job["LastError"]
        assert "DEID_SECRET" in status(a)["PlaceErrors"]["b"]
        assert posted(b) == 0
    finally:
        try:
            a.stop()
        finally:
            b.stop()
