"""Helpers for the plugin tests and benchmarks: Orthanc pairs with the dicomsync plugin."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import requests

from dicomsync.identity import safe_component

from orthanc_server import PYTHON_PLUGIN, OrthancProcess

COUNTER_SCRIPT = Path(__file__).resolve().parent / "orthanc_counter.py"


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def counting_orthanc(workdir: Path, name: str, **kw: Any) -> OrthancProcess:
    """A plain Orthanc destination that counts every ``POST /instances`` (``GET /counter``)."""
    config = {
        "Plugins": [PYTHON_PLUGIN],
        "PythonScript": str(COUNTER_SCRIPT),
        **kw.pop("config", {}),
    }
    return OrthancProcess(workdir, name, config=config, **kw)


def posted(server: OrthancProcess) -> int:
    return int(server.get("/counter")["PostInstances"])


def plugin_orthanc(
    workdir: Path, name: str, places: dict[str, Any], routes: list[dict[str, Any]], **extra: Any
) -> OrthancProcess:
    sync = {
        "Places": places,
        "Routes": routes,
        "Retry": {"BaseDelay": 0.5, "MaxDelay": 4, "MaxAttempts": 100},
        "PollInterval": 0.5,
        "MetricsInterval": 0.5,
        **extra.pop("sync", {}),
    }
    config = {"StableAge": 1, "DicomSync": sync, **extra.pop("config", {})}
    return OrthancProcess(workdir, name, config=config, plugin=True, **extra)


def status(server: OrthancProcess) -> dict[str, Any]:
    result: dict[str, Any] = server.get("/dicomsync/status")
    return result


def jobs(server: OrthancProcess, **params: Any) -> list[dict[str, Any]]:
    r = requests.get(server.url + "/dicomsync/jobs", params={"limit": 10000, **params}, timeout=30)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()["Jobs"]
    return result


def settled(server: OrthancProcess, expected: dict[str, int]) -> bool:
    """Every destination has ``expected[dest]`` done jobs and nothing queued or sending."""
    dests = status(server).get("Destinations", {})
    return all(
        dests.get(d, {}).get("Done") == n and dests[d]["Queued"] == 0 and dests[d]["Sending"] == 0
        for d, n in expected.items()
    )


def studies_by_id(server: OrthancProcess) -> dict[str, set[str]]:
    """Orthanc study ID -> SOP UIDs (IDs are the same on every Orthanc for the same study)."""
    out: dict[str, set[str]] = {}
    for study_id in server.get("/studies"):
        out[study_id] = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in server.get(f"/studies/{study_id}/instances")
        }
    return out


def study_keys(server: OrthancProcess) -> dict[str, tuple[str, str]]:
    """Orthanc study ID -> (safe PatientID, safe StudyInstanceUID): the zip's key."""
    out = {}
    for s in server.get("/studies?expand"):
        out[s["ID"]] = (
            safe_component(s["PatientMainDicomTags"].get("PatientID", "")),
            safe_component(s["MainDicomTags"]["StudyInstanceUID"]),
        )
    return out


def zip_sop_uids(path: Path) -> set[str]:
    uids = set()
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                uids.add(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    return uids


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def metrics(server: OrthancProcess) -> dict[str, float]:
    text = requests.get(server.url + "/tools/metrics-prometheus", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("dicomsync"):
            name, value, *_ = line.split(" ")
            out[name] = float(value)
    return out
