"""Review fix (de-identification): no original UID survives in attributes the table does
not list, whatever their encoding. Public attributes read with VR UN (as a toolkit that
does not know them writes them) are read with the dictionary's VR first, a sequence sent
as UN is walked as one; a public attribute the dictionary does not know is removed; a UID
inside an unlisted text value (a RetrieveURL, a note) is remapped as the UI values are."""

from __future__ import annotations

import io
import struct
from typing import Any

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian

from dicomsync.deid import table
from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.transform import Deidentifier, StudyKeys

from dicomdata import data

SECRET = b"un secret"
STUDY = StudyKeys("DSPSEUDO", "DSPSEUDO", 100)
U1, U2, U3 = "1.2.3.4.5.6.7.8.111", "1.2.3.4.5.6.7.8.222", "1.2.3.4.5.6.7.8.333"
UNKNOWN_PUBLIC = 0x00089998  # an even group's element no dictionary names


def deidentify(raw: bytes, options: list[str] | None = None) -> bytes:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options or []}})["p"]
    return Deidentifier(profile, Keys(SECRET)).instance(raw, STUDY)


def implicit_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def item_bytes(item: Dataset) -> bytes:
    """One sequence item as a UN value holds it: implicit VR little endian (PS3.5 6.2.2)."""
    body = implicit_bytes(item)
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body


def un_element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:  # the padding of the VR the writer did not know: a UID's, or text's
        value += b"\0" if value.replace(b".", b"").isdigit() else b" "
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value


