"""Radiation-dose reports: detection, per-irradiation-event records, event times.

Detection (``is_dose_report``)
    SOP classes X-Ray Radiation Dose SR (1.2.840.10008.5.1.4.1.1.88.67),
    Radiopharmaceutical Radiation Dose SR (…88.68) and Patient Radiation Dose SR
    (…88.76) are dose reports. Enhanced, Comprehensive, Comprehensive 3D and
    Extensible SR (…88.22, .33, .34, .35) are dose reports when their root concept is
    one: code DCM 113701 (X-Ray Radiation Dose Report), DCM 113500
    (Radiopharmaceutical Radiation Dose Report), DCM 128700 (Patient Radiation Dose
    Report), or, for vendors who get the code wrong, a root meaning ending in
    "Radiation Dose Report". GE stores CT dose as Enhanced SR.

Irradiation events (``irradiation_events``)
    Every CONTAINER "CT Acquisition" (DCM 113819, TID 10013) or "Irradiation Event
    X-Ray Data" (DCM 113706, TID 10003), found anywhere in the tree, by code or (when
    the code is missing) by meaning. Each becomes one record: the study context
    (``study_context``) plus ``EventType``, ``EventIndex`` (1-based, document order)
    and the event container's flattened children at the top level, so
    ``"CT Dose.Mean CTDIvol"`` is a field of the event.

Event time (``instance_time``, ``event_time``)
    An instance's time is the first of: ContentDate+ContentTime,
    InstanceCreationDate+InstanceCreationTime, StudyDate+StudyTime, each read with
    TimezoneOffsetFromUTC (lenient: ``-0400``, ``-04:00`` and ``UTC-04:00`` are
    accepted); without an offset the time is taken as UTC. When none is usable, now.
    ``time_source`` says which: ``content``, ``instance_creation``, ``study`` or
    ``now``, followed by ``+tz`` (offset applied) or ``/utc-assumed``.
    An irradiation event's time is its "DateTime Started" (DCM 111526; its own
    offset, else TimezoneOffsetFromUTC, else UTC) with ``time_source`` ``event_start``;
    otherwise the report's time. Events may be out of time order in a report
    (Carestream); their times are kept as written.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset

from dicomsync.tags.sr import (
    MAX_DEPTH,
    T_CODE_MEANING,
    T_CONCEPT_NAME,
    T_CONTENT,
    T_DATETIME,
    T_TEXT,
    T_UID,
    T_VALUE_TYPE,
    Flattener,
    code_string,
)

DOSE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.76",  # Patient Radiation Dose SR
    }
)
GENERIC_SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    }
)
DOSE_ROOT_CODES = frozenset({"DCM:113701", "DCM:113500", "DCM:128700"})
EVENT_CODES = {"DCM:113819": "CT Acquisition", "DCM:113706": "Irradiation Event X-Ray Data"}
EVENT_MEANINGS = {m.lower(): m for m in EVENT_CODES.values()}
CODE_IRRADIATION_EVENT_UID = "DCM:113769"
CODE_DEVICE_OBSERVER_UID = "DCM:121012"
CODE_DATETIME_STARTED = "DCM:111526"

# Header values copied into every dose summary and dose event (the "study context").
CONTEXT_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "InstitutionName",
)


def _root_code(ds: Dataset) -> tuple[str | None, str | None]:
    seq = ds.get("ConceptNameCodeSequence")
    if not seq:
        return None, None
    meaning = seq[0].get("CodeMeaning")
    return (str(meaning) if meaning is not None else None), code_string(seq[0])


def is_dose_report(ds: Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class in DOSE_SOP_CLASSES:
        return True
    if sop_class not in GENERIC_SR_CLASSES:
        return False
    meaning, code = _root_code(ds)
    if code in DOSE_ROOT_CODES:
        return True
    return bool(meaning and meaning.strip().lower().endswith("radiation dose report"))


# --- time --------------------------------------------------------------------------------
_OFFSET = re.compile(r"([+-])\s*(\d{1,2}):?(\d{2})")


def parse_offset(text: str) -> int | None:
    """Seconds east of UTC from ``+0100``, ``-04:00``, ``UTC-04:00``; None if absent/bad."""
    match = _OFFSET.search(text or "")
    if not match:
        return None
    sign = -1 if match.group(1) == "-" else 1
    hours, minutes = int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes >= 60:
        return None
    return sign * (hours * 3600 + minutes * 60)


def _epoch(date: str, tm: str) -> float | None:
    """Naive epoch seconds (as if UTC) of a DA + TM pair; None if unusable."""
    date = (date or "").strip()
    if not re.fullmatch(r"\d{8}", date):
        return None
    tm = (tm or "").strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", tm) if tm else None
    if tm and not match:
        return None
    hh = int(match.group(1)) if match else 0
    mm = int(match.group(2) or 0) if match else 0
    ss = int(match.group(3) or 0) if match else 0
    frac = float(match.group(4)) if match and match.group(4) else 0.0
    try:
        year, month, day = int(date[:4]), int(date[4:6]), int(date[6:8])
        if not (1 <= month <= 12 and 1 <= day <= 31 and hh < 24 and mm < 60 and ss < 61):
            return None
        return calendar.timegm((year, month, day, hh, mm, min(ss, 59), 0, 0, 0)) + frac
    except (ValueError, OverflowError):
        return None


def parse_datetime(text: str, default_offset: int | None) -> tuple[float, bool] | None:
    """A DT value as (epoch, offset_known); its own ``+hhmm`` wins over ``default_offset``."""
    text = (text or "").strip()
    match = re.fullmatch(r"(\d{8})(\d{2,6}(?:\.\d{1,6})?)?([+-]\d{4})?", text)
    if not match:
        return None
    naive = _epoch(match.group(1), match.group(2) or "")
    if naive is None:
        return None
    offset = parse_offset(match.group(3)) if match.group(3) else default_offset
    return naive - (offset or 0), offset is not None


def instance_time(ds: Dataset, now: float | None = None) -> tuple[float, str]:
    """(epoch seconds, time_source) of an instance; see the module docstring."""
    offset = parse_offset(str(ds.get("TimezoneOffsetFromUTC", "") or ""))
    suffix = "+tz" if offset is not None else "/utc-assumed"
    for date_kw, time_kw, name in (
        ("ContentDate", "ContentTime", "content"),
        ("InstanceCreationDate", "InstanceCreationTime", "instance_creation"),
        ("StudyDate", "StudyTime", "study"),
    ):
        naive = _epoch(str(ds.get(date_kw, "") or ""), str(ds.get(time_kw, "") or ""))
        if naive is not None:
            return naive - (offset or 0), name + suffix
    return (time.time() if now is None else now), "now"


# --- context and events ------------------------------------------------------------------
def study_context(ds: Dataset, flattener: Flattener) -> dict[str, Any]:
    """The header values every dose record carries, plus the Device Observer UID."""
    from dicomsync.tags.simplify import fix_text

    ctx: dict[str, Any] = {}
    for kw in CONTEXT_TAGS:
        try:
            value = ds.get(kw)
        except Exception:
            value = None
        ctx[kw] = None if value is None or value == "" else fix_text(str(value), flattener.repair)
    content = _safe_seq(flattener, ds, T_CONTENT)
    ctx["Device Observer UID"] = _find_value(content, CODE_DEVICE_OBSERVER_UID, flattener)
    return ctx


def _safe_seq(fl: Flattener, node: Any, tag: int) -> list[Any]:
    try:
        return fl.seq(node, tag) or []
    except Exception:
        return []


def _find_value(items: Any, code: str, fl: Flattener) -> str | None:
    """The UID/text/date-time value of the first item (this level) with concept ``code``."""
    for item in items:
        try:
            names = fl.seq(item, T_CONCEPT_NAME)
            if names and fl.code_string(names[0]) == code:
                for tag in (T_UID, T_TEXT, T_DATETIME):
                    value = fl.fast_text(item, tag)
                    if value:
                        return value
        except Exception:
            continue
    return None


def _event_type(item: Any, fl: Flattener) -> str | None:
    if (fl.fast_text(item, T_VALUE_TYPE) or "").strip().upper() != "CONTAINER":
        return None
    names = fl.seq(item, T_CONCEPT_NAME)
    if not names:
        return None
    code = fl.code_string(names[0])
    if code in EVENT_CODES:
        return EVENT_CODES[code]
    meaning = (fl.fast_text(names[0], T_CODE_MEANING) or "").strip().lower()
    return EVENT_MEANINGS.get(meaning)


def _event_containers(items: Any, fl: Flattener) -> Iterator[tuple[str, Any, int]]:
    """(kind, container, level) of every event container, in document order.

    A flat walk with its own stack (no recursion), down to ``sr.MAX_DEPTH`` levels, as
    deep as the flattener goes: a hostile file may nest thousands of levels.
    """
    stack: list[Iterator[Any]] = [iter(items)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        try:
            kind = _event_type(item, fl)
        except Exception:
            kind = None
        if kind is not None:
            yield kind, item, len(stack)
        elif len(stack) < MAX_DEPTH:
            stack.append(iter(_safe_seq(fl, item, T_CONTENT)))


_END = object()


def irradiation_events(
    ds: Dataset, context: dict[str, Any], flattener: Flattener
) -> Iterator[tuple[dict[str, Any], float | None, bool]]:
    """Per-event records: (fields, start epoch or None, offset_known)."""
    default_offset = parse_offset(str(ds.get("TimezoneOffsetFromUTC", "") or ""))
    content = _safe_seq(flattener, ds, T_CONTENT)
    for index, (kind, container, level) in enumerate(_event_containers(content, flattener)):
        children = _safe_seq(flattener, container, T_CONTENT)
        fields: dict[str, Any] = dict(context)
        fields["EventType"] = kind
        fields["EventIndex"] = index + 1
        fields["Irradiation Event UID"] = _find_value(
            children, CODE_IRRADIATION_EVENT_UID, flattener
        )
        fields.update(flattener.container(children, level + 1))
        started = _find_value(children, CODE_DATETIME_STARTED, flattener)
        parsed = parse_datetime(started, default_offset) if started else None
        if parsed is None:
            yield fields, None, False
        else:
            yield fields, parsed[0], parsed[1]
