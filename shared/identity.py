"""Study identity: what a study *is*, independent of where it is stored.

A study is identified by its StudyInstanceUID and the set of its SOPInstanceUIDs.
Two copies hold the same content when those are equal; a destination that holds
every SOP UID of a source study already has it.

Also here: the safe mapping from DICOM values to single path components
(``safe_component``) and Orthanc's study ID.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pydicom
from pydicom.errors import InvalidDicomError

from dicomsync.errors import DicomFileError

# Tags needed for identity; parsing stops once these are read (before any pixel data).
_IDENTITY_TAGS = ["StudyInstanceUID", "SOPInstanceUID", "PatientID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class StudyIdentity:
    """The content fingerprint of a study: its UID and the set of its instance UIDs."""

    study_uid: str
    sop_uids: frozenset[str]
    patient_id: str = field(default="", compare=False)

    def fingerprint(self) -> str:
        """A short, stable digest of the SOP UID set (for logs and the queue)."""
        digest = hashlib.sha1()
        for uid in sorted(self.sop_uids):
            digest.update(uid.encode("ascii", "replace") + b"\n")
        return digest.hexdigest()[:16]

    def missing_from(self, held: Iterable[str]) -> frozenset[str]:
        """The SOP UIDs of this study that ``held`` lacks."""
        return self.sop_uids - frozenset(held)

    def __len__(self) -> int:
        return len(self.sop_uids)


@dataclass(frozen=True)
class InstanceHeader:
    """The few header values dicomsync needs of one instance."""

    sop_uid: str
    study_uid: str
    patient_id: str
    series_uid: str


def read_header(source: str | os.PathLike[str] | bytes | IO[bytes]) -> InstanceHeader:
    """Read the identity tags of one DICOM instance, without its pixel data.

    The SOP UID falls back to the file meta's MediaStorageSOPInstanceUID; the study
    UID may be empty (a fragment then belongs to the study of the folder it is in).
    Raises ``DicomFileError`` (naming the file) for anything that is not DICOM or has
    no SOP instance UID at all.
    """
    name = _describe(source)
    fileobj: str | os.PathLike[str] | IO[bytes]
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(fileobj, stop_before_pixels=True, specific_tags=_IDENTITY_TAGS)
        sop = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not sop and getattr(ds, "file_meta", None) is not None:
            sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        patient = str(ds.get("PatientID", "") or "").strip()
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    except InvalidDicomError as exc:
        raise DicomFileError(f"{name}: not a DICOM file ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise DicomFileError(f"{name}: cannot read ({exc})") from exc
    except Exception as exc:  # pydicom raises many kinds on corrupt data
        raise DicomFileError(f"{name}: corrupt DICOM ({type(exc).__name__}: {exc})") from exc
    if not sop:
        raise DicomFileError(f"{name}: no SOPInstanceUID")
    return InstanceHeader(sop_uid=sop, study_uid=study, patient_id=patient, series_uid=series)


def _describe(source: object) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def identity_of(headers: Iterable[InstanceHeader]) -> StudyIdentity:
    """Combine instance headers into a study identity (the most common study UID wins)."""
    headers = list(headers)
    if not headers:
        return StudyIdentity(study_uid="", sop_uids=frozenset())
    counts: dict[str, int] = {}
    for h in headers:
        if h.study_uid:
            counts[h.study_uid] = counts.get(h.study_uid, 0) + 1
    study_uid = max(counts, key=lambda uid: counts[uid]) if counts else ""
    patient_id = next((h.patient_id for h in headers if h.study_uid == study_uid), "")
    return StudyIdentity(
        study_uid=study_uid,
        sop_uids=frozenset(h.sop_uid for h in headers),
        patient_id=patient_id,
    )


# --- safe path components -------------------------------------------------------------

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")
_MAX_COMPONENT = 120


def safe_component(value: str, *, empty: str = "unknown") -> str:
    """Map a DICOM value (PatientID, a label) to one safe path component.

    The mapping, documented in the README:
    - Unicode is normalised to NFC; leading and trailing white space is stripped.
    - ``/ \\ : * ? " < > |``, NUL and other control characters become ``_``.
    - A value made only of dots (``.``, ``..``) gets a leading ``_``.
    - An empty value becomes ``unknown``.
    - Values longer than 120 characters are cut and get an 8-character hash suffix.
    Everything else, including spaces, brackets and non-ASCII letters, is kept.
    """
    text = unicodedata.normalize("NFC", str(value)).strip()
    text = _UNSAFE.sub("_", text)
    if not text:
        return empty
    if set(text) == {"."}:
        text = "_" + text
    if len(text) > _MAX_COMPONENT:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        text = text[: _MAX_COMPONENT - 9] + "_" + digest
    return text


def contained_path(root: Path, *components: str) -> Path:
    """``root/c1/c2…`` built from already-safe components, checked to stay inside root."""
    path = root.joinpath(*components)
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise DicomFileError(f"refusing path outside {root}: {path}")
    return path


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's study identifier: SHA-1 of ``PatientID|StudyInstanceUID`` in 5 groups of 8."""
    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))
