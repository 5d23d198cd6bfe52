"""Sync a folder tree (<root>/<patient>/<study>/**) into an Orthanc server.

    python examples/sync_folder_to_orthanc.py /data/studies http://127.0.0.1:8042

Only instances the server lacks are uploaded; run it as often as you like.
Set ORTHANC_USER and ORTHANC_PASSWORD in the environment if the server needs them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from dicomsync.errors import DicomSyncError
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.places.dicom_root import DicomRoot
from dicomsync.places.orthanc import OrthancPlace
from dicomsync.transfer import send


def main(root: str, url: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    source = DicomRoot("folder", Path(root))
    transport = HttpTransport(
        url, os.environ.get("ORTHANC_USER"), os.environ.get("ORTHANC_PASSWORD")
    )
    with OrthancPlace("orthanc", OrthancClient(transport), url=url) as dest:
        try:
            summary = send(((source, ref) for ref in source.studies()), dest)
        except DicomSyncError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 1
    print(summary.line())
    for outcome in summary.outcomes:
        if outcome.status == "failed":
            print(f"failed {outcome.ref}: {outcome.error}", file=sys.stderr)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
