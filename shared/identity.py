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
    # Every StudyInstanceUID its instances name, when a folder mixes studies (the most
    # common one is ``study_uid``); empty when only ``study_uid`` is known.
    study_uids: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def all_study_uids(self) -> frozenset[str]:
        """``study_uids``, or just ``study_uid`` (when known) if that is all there is."""
        if self.study_uids:
            return self.study_uids
        return frozenset({self.study_uid}) if self.study_uid else frozenset()

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
        # Only the padding at the end: Orthanc keeps leading spaces and hashes them into
        # its study ID (``orthanc_study_id``).
        patient = str(ds.get("PatientID", "") or "").rstrip()
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
        study_uids=frozenset(counts),
    )


# --- safe path components -------------------------------------------------------------

# Replaced by ``_``: what file systems or shells treat specially, and every character of the
# Unicode categories that change how a name is displayed or cannot be encoded: controls
# (Cc, including U+0085), format characters (Cf, including U+202E right-to-left override
# and U+200B…U+200F), line and paragraph separators (Zl, Zp) and lone surrogates (Cs, what
# undecodable bytes become in ``os.fsdecode``).
_UNSAFE_CHARS = frozenset('/\\:*?"<>|')
_REPLACED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# One component is at most 255 bytes on Linux file systems; the rest is room for a ``.zip``
# or ``.dcm`` suffix.
MAX_COMPONENT_BYTES = 255 - len(".zip")
HASH_CHARS = 8


def name_bytes(text: str) -> int:
    """The length of ``text`` in bytes in the file-system encoding."""
    try:
        return len(os.fsencode(text))
    except UnicodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def cut_to_bytes(text: str, limit: int) -> str:
    """The longest prefix of ``text`` (whole characters) that is at most ``limit`` bytes."""
    if name_bytes(text) <= limit:
        return text
    total = 0
    for i, ch in enumerate(text):
        total += name_bytes(ch)
        if total > limit:
            return text[:i]
    return text


def _replace_unsafe(text: str) -> str:
    return "".join(
        "_" if ch in _UNSAFE_CHARS or unicodedata.category(ch) in _REPLACED_CATEGORIES else ch
        for ch in text
    )


def safe_component(
    value: str, *, empty: str = "unknown", max_bytes: int = MAX_COMPONENT_BYTES
) -> str:
    """Map a DICOM value (PatientID, a label, a member name) to one safe path component.

    The mapping, documented in the README:

    - Unicode is normalised to NFC; leading and trailing white space is stripped.
    - ``/ \\ : * ? " < > |`` and every character of the Unicode categories Cc (controls,
      NUL, U+0085), Cf (format: U+202E right-to-left override, zero-width characters),
      Zl, Zp (U+2028, U+2029) and Cs (lone surrogates) become ``_``.
    - A leading ``.`` becomes ``_`` (so nothing is hidden, and ``.``/``..`` are no paths).
    - The result is at most ``max_bytes`` (251) bytes in the file-system encoding, so that
      a ``.zip`` or ``.dcm`` suffix still fits in a 255-byte file name.
    - **The hash rule: the mapping is injective.** A value that any rule above changed
      gets ``~`` and the first 8 hex digits of the SHA-1 of the *original* value (UTF-8)
      appended, after being cut to fit (before a short extension such as ``.dcm``:
      ``a:b.dcm`` becomes ``a_b~<hash>.dcm``). So ``pat:1``, ``pat_1`` and ``pat*1`` become
      ``pat_1~20544540``, ``pat_1`` and ``pat_1~be28b37e``: three names for three
      values. A value that needs no change is kept exactly as it is, so the same value
      always maps to the same name, names stored before stay valid, and a name made
      here maps to itself (``safe_component(safe_component(v)) == safe_component(v)``),
      so a study keeps its name folder→zip→folder.
    - The empty value becomes ``empty`` (``unknown``); it is never a part of a study key
      (``split_key`` refuses empty parts).

    Two values can meet only if one of them already ends like a hashed name, with the
    very hash of the other (a value chosen to imitate it), or if two 32-bit hashes
    collide. The folder places then refuse to add a study to a destination that holds
    another StudyInstanceUID, so such a meeting fails the study rather than merging two.
    Everything else, including spaces, brackets and non-ASCII letters, is kept.
    """
    original = str(value)
    if not original:
        return empty
    text = unicodedata.normalize("NFC", original).strip()
    text = _replace_unsafe(text)
    if not text:
        text = empty
    elif text.startswith("."):
        text = "_" + text[1:]
    if text == original and name_bytes(text) <= max_bytes:
        return text
    digest = hashlib.sha1(original.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    stem, ext = _split_extension(text)
    suffix = "~" + digest + ext
    return cut_to_bytes(stem, max_bytes - name_bytes(suffix)) + suffix


_EXTENSION = re.compile(r"(?a)\.(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,4}\Z")


def _split_extension(text: str) -> tuple[str, str]:
    """``("im0", ".dcm")``: a short extension (1-4 ASCII letters or digits, one letter at
    least, so not the last part of a UID) stays last when the hash is added."""
    m = _EXTENSION.search(text)
    if m is None or m.start() == 0:
        return text, ""
    return text[: m.start()], m.group()


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
