"""Real Orthanc processes for tests and benchmarks: free loopback ports, temp folders, stop by PID.

Used by ``tests/conftest.py`` fixtures and by ``bench/``. It starts the Debian
package's ``/usr/sbin/Orthanc`` with a generated configuration file (never
``/etc/orthanc``, whose every JSON file would be merged in).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PG_INDEX_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
PG_STORAGE_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so"
REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SCRIPT = REPO_ROOT / "plugin" / "entry.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancProcess:
    """One Orthanc server in ``workdir``. ``config`` is merged over the loopback defaults."""

    workdir: Path
    name: str = "orthanc"
    config: dict[str, Any] = field(default_factory=dict)
    plugin: bool = False
    # load Debian's DICOMweb plugin, served at /dicom-web/ (``dicomweb_url``)
    dicomweb: bool = False
    # the "PostgreSQL" section of Debian's orthanc-postgresql 4.0: loads its index plugin
    # (and its storage plugin with "EnableStorage": true); see tests/test_multinode.py
    postgresql: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # None: --verbose when the plugin is loaded (tests read its info lines)
    verbose: bool | None = None
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def full_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": self.name,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.name.upper()[:16],
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": 2,
            "SaveJobs": False,
            "HttpCompressionEnabled": True,
        }
        if self.plugin:
            cfg["Plugins"] = [PYTHON_PLUGIN]
            cfg["PythonScript"] = str(PLUGIN_SCRIPT)
        cfg.update(self.config)
        if self.dicomweb:
            cfg["Plugins"] = [*cfg.get("Plugins", []), DICOMWEB_PLUGIN]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", **cfg.get("DicomWeb", {})}
        if self.postgresql is not None:
            storage = [PG_STORAGE_PLUGIN] if self.postgresql.get("EnableStorage") else []
            cfg["Plugins"] = [*cfg.get("Plugins", []), PG_INDEX_PLUGIN, *storage]
            cfg["PostgreSQL"] = {"EnableIndex": True, "EnableStorage": False, **self.postgresql}
        return cfg

    def write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.full_config(), indent=2))

    def start(self, timeout: float = 30.0) -> Self:
        self.write_config()
        env = {**os.environ, **self.env}
        args = [ORTHANC_BIN]
        if self.verbose or (self.verbose is None and self.plugin):
            args.append("--verbose")
        args.append(str(self.config_path))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/system", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Orthanc {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, wait, then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        self._log.close()

    def kill(self) -> None:
        """SIGKILL by PID: a crash."""
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None
        self._log.close()

    # --- small REST helpers for tests ------------------------------------------------------
    def get(self, path: str, **kw: Any) -> Any:
        r = requests.get(self.url + path, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def upload(self, data: bytes) -> dict[str, Any]:
        r = requests.post(
            self.url + "/instances",
            data=data,
            headers={"Content-Type": "application/dicom", "Accept-Encoding": "identity"},
            timeout=30,
        )
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def upload_files(self, paths: list[Path]) -> None:
        with requests.Session() as s:
            for p in paths:
                s.post(
                    self.url + "/instances",
                    data=p.read_bytes(),
                    headers={"Accept-Encoding": "identity"},
                    timeout=30,
                ).raise_for_status()

    def sop_uids(self) -> set[str]:
        """Every SOPInstanceUID stored."""
        instances = self.get("/instances?expand")
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}

    def study_sop_uids(self) -> dict[str, set[str]]:
        """StudyInstanceUID -> set of SOPInstanceUIDs."""
        out: dict[str, set[str]] = {}
        for study in self.get("/studies?expand"):
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            insts = self.get(f"/studies/{study['ID']}/instances")
            out[uid] = {i["MainDicomTags"]["SOPInstanceUID"] for i in insts}
        return out
