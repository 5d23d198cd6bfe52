"""Read an instance's headers straight from Orthanc's storage folder, when that is safe.

The tag sinks need only what precedes the pixel data. Through the REST API an instance
comes whole (0.5 MB for a CT slice), copied through Orthanc's storage cache and into
Python, while Orthanc is busy storing the next upload. With Orthanc's default storage
(plain files under ``StorageDirectory``, named by the attachment's UUID in two levels of
folders, as the Orthanc Book describes) the plugin can instead open the file and parse
it up to the pixel data: a few kilobytes instead of the whole file.

It does so only when every check holds, and otherwise reads through the REST API as
before, so the events are the same either way:

- ``StorageCompression`` is not on in Orthanc's configuration;
- ``/instances/{id}/attachments/dicom/info`` gives a well-formed UUID and the same
  compressed and uncompressed size and MD5 (the attachment is stored as is);
- the file exists at that path and has that size (a storage plugin keeps its files
  elsewhere: the file is not there, and the REST API reads it).

An instance deleted meanwhile answers 404 to the info call (``NotFound``), exactly as
the REST read would. An open file stays readable if Orthanc deletes it. A file that
cannot be read or parsed there is read again through the REST API, which decides.
When the files of the first ``GIVE_UP_AFTER`` instances are all missing from the folder
(a storage plugin, say), the reader stops asking for attachment info and uses the REST
API only.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomsync.errors import DicomFileError
from dicomsync.orthanc_client import OrthancClient
from dicomsync.tags import Event, events_from_bytes

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 20
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def storage_folder(orthanc_config: Mapping[str, Any], storage: Path) -> Path | None:
    """Orthanc's storage folder if its files can be read as plain DICOM (None: they can't)."""
    if orthanc_config.get("StorageCompression") is True:
        return None
    return storage


class InstanceEvents:
    """The events of an Orthanc instance, read from the storage folder or the REST API.

    Called from every sink lane at once: the counters and the give-up rule are under a
    lock, and each call works on its own snapshot of the folder.
    """

    def __init__(self, client: OrthancClient, storage: Path | None) -> None:
        self.client = client
        self.storage = storage
        self.direct = self.through_rest = 0  # how many instances each way (status, tests)
        self._missing = 0  # files not found where they should be, before the first success
        self._why_rest = ""
        self._lock = threading.Lock()

    def __call__(self, instance: str) -> list[Event]:
        source = f"orthanc:{instance}"
        storage = self.storage
        if storage is not None:
            found = self._stored_file(storage, instance)
            if found is not None:
                events = self._read_direct(storage, found, source)
                if events is not None:
                    return events
        with self._lock:
            self.through_rest += 1
        return events_from_bytes(self.client.instance_file(instance), source=source)

    def _read_direct(
        self, storage: Path, found: tuple[Path, int], source: str
    ) -> list[Event] | None:
        path, size = found
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    self._rest_because(f"files under {storage} differ from their attachments")
                    return None
                events = events_from_bytes(f, source=source)
        except FileNotFoundError:
            self._rest_because(f"the instances' files are not under {storage}", missing=True)
            return None
        except OSError as exc:
            self._rest_because(f"cannot read files under {storage} ({exc.strerror})")
            return None
        except DicomFileError:
            # the REST API reads the same bytes: it confirms (or not) that they are corrupt
            self._rest_because(f"a file under {storage} did not parse")
            return None
        with self._lock:
            self.direct += 1
        return events

    def _stored_file(self, storage: Path, instance: str) -> tuple[Path, int] | None:
        info = self.client.get_json(f"/instances/{instance}/attachments/dicom/info")
        uuid = str(info.get("Uuid", ""))
        size = info.get("UncompressedSize")
        if not UUID.fullmatch(uuid) or not isinstance(size, int):
            self._rest_because("an attachment has an unexpected UUID or size")
            return None
        if size != info.get("CompressedSize") or info.get("UncompressedMD5") != info.get(
            "CompressedMD5"
        ):
            self._rest_because("the attachment is stored compressed")
            return None
        return storage / uuid[:2] / uuid[2:4] / uuid, size

    def _rest_because(self, why: str, *, missing: bool = False) -> None:
        with self._lock:
            if why != self._why_rest:  # one line per new reason, not one per instance
                self._why_rest = why
                log.info("tag sinks read instances through the REST API: %s", why)
            if missing and self.direct == 0 and self.storage is not None:
                self._missing += 1
                if self._missing >= GIVE_UP_AFTER:
                    log.info(
                        "tag sinks: none of the first %d instances were in %s; reading "
                        "through the REST API from now on",
                        self._missing,
                        self.storage,
                    )
                    self.storage = None
