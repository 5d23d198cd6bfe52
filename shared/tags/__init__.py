"""Events from DICOM instances: simplified tags, and flattened radiation-dose reports.

One code path for the CLI and the plugin: events are computed from an instance's
bytes with pydicom, headers only (``stop_before_pixels``), so the same file gives the
same events whether it comes from a folder, a zip or Orthanc.

Public API::

    from dicomsync.tags import Event, events_from_bytes, events_from_dataset

    events = events_from_bytes(data, source="orthanc:2f3a…")   # list[Event]

For every instance:

- ``<SOPInstanceUID>:instance`` — sourcetype ``dicomsync:instance``; fields are the
  Orthanc-style simplified tags (``dicomsync.tags.simplify``). For dose reports the
  ``ContentSequence`` is left out of this event: the ``dose_report`` event carries
  the content tree, flattened and lossless.

For dose reports (``dicomsync.tags.dose.is_dose_report``), in addition:

- ``<SOPInstanceUID>:dose_report`` — sourcetype ``dicomsync:dose_report``; fields are
  the study context (``dose.CONTEXT_TAGS`` + ``Device Observer UID``) plus the whole
  flattened report under its root concept meaning (``dicomsync.tags.sr``);
- ``<SOPInstanceUID>:event:<Irradiation Event UID>`` (or ``…:event:<n>`` when the
  event has no UID, or repeats one) — sourcetype ``dicomsync:dose_event``; one per
  CT Acquisition (TID 10013) and Irradiation Event X-Ray Data (TID 10003): the study
  context, ``EventType``, ``EventIndex``, ``Irradiation Event UID`` and the event's
  flattened content at the top level (``"CT Dose.Mean CTDIvol"``).

Times follow ``dicomsync.tags.dose`` (content/instance date-time with
TimezoneOffsetFromUTC, then study date-time, then now); ``Event.time_source`` says
which rule gave the time. Event ids are stable: the same instance always gives the
same ids, so sinks can deduplicate on them.

Errors: ``DicomFileError`` when the bytes are not DICOM or lack a SOPInstanceUID.
A bad SR content item never fails the instance (see ``dicomsync.tags.sr``).

Nesting: a hostile file may nest sequences thousands of levels deep. Our walks stop
at ``simplify.MAX_DEPTH`` / ``sr.MAX_DEPTH`` levels with an ``@invalid`` placeholder
(the other instances, and the rest of this one, are indexed as usual). pydicom itself
parses *undefined-length* sequences recursively while reading: past about 200 levels
it raises ``RecursionError``, which becomes ``DicomFileError("…: corrupt DICOM
(sequences nested too deep)")``. (With Python's default recursion limit that takes
about 100 KB of C stack; threads get 8 MB by default. A thread with less than 128 KB
of stack could crash in pydicom before Python's limit is reached.)
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomsync.errors import DicomFileError
from dicomsync.tags import dose, sr
from dicomsync.tags.lite import reader_for
from dicomsync.tags.simplify import simplify, utf8_repair_enabled

log = logging.getLogger(__name__)

SOURCETYPE_INSTANCE = "dicomsync:instance"
SOURCETYPE_DOSE_REPORT = "dicomsync:dose_report"
SOURCETYPE_DOSE_EVENT = "dicomsync:dose_event"
SOURCETYPES = (SOURCETYPE_INSTANCE, SOURCETYPE_DOSE_REPORT, SOURCETYPE_DOSE_EVENT)
_CONTENT_SEQUENCE = frozenset({0x0040A730})
TOO_DEEP = "corrupt DICOM (sequences nested too deep)"


@dataclass
class Event:
    """One record for a sink.

    ``id`` is stable and unique per event; ``time`` is epoch seconds (UTC);
    ``time_source`` names the rule that gave ``time``; ``fields`` is a JSON-ready
    object; ``source`` says where the instance came from (a path or an Orthanc id)
    and is not part of the event's identity.
    """

    id: str
    sourcetype: str
    time: float
    time_source: str
    fields: dict[str, Any]
    source: str = field(default="", compare=False)

    @property
    def study_uid(self) -> str:
        return str(self.fields.get("StudyInstanceUID") or "")

    def to_json(self) -> dict[str, Any]:
        """The object ``dicomsync tags`` prints (one per line)."""
        return {
            "id": self.id,
            "sourcetype": self.sourcetype,
            "time": self.time,
            "time_source": self.time_source,
            "source": self.source,
            "event": self.fields,
        }


def read_dataset(source: bytes | BinaryIO, *, name: str = "") -> Dataset:
    """Parse an instance's headers from its bytes or from a binary file open at its start
    (read only up to the pixel data); DicomFileError when it is not DICOM. A file that
    cannot be read raises its OSError (the caller knows which file it was)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, stream = name or f"<{len(source)} bytes>", cast(BinaryIO, io.BytesIO(source))
    else:
        label, stream = name or "<stream>", source
    start = stream.tell()
    try:
        try:
            return pydicom.dcmread(stream, stop_before_pixels=True)
        except InvalidDicomError:
            # Files without preamble/meta: accept only if they parse to a SOP instance.
            stream.seek(start)
            ds = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
            if "SOPInstanceUID" not in ds:
                raise
            return ds
    except InvalidDicomError:
        raise DicomFileError(f"{label}: not a DICOM file") from None
    except RecursionError:  # pydicom recurses per level of an undefined-length sequence
        raise DicomFileError(f"{label}: {TOO_DEEP}") from None
    except OSError as exc:
        if stream is source:  # reading the file failed (EIO, a vanished share), not its content
            raise
        raise DicomFileError(f"{label}: corrupt DICOM ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pydicom raises many kinds on corrupt data
        raise DicomFileError(f"{label}: corrupt DICOM ({type(exc).__name__}: {exc})") from None


def events_from_bytes(
    data: bytes | BinaryIO, *, source: str = "", now: float | None = None
) -> list[Event]:
    """All events of one instance, given as bytes or as a binary file open at its start
    (see the module docstring); a file is read only up to its pixel data."""
    ds = read_dataset(data, name=source)
    return events_from_dataset(ds, source=source, now=now)


def events_from_path(path: Path) -> list[Event]:
    try:
        with open(path, "rb") as f:
            return events_from_bytes(f, source=str(path))
    except OSError as exc:
        raise DicomFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def events_from_dataset(ds: Dataset, *, source: str = "", now: float | None = None) -> list[Event]:
    """All events of one parsed instance (headers are enough)."""
    try:
        return _events(ds, source, now)
    except RecursionError:  # a last guard: every walk of ours is depth-bounded
        label = source or str(ds.get("SOPInstanceUID", "") or "instance")
        raise DicomFileError(f"{label}: {TOO_DEEP}") from None


def _events(ds: Dataset, source: str, now: float | None) -> list[Event]:
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop_uid:
        raise DicomFileError(f"{source or 'instance'}: no SOPInstanceUID")
    repair = utf8_repair_enabled(ds)
    when, time_source = dose.instance_time(ds, now=now)
    try:
        is_dose = dose.is_dose_report(ds)
    except Exception as exc:
        log.warning("%s: cannot tell whether it is a dose report: %s", source or sop_uid, exc)
        is_dose = False
    # A dose report's content tree is in its dose_report event, flattened and lossless;
    # the instance event leaves it out (it would double the size and the parsing time).
    skip = _CONTENT_SEQUENCE if is_dose else frozenset()
    events = [
        Event(
            id=f"{sop_uid}:instance",
            sourcetype=SOURCETYPE_INSTANCE,
            time=when,
            time_source=time_source,
            fields=simplify(ds, repair=repair, skip=skip),
            source=source,
        )
    ]
    if not is_dose:
        return events

    flattener = sr.Flattener(repair, reader_for(ds))
    context = dose.study_context(ds, flattener)
    report: dict[str, Any] = dict(context)
    report.update(sr.flatten(ds, repair=repair, flattener=flattener))
    events.append(
        Event(
            id=f"{sop_uid}:dose_report",
            sourcetype=SOURCETYPE_DOSE_REPORT,
            time=when,
            time_source=time_source,
            fields=report,
            source=source,
        )
    )
    seen: set[str] = set()
    for fields, started, offset_known in dose.irradiation_events(ds, context, flattener):
        uid = fields.get("Irradiation Event UID")
        suffix = (
            str(uid)
            if isinstance(uid, str) and uid and uid not in seen
            else str(fields["EventIndex"])
        )
        seen.add(suffix)
        if started is not None:
            ev_time, ev_source = (
                started,
                "event_start" + ("+tz" if offset_known else "/utc-assumed"),
            )
        else:
            ev_time, ev_source = when, time_source
        events.append(
            Event(
                id=f"{sop_uid}:event:{suffix}",
                sourcetype=SOURCETYPE_DOSE_EVENT,
                time=ev_time,
                time_source=ev_source,
                fields=fields,
                source=source,
            )
        )
    return events


__all__ = [
    "SOURCETYPES",
    "SOURCETYPE_DOSE_EVENT",
    "SOURCETYPE_DOSE_REPORT",
    "SOURCETYPE_INSTANCE",
    "Event",
    "events_from_bytes",
    "events_from_dataset",
    "events_from_path",
    "read_dataset",
]
