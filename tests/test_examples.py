"""The examples/ scripts run against real servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_send import make_study

from orthanc_server import REPO_ROOT, OrthancProcess


def test_sync_folder_to_orthanc_example(tmp_path: Path, orthanc: OrthancProcess) -> None:
    uids = make_study(tmp_path / "root" / "p" / "s", 3)
    script = REPO_ROOT / "examples" / "sync_folder_to_orthanc.py"
    run = [sys.executable, str(script), str(tmp_path / "root"), orthanc.url]
    first = subprocess.run(run, capture_output=True, text=True, check=True)
    assert first.stdout.startswith("1 sent, 0 duplicate, 0 failed (3 instances")
    second = subprocess.run(run, capture_output=True, text=True, check=True)
    assert second.stdout.startswith("0 sent, 1 duplicate, 0 failed")
    assert orthanc.sop_uids() == uids
