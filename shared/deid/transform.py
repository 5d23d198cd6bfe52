"""The instance transform: one DICOM instance's bytes in, its de-identified bytes out.

``Deidentifier(profile, keys).instance(data, study)`` parses the instance, refuses it
when it may carry burned-in identity (``DeidentificationRefused``), applies the
profile's resolved Table E.1-1 to every attribute at every depth, and writes it in
its own transfer syntax. Pixel data is never touched. Pure (no I/O), thread-safe.

How each action is applied (PS3.15 Table E.1-1a):

- ``X`` removes, ``Z`` empties (a sequence: no items), ``K`` keeps (a sequence: its
  items are still de-identified), ``U`` replaces each UID by ``Keys.uid``;
- ``D``: a dummy of the VR (``ANONYMIZED``, ``19000101``, ``0``); PatientID and
  PatientName get the study's pseudonym. On a sequence, ``D`` keeps the items with
  every value in them replaced by a dummy, except the Content Sequence of a structured
  report, whose tree is walked as content (below);
- ``C``: dates (DA, DT) move back by the patient's offset, times stay; text keeps its
  value with every identifying value of the instance (names, IDs, birth date,
  accession, institution, physicians, station, serial number) cut out; a sequence is
  walked as for ``K``;
- compound codes take the variant that keeps the IOD conformant: ``X/Z`` is ``Z``;
  ``X/D``, ``Z/D`` and ``X/Z/D`` are ``D``; ``X/Z/U*`` keeps the sequence and replaces
  the UIDs inside it.

A public element read as UN is read with the dictionary's VR first (a sequence's items
as implicit VR); one the dictionary does not know is removed. Attributes the table does
not list are kept, except UIDs (any UI value that is not one of DICOM's own
``1.2.840.10008.`` UIDs is replaced, so no original UID survives), UIDs inside text
(remapped, ``values.remap_uids``), group lengths (dropped) and private attributes (the
table's private row: removed; with ``retain-safe-private``, the numeric private values
and their creators are kept).

SR content items: codes, numbers and units stay (so dose values survive); ``TEXT``
values become a dummy (with ``clean-structured-content``: cleaned as above; with
``retain-device-identity``: the device observer's UID, name, manufacturer, model, serial
number and location are kept, without it they are dummies even when cleaning; UIDs in
cleaned text are remapped); ``PNAME`` items are dummies, ``UIDREF`` items and
references are replaced, dates follow the date options.

Records added: PatientIdentityRemoved YES, DeidentificationMethod, the CID 7050 codes
of the profile and options in DeidentificationMethodCodeSequence, and
LongitudinalTemporalInformationModified.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicomsync.deid import burned_in, rawpath, table
from dicomsync.deid.keys import Keys
from dicomsync.deid.options import Profile
from dicomsync.deid.reading import pixel_tail, read_header
from dicomsync.deid.records import Records
from dicomsync.deid.values import (
    BINARY_VRS,
    BURNED_IN,
    DELETE,
    DUMMY,
    KEEP,
    NUMERIC_VRS,
    PATIENT_ID,
    PATIENT_NAME,
    RAW_VRS,
    SCANNED_VRS,
    SOP_CLASS,
    TEXT_VRS,
    Verdict,
    as_text,
    concept_of,
    identifying_values,
    map_values,
    meta_for_dcmwrite,
    remap_uids,
    remap_uids_text,
    scrubber,
    shift,
    vr_of,
    write_part10,
)
from dicomsync.errors import DicomFileError

CONTENT_SEQUENCE, TEXT_VALUE = 0x0040A730, 0x0040A160
# DCM concepts of TID 1004 Device Observer Identifying Attributes
DEVICE_CONCEPTS = frozenset({"121012", "121013", "121014", "121015", "121016", "121017"})

IMPLEMENTATION = (PYDICOM_IMPLEMENTATION_UID, "DICOMSYNC_DEID")  # we wrote the file


@dataclass(frozen=True)
class StudyKeys:
    """What one study's instances share: the pseudonym and the patient's date offset."""

    pseudonym: str
    pseudonym_name: str
    date_offset: int


class _Instance:
    """One instance's walk: its study's keys, and the pattern of its identifying values
    (read before any value changes, under a profile that cleans text; compiled when a
    value is first cleaned)."""

    def __init__(self, study: StudyKeys, ds: Dataset, cleans_text: bool) -> None:
        self.study = study
        self._values = identifying_values(ds) if cleans_text else set()
        self._scrub: re.Pattern[str] | None = None

    @property
    def scrub(self) -> re.Pattern[str] | None:
        if self._scrub is None and self._values:
            self._scrub, self._values = scrubber(self._values), set()
        return self._scrub


class Deidentifier:
    def __init__(self, profile: Profile, keys: Keys) -> None:
        self.profile = profile
        self.keys = keys
        resolved = table.actions(profile.options)
        by_tag = dict(resolved.by_tag)
        by_tag.update({t: "K" for t in profile.keep})
        by_tag.update({t: "X" for t in profile.remove})
        self.actions = table.Actions(by_tag, resolved.groups, resolved.private)
        self.retain_uids = "retain-uids" in profile.options
        self.clean_content = "clean-structured-content" in profile.options
        self.device_identity = "retain-device-identity" in profile.options
        # whether a chosen option's column cleans (C) a value that is no date or time;
        # the Basic Profile alone never does
        self.cleans_text = table.cleans_text(profile.options)
        self.records = Records(profile)

    def uid(self, uid: str) -> str:
        return uid if self.retain_uids else self.keys.uid(uid)

    # --- one instance ---------------------------------------------------------------------
    implementation = IMPLEMENTATION

    def instance(self, data: bytes, study: StudyKeys, name: str = "instance") -> bytes:
        fast = rawpath.deidentify(self, data, study, name)
        if fast is not None:
            return fast
        return self.general(data, study, name)

    def general(self, data: bytes, study: StudyKeys, name: str = "instance") -> bytes:
        """``instance`` by pydicom's reading of every element (``rawpath`` declined)."""
        try:
            ds, stop = read_header(data)
            tail = pixel_tail(data, stop, ds)
            if tail is None:  # not the last element as read: the whole file, decoded
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:  # pydicom raises many kinds on corrupt data
            raise DicomFileError(f"{name}: not readable DICOM ({type(exc).__name__})") from None
        self.check_burned_in(ds, name)
        try:
            self._walk(ds, _Instance(study, ds, self.cleans_text), "normal")
        except Exception as exc:  # a value no rule can read (pydicom raises many kinds)
            raise DicomFileError(
                f"{name}: cannot be de-identified ({type(exc).__name__})"
            ) from None
        self.records.put(ds, study.pseudonym, study.pseudonym_name)
        try:
            head = write_part10(ds, IMPLEMENTATION, lambda implicit: self.encoded(study, implicit))
            if head is None:
                meta_for_dcmwrite(ds, self.uid, IMPLEMENTATION)
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=False)
                head = out.getvalue()
        except Exception as exc:
            raise DicomFileError(f"{name}: cannot be written ({type(exc).__name__})") from exc
        if tail is not None:  # the pixel data, untouched, after the de-identified header
            return b"".join((head, tail))
        return head

    def check_burned_in(self, ds: Dataset, name: str) -> None:
        """The instance's SOP class and BurnedInAnnotation read as they are, not decoded
        (a decoded element would be written re-encoded)."""
        if not self.profile.allow_burned_in:
            sop_class = as_text(ds.get_item(SOP_CLASS))
            self.refuse_burned_in(sop_class, as_text(ds.get_item(BURNED_IN)), name)

    def refuse_burned_in(self, sop_class: str, burned: str, name: str) -> None:
        """``burned_in.refuse`` unless the profile allows burned-in instances."""
        if not self.profile.allow_burned_in:
            burned_in.refuse(sop_class, burned, name)

    # --- the walk -------------------------------------------------------------------------
    def walk(self, ds: Dataset, study: StudyKeys) -> None:
        """The table applied to ``ds``'s elements: some of an instance's top level, read by
        pydicom with the identifying values when the profile cleans text (``rawpath``)."""
        self._walk(ds, _Instance(study, ds, self.cleans_text), "normal")

    def _walk(self, ds: Dataset, ctx: _Instance, mode: str) -> None:
        """``mode``: ``normal``, ``dummy`` (inside a ``D`` sequence) or ``content`` (an SR
        content item)."""
        concept = concept_of(ds) if mode == "content" else ""
        for key in list(ds.keys()):
            tag = int(key)
            if tag & 0xFFFF == 0:  # a group length: wrong once values change
                del ds[tag]
                continue
            if tag >> 16 & 1:  # an odd group: private
                if self.actions.private == "C":
                    self._private(ds, ds[tag])
                else:
                    del ds[tag]
                continue
            vr = vr_of(ds, tag)
            if vr == "UN":  # a public attribute as a toolkit that does not know it wrote it
                vr = self._resolve_un(ds, tag)
                if not vr:
                    continue
            action = self.actions.get(tag)
            if action is None:
                if mode == "content" and tag == TEXT_VALUE:
                    action = self._text_action(concept)
                elif vr == "UI":
                    action = "U"
                elif mode == "dummy":
                    action = "D"
                elif vr != "SQ":  # kept as read (never decoded), but for the UIDs in its text
                    if vr in SCANNED_VRS and not self.retain_uids:
                        self._uids_in_text(ds, tag)
                    continue
                else:
                    action = "K"
            if self._raw(ds, tag, action, ctx):
                continue
            self._apply(ds, ds[tag], action, ctx, mode)

    def _resolve_un(self, ds: Dataset, tag: int) -> str:
        """The VR of a public element read as UN, from the dictionary: the element is
        re-read with it (a sequence's items as implicit VR, PS3.5 6.2.2). An attribute
        the dictionary does not know is removed (returns ""): its value cannot be judged.
        An ambiguous VR (``US or SS``: numbers) stays UN."""
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        if vr == "UN":
            del ds[tag]
            return ""
        raw = ds.get_item(tag)
        if " or " in vr or not isinstance(raw, RawDataElement):
            return "UN"
        implicit = True if vr == "SQ" else raw.is_implicit_VR
        ds._dict[BaseTag(tag)] = raw._replace(VR=vr, is_implicit_VR=implicit)
        return vr

    def _uids_in_text(self, ds: Dataset, tag: int) -> None:
        """An unlisted text value with every UID in it remapped (a RetrieveURL names its
        study, a note its series)."""
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            if raw.value is None:
                return
            new = self.text_uids(raw.value)
            if new is not None:
                ds._dict[BaseTag(tag)] = raw._replace(value=new, length=len(new))
        else:
            elem = ds[tag]
            elem.value = map_values(elem.value, lambda v: remap_uids_text(v, self.keys.uid))

    def _raw(self, ds: Dataset, tag: int, action: str, ctx: _Instance) -> bool:
        """The fast path: the common actions on a value still as read (ASCII VRs), without
        decoding it, the new value written back raw. False: take the general path."""
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.value is None:
            return False
        new = self.raw_value(tag, vr_of(ds, tag), raw.value, action, ctx.study.date_offset)
        if new is None:
            return False
        if new is DELETE:
            del ds[tag]
        elif isinstance(new, bytes):
            ds._dict[BaseTag(tag)] = raw._replace(value=new, length=len(new))
        return True

    def raw_value(
        self, tag: int, vr: str, value: bytes, action: str, days: int
    ) -> bytes | Verdict | None:
        """A listed action on one value as read: its new bytes (padded as its VR pads),
        ``KEEP``, ``DELETE``, or None: the action needs the decoded value (a VR that is
        not ASCII, PatientID or PatientName under ``D``, a cleaned text). ``days``: the
        patient's date offset. Shared by the walk and ``dicomsync.deid.rawpath``."""
        if "D" in action and action != "D":  # X/D, Z/D, X/Z/D
            action = "D"
        elif action == "X/Z":
            action = "Z"
        if action == "X":
            return DELETE
        if vr not in RAW_VRS or action not in ("Z", "D", "U", "K", "C"):
            return None
        if action == "K" and vr != "UI":
            return KEEP
        text = value.decode("ascii", "replace").rstrip("\0 ")
        if action == "Z":
            new = ""
        elif vr == "UI" or action == "U":  # U on a UID written in another VR too
            if action == "K" or self.retain_uids:
                return KEEP
            new = "\\".join(self.keys.uid(u.strip("\0 ")) for u in text.split("\\"))
        elif action == "D":
            if tag == PATIENT_ID or tag == PATIENT_NAME:
                return None
            new = DUMMY.get(vr, "ANONYMIZED")
        elif vr in ("DA", "DT"):
            new = "\\".join(shift(v, days, vr) for v in text.split("\\"))
        elif vr == "TM":
            return KEEP
        else:
            return None
        raw = new.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        return raw

    def text_uids(self, value: bytes) -> bytes | None:
        """An unlisted text value as read with every UID in it remapped, padded anew;
        None when it holds no UID."""
        new = remap_uids(value.rstrip(b"\0 "), self.keys.uid)
        if new is not None and len(new) % 2:
            new += b" "
        return new

    def _text_action(self, concept: str) -> str:
        if concept in DEVICE_CONCEPTS:  # the device's identity: the option's to keep
            return "K" if self.device_identity else "D"
        return "C" if self.clean_content else "D"

    def _apply(
        self, ds: Dataset, elem: DataElement, action: str, ctx: _Instance, mode: str
    ) -> None:
        tag, vr = int(elem.tag), elem.VR
        if action == "X/Z/U*":
            action = "K" if vr == "SQ" else ("U" if vr == "UI" else "Z")
        elif action == "X/Z":
            action = "Z"
        elif "D" in action:  # X/D, Z/D, X/Z/D
            action = "D"
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if vr == "SQ" else (b"" if vr in BINARY_VRS else None)
        elif vr == "SQ":
            if tag == CONTENT_SEQUENCE:
                inner = "content"
            else:
                inner = "dummy" if action == "D" else mode
            for item in elem.value:
                self._walk(item, ctx, inner)
        elif vr == "UI" or action == "U":  # U on a UID written in another VR too
            if action != "K":
                elem.value = self._uids(elem.value)
        elif action == "D":
            elem.value = self._dummy(tag, vr, ctx)
        elif action == "C":
            elem.value = self._clean(elem, ctx)

    def _uids(self, value: Any) -> Any:
        """Each UID of a value replaced; a binary value (a UID as OB, UN) read as ASCII."""
        if isinstance(value, bytes):
            text = value.decode("ascii", "replace").rstrip("\0 ")
            new = "\\".join(self.uid(u.strip("\0 ")) for u in text.split("\\")).encode("ascii")
            return new + b"\0" * (len(new) % 2)
        return map_values(value, self.uid)

    def _dummy(self, tag: int, vr: str, ctx: _Instance) -> Any:
        if tag == PATIENT_ID:
            return ctx.study.pseudonym
        if tag == PATIENT_NAME:
            return ctx.study.pseudonym_name
        if vr in DUMMY:
            return DUMMY[vr]
        if vr in NUMERIC_VRS:
            return 0
        if vr in BINARY_VRS:
            return b"\0\0"
        return "ANONYMIZED"

    def _clean(self, elem: DataElement, ctx: _Instance) -> Any:
        vr, value = elem.VR, elem.value
        if value is None or value == "":
            return value
        if vr in ("DA", "DT"):
            return map_values(value, lambda v: shift(v, ctx.study.date_offset, vr))
        if vr == "PN":
            return DUMMY["PN"]
        if vr in TEXT_VRS:
            scrub, uid = ctx.scrub, self.uid
            if scrub is not None:
                value = map_values(value, lambda v: scrub.sub("XXXX", str(v)))
            return map_values(value, lambda v: remap_uids_text(v, uid))
        return value

    def _private(self, ds: Dataset, elem: DataElement) -> None:
        if self.actions.private == "C":
            element = int(elem.tag) & 0xFFFF
            if (0x10 <= element <= 0xFF and elem.VR == "LO") or elem.VR in NUMERIC_VRS:
                return  # a private creator, or a number: nothing that names anyone
        del ds[elem.tag]

    # --- records ------------------------------------------------------------------------
    def encoded(self, study: StudyKeys, implicit: bool) -> dict[int, bytes]:
        return self.records.encoded(study.pseudonym, study.pseudonym_name, implicit)
