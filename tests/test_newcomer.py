"""The newcomer's path: the shipped orthanc.json, one upload, a zip under var/zips.

`make run` runs ``scripts/run.sh``, which starts Orthanc with ``orthanc.json`` from the
repo root. Port 8042 may be taken on a test machine, so this runs the same file with
only the ports changed (and the plugin script given by absolute path), in a temporary
folder that plays the repo root: storage, queue and zips land under its ``var/``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom

from dicomdata import data
from orthanc_server import REPO_ROOT, OrthancProcess, free_port


def test_run_script_starts_orthanc_with_the_shipped_config() -> None:
    script = (REPO_ROOT / "scripts" / "run.sh").read_text()
    assert "orthanc.json" in script and "mkdir -p var" in script
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "run: setup\n\tbash scripts/run.sh" in makefile


def test_upload_gives_a_zip_under_var_zips(tmp_path: Path) -> None:
    config = json.loads((REPO_ROOT / "orthanc.json").read_text())
    config["HttpPort"], config["DicomPort"] = free_port(), free_port()
    config["PythonScript"] = str(REPO_ROOT / config["PythonScript"])
    stable_age = config["StableAge"]
    server = OrthancProcess(
        tmp_path, "orthanc", http_port=config["HttpPort"], dicom_port=config["DicomPort"]
    )
    # Write the shipped config as is (ports aside): OrthancProcess's defaults don't apply.
    server.full_config = lambda: config  # type: ignore[method-assign]
    # run.sh's own mkdir line makes the folders, as `make run` does.
    mkdir = next(
        line
        for line in (REPO_ROOT / "scripts" / "run.sh").read_text().splitlines()
        if line.startswith("mkdir -p var")
    )
    subprocess.run(["bash", "-c", mkdir], cwd=tmp_path, check=True)
    server.start()
    try:
        sample = data("images", "CT_small.dcm")
        server.upload(sample.read_bytes())
        deadline = time.monotonic() + stable_age + 15
        zips: list[Path] = []
        while time.monotonic() < deadline and not zips:
            zips = list((tmp_path / "var" / "zips").rglob("*.zip"))
            time.sleep(0.2)
        assert zips, f"no zip under var/zips after {stable_age + 15}s:\n{server.log_tail()}"
        ds = pydicom.dcmread(sample, stop_before_pixels=True)
        assert zips[0].relative_to(tmp_path / "var" / "zips").parts[0] == ds.PatientID
        status = server.get("/dicomsync/status")
        assert status.get("ConfigError") in (None, "")
    finally:
        server.stop()
