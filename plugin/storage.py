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
the REST read would. An open file stays readable if Orthanc deletes it. When the first
``GIVE_UP_AFTER`` instances all had to be read through the REST API (a storage plugin,
say), the reader stops asking for attachment info and uses the REST API only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomsync.orthanc_client import OrthancClient
from dicomsync.tags import Event, events_from_bytes

log = logging.getLogger(__name__)

GIVE_UP_AFTER = 20
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def storage_folder(orthanc_config: Mapping[str, Any], storage: Path) -> Path | None:
    """Orthanc's storage folder if its files can be read as plain DICOM (None: they can't)."""
    if orthanc_config.get("StorageCompression") is True:
        return None
    return storage


class InstanceEvents:
    """The events of an Orthanc instance, read from the storage folder or the REST API."""

    def __init__(self, client: OrthancClient, storage: Path | None) -> None:
        self.client = client
        self.storage = storage
        self.direct = self.through_rest = 0  # how many instances each way (status, tests)
        self._why_rest = ""

    def __call__(self, instance: str) -> list[Event]:
        source = f"orthanc:{instance}"
        found = self._stored_file(instance)
        if found is not None:
            path, size = found
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size == size:
                        events = events_from_bytes(f, source=source)
                        self.direct += 1
                        return events
                self._rest_because(f"files under {self.storage} differ from their attachments")
            except FileNotFoundError:
                self._rest_because(f"the instances' files are not under {self.storage}")
            except OSError as exc:
                self._rest_because(f"cannot read files under {self.storage} ({exc.strerror})")
        self.through_rest += 1
        if self.storage is not None and self.direct == 0 and self.through_rest >= GIVE_UP_AFTER:
            log.info(
                "tag sinks: none of the first %d instances could be read from %s; "
                "reading through the REST API from now on",
                self.through_rest,
                self.storage,
            )
            self.storage = None
        return events_from_bytes(self.client.instance_file(instance), source=source)

    def _stored_file(self, instance: str) -> tuple[Path, int] | None:
        if self.storage is None:
            return None
        info = self.client.get_json(f"/instances/{instance}/attachments/dicom/info")
        uuid = str(info.get("Uuid", ""))
        size = info.get("UncompressedSize")
        if not UUID.match(uuid):
            self._rest_because("an attachment has an unexpected UUID")
            return None
        if size != info.get("CompressedSize") or info.get("UncompressedMD5") != info.get(
            "CompressedMD5"
        ):
            self._rest_because("the attachment is stored compressed")
            return None
        return self.storage / uuid[:2] / uuid[2:4] / uuid, int(size)

    def _rest_because(self, why: str) -> None:
        if why != self._why_rest:  # one line per new reason, not one per instance
            self._why_rest = why
            log.info("tag sinks read instances through the REST API: %s", why)
