"""The newcomer's path: ``make run``, one upload, a zip under var/zips.

``make run`` runs ``scripts/run.sh``, which starts Orthanc with ``orthanc.json`` from the
repo root. This runs ``make run`` itself, in a temporary copy of the repo root (the
Makefile, the scripts, ``orthanc.json`` with only its two ports changed, since 8042 may be
taken on a test machine, and the plugin folder linked), so storage, queue and zips land
under the copy's ``var/``. Setup is marked done (its stamp is fresh; a ``setup.sh`` that
fails stands in, so a make that wanted to reinstall fails the test instead). Orthanc is
stopped through the process group the test started, by its id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import requests

from dicomdata import data
from orthanc_server import ORTHANC_BIN, REPO_ROOT, free_port


def _repo_copy(root: Path) -> dict[str, int]:
    """The files ``make run`` reads, under ``root``; returns the shipped config, ports changed."""
    (root / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "Makefile", root / "Makefile")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO_ROOT / "scripts" / "run.sh", root / "scripts" / "run.sh")
    (root / "scripts" / "setup.sh").write_text("echo 'make wanted to run setup' >&2; exit 97\n")
    (root / "plugin").symlink_to(REPO_ROOT / "plugin", target_is_directory=True)
    config = json.loads((REPO_ROOT / "orthanc.json").read_text())
    config["HttpPort"], config["DicomPort"] = free_port(), free_port()
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    stamp = root / ".venv" / ".dicomsync-installed"
    stamp.parent.mkdir()
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))
    return config


def _wait_for_status(url: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"make run exited {proc.returncode}:\n{log.read_text()}")
        try:
            r = requests.get(url + "/dicomsync/status", timeout=1)
            if r.ok:
                status: dict[str, object] = r.json()
                return status
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /dicomsync/status after 60 s:\n{log.read_text()}")


def test_make_run_serves_the_plugin_and_zips_an_upload(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    config = _repo_copy(root)
    url = f"http://127.0.0.1:{config['HttpPort']}"
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "run"],
            cwd=root,
            env={**os.environ, "ORTHANC_BIN": ORTHANC_BIN},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status = _wait_for_status(url, proc, log)
        assert status.get("ConfigError") in (None, "")
        for folder in ("orthanc", "dicomsync", "zips"):
            assert (root / "var" / folder).is_dir(), folder
        sample = data("images", "CT_small.dcm")
        requests.post(url + "/instances", data=sample.read_bytes(), timeout=30).raise_for_status()
        wait = int(config["StableAge"]) + 15
        deadline = time.monotonic() + wait
        zips: list[Path] = []
        while time.monotonic() < deadline and not zips:
            zips = list((root / "var" / "zips").rglob("*.zip"))
            time.sleep(0.2)
        assert zips, f"no zip under var/zips after {wait}s:\n{log.read_text()}"
        ds = pydicom.dcmread(sample, stop_before_pixels=True)
        assert zips[0].relative_to(root / "var" / "zips").parts[0] == ds.PatientID
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