def with_un(elements: dict[int, bytes]) -> bytes:
    """CT_small (explicit VR little endian) with ``elements`` written as UN, each at its
    place in tag order."""
    raw = data("images", "CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.original_encoding == (False, True)
    for tag in elements:
        ds.add_new(tag, "LO", "PLACEHOLDER")  # written in order, then its bytes swapped
    buf = io.BytesIO()
    ds.save_as(buf)
    out = buf.getvalue()
    for tag, value in elements.items():
        marker = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"LO\x0c\x00PLACEHOLDER "
        assert out.count(marker) == 1
        out = out.replace(marker, un_element(tag, value))
    return out


def ref_item(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = uid
    return item


def keyword(name: str) -> int:
    tag = tag_for_keyword(name)
    assert tag is not None
    return int(tag)


def listed(name: str) -> bool:
    return table.actions([]).get(keyword(name)) is not None


def strict(raw: bytes) -> Dataset:
    ds = pydicom.dcmread(io.BytesIO(raw))
    for elem in ds.iterall():  # every value decodes
        _ = elem.value
    return ds


@pytest.mark.parametrize(
    "name",
    [
        "SOPInstanceUIDOfConcatenationSource",  # unlisted
        "RetrieveLocationUID",  # unlisted
        "ReferencedFrameOfReferenceUID",  # listed (U)
        "StorageMediaFileSetUID",  # listed (U)
    ],
)
def test_ui_attribute_sent_as_un_is_remapped(name: str) -> None:
    out = deidentify(with_un({keyword(name): U1.encode()}))
    assert U1.encode() not in out
    assert str(strict(out)[keyword(name)].value) == Keys(SECRET).uid(U1)


@pytest.mark.parametrize(
    "name", ["ReferencedSOPSequence", "ReferencedSeriesSequence", "ReferencedImageSequence"]
)
def test_sequence_sent_as_un_is_walked_as_a_sequence(name: str) -> None:
    """Unlisted (K) and listed (X/Z/U*) sequences as UN, one nested deeper: every UID in
    the items is remapped, the references stay consistent, the output reads back."""
    outer = ref_item(U2)
    outer.SeriesInstanceUID = U3
    outer.ReferencedInstanceSequence = [ref_item(U1)]
    out = deidentify(with_un({keyword(name): item_bytes(outer) + item_bytes(ref_item(U3))}))
    for uid in (U1, U2, U3):
        assert uid.encode() not in out, uid
    seq = strict(out)[keyword(name)]
    assert seq.VR == "SQ" and len(seq.value) == 2
    keys = Keys(SECRET)
    first = seq.value[0]
    assert first.ReferencedSOPInstanceUID == keys.uid(U2)
    assert first.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == keys.uid(U1)
    assert seq.value[1].ReferencedSOPInstanceUID == keys.uid(U3)


def test_unknown_public_attribute_sent_as_un_is_removed() -> None:
    assert UNKNOWN_PUBLIC not in DicomDictionary
    out = deidentify(with_un({UNKNOWN_PUBLIC: f"see {U1}".encode()}))
    assert U1.encode() not in out
    assert UNKNOWN_PUBLIC not in strict(out)


def test_implicit_vr_attribute_the_dictionary_does_not_know_is_removed() -> None:
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    ds.add_new(UNKNOWN_PUBLIC, "UI", U1)
    ds.RetrieveLocationUID = U2  # known and unlisted: remapped
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    out = deidentify(buf.getvalue())
    assert U1.encode() not in out and U2.encode() not in out
    back = strict(out)
    assert UNKNOWN_PUBLIC not in back
    assert back.RetrieveLocationUID == Keys(SECRET).uid(U2)


TEXT_ATTRIBUTES = [  # unlisted text attributes of several VRs
    ("RetrieveURL", "https://pacs.example/dicom-web/studies/{uid}"),  # UR
    ("URNCodeValue", "urn:oid:{uid}"),  # UR
    ("ContentDescription", "prior {uid}, see there"),  # LO
    ("WindowCenterWidthExplanation", "{uid}"),  # LO
    ("LongCodeValue", "code {uid}"),  # UC
]


@pytest.mark.parametrize("name,template", TEXT_ATTRIBUTES)
@pytest.mark.parametrize("as_un", [False, True])
def test_uid_inside_an_unlisted_text_value_is_remapped(
    name: str, template: str, as_un: bool
) -> None:
    assert not listed(name)
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    study = str(ds.StudyInstanceUID)
    value = template.format(uid=study)
    if as_un:
        raw = with_un({keyword(name): value.encode()})
    else:
        setattr(ds, name, value)
        buf = io.BytesIO()
        ds.save_as(buf)
        raw = buf.getvalue()
    out = deidentify(raw)
    assert study.encode() not in out
    back = strict(out)
    assert str(back[keyword(name)].value) == template.format(uid=back.StudyInstanceUID)
    # retain-uids keeps UIDs everywhere, in text too
    kept = strict(deidentify(raw, ["retain-uids"]))
    assert str(kept[keyword(name)].value) == value


def test_uid_in_text_inside_a_sequence_and_dicom_uids_stay() -> None:
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    item = ref_item(U1)
    item.RetrieveURL = (
        f"https://pacs.example/wado?objectUID={U1}&classUID=1.2.840.10008.5.1.4.1.1.2"
    )
    ds.ReferencedSOPSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf)
    out = deidentify(buf.getvalue())
    assert U1.encode() not in out
    got = strict(out).ReferencedSOPSequence[0]
    assert got.RetrieveURL == (
        f"https://pacs.example/wado?objectUID={got.ReferencedSOPInstanceUID}"
        "&classUID=1.2.840.10008.5.1.4.1.1.2"
    )


def _uids(raw: bytes) -> set[bytes]:
    import re

    found = set(re.findall(rb"\d+(?:\.\d+){4,}", raw))
    return {u for u in found if not u.startswith(b"1.2.840.10008.") and len(u) > 12}


def files() -> list[Any]:
    out = []
    for path in sorted(data().rglob("*")):
        if not path.is_file() or path.suffix in (".md",) or path.name in ("SUMS", "DICOMDIR"):
            continue
        if "broken" in path.parts:
            continue
        out.append(path)
    return out


@pytest.mark.parametrize("options", [[], ["retain-longitudinal-modified-dates"]])
def test_no_original_uid_in_the_output_of_any_test_file(options: list[str]) -> None:
    """The rule over all the test data: no UID of the input (by pattern, as the
    reviewer's scan found them) in the output's bytes."""
    checked = 0
    for path in files():
        raw = path.read_bytes()
        try:
            pydicom.dcmread(io.BytesIO(raw))
        except Exception:  # not DICOM
            continue
        out = deidentify(raw, [*options, "allow-burned-in"])
        survivors = sorted(u.decode() for u in _uids(raw) if u in out)
        assert not survivors, (path.name, survivors)
        checked += 1
    assert checked > 50
