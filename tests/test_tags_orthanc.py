"""The same file gives identical events from a folder and from a real Orthanc."""

from __future__ import annotations

import requests
from test_tags_flatten import dose_files

from dicomsync.tags import events_from_bytes, events_from_path

from orthanc_server import OrthancProcess


def test_identical_events_from_folder_and_from_orthanc(orthanc: OrthancProcess) -> None:
    files = dose_files()
    compared = 0
    with requests.Session() as s:
        s.headers["Accept-Encoding"] = "identity"
        for path in files:
            answer = orthanc.upload(path.read_bytes())
            stored = s.get(f"{orthanc.url}/instances/{answer['ID']}/file", timeout=30)
            stored.raise_for_status()
            from_orthanc = events_from_bytes(stored.content, source=f"orthanc:{answer['ID']}")
            from_folder = events_from_path(path)
            assert from_orthanc == from_folder, path.name  # source is not part of equality
            assert from_orthanc[0].source == f"orthanc:{answer['ID']}"
            compared += len(from_folder)
    assert compared > 100  # instance, summary and per-event events of 21 files
