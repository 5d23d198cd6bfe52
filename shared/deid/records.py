"""What every de-identified output carries: ``Records(profile)``.

PatientIdentityRemoved YES, DeidentificationMethod (the profile and its options), the
CID 7050 codes of both in DeidentificationMethodCodeSequence, and
LongitudinalTemporalInformationModified; with the pseudonym as PatientID and
PatientName. Made once per profile and encoded once per VR encoding (the same for
every instance); thread-safe (nothing changes after ``__init__``).
"""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from dicomsync.deid import table
from dicomsync.deid.options import Profile
from dicomsync.deid.values import PATIENT_ID, PATIENT_NAME, encode_elements, text_element


class Records:
    def __init__(self, profile: Profile) -> None:
        self.template = _make(profile)
        self._encoded = {i: encode_elements(self.template, i) for i in (True, False)}

    def encoded(self, pseudonym: str, name: str, implicit: bool) -> dict[int, bytes]:
        """The records and, when they are ASCII, the pseudonyms, encoded (tag -> header and
        value, little endian; a non-ASCII pseudonym is left to pydicom and the charset)."""
        done = dict(self._encoded[implicit])
        for tag, vr, value in ((PATIENT_ID, "LO", pseudonym), (PATIENT_NAME, "PN", name)):
            raw = text_element(tag, vr, value, implicit)
            if raw is not None:
                done[tag] = raw
        return done

    def put(self, ds: Dataset, pseudonym: str, name: str) -> None:
        """The pseudonyms and the records put in ``ds`` as they are: pydicom's own setting
        of a sequence would decode the data set's PixelRepresentation (to pass it to the
        items), and so write it re-encoded, or fail on a malformed one."""
        put = ds._dict
        put[BaseTag(PATIENT_ID)] = DataElement(PATIENT_ID, "LO", pseudonym)
        put[BaseTag(PATIENT_NAME)] = DataElement(PATIENT_NAME, "PN", name)
        for elem in self.template:  # shared elements: writing never changes them
            put[elem.tag] = elem


def _make(profile: Profile) -> Dataset:
    options = profile.options
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [profile.method().split(";")[0]] + [
        o for o in table.COLUMNS if o in options
    ]
    items = []
    for value, meaning in profile.codes():
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    if "retain-longitudinal-full-dates" in options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "retain-longitudinal-modified-dates" in options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds
