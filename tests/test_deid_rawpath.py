"""The byte path of the transform (``deid.rawpath``) writes what the general path writes.

Checked byte for byte on every file of the test data under several profiles, on
variants of representative files (implicit and explicit VR; empty values; sequences of
defined and undefined length; UN elements), and on hostile mutations (truncations,
flipped bytes, deep nesting, tags out of order): whenever the byte path answers, its
answer is the general path's; where it declines, the general path runs; it raises
nothing but ``DeidentificationRefused``, as the general path does.
"""

from __future__ import annotations

import copy
import io
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomsync.deid import rawpath
from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.transform import Deidentifier, StudyKeys
from dicomsync.errors import DeidentificationRefused, DicomFileError

from dicomdata import data, make_ct

STUDY = StudyKeys("DSPSEUDO", "DSPSEUDO", 123)
PROFILES = {
    "basic": [],
    "dates-device": ["retain-longitudinal-modified-dates", "retain-device-identity"],
    "cleaning": ["clean-descriptors", "clean-structured-content", "retain-patient-characteristics"],
    "uids-burned": ["retain-uids", "allow-burned-in"],
    "safe-private": ["retain-safe-private", "allow-burned-in", "retain-institution-identity"],
}
SAMPLES = [
    ("images", "examples_overlay.dcm"),
    ("study_tree_pcir", "77654033", "CT2", "17106"),  # 99 private attributes
    ("rdsr", "CT-RDSR-Siemens-Multi-1.dcm"),
    ("charset", "chrH31.dcm"),
    ("charset", "chrX1.dcm"),
    ("study_petct_siemens", "NM-PetIm-Siemens.dcm"),
]


def engine(options: list[str], **extra: object) -> Deidentifier:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options, **extra}})["p"]
    return Deidentifier(profile, Keys(b"a test key"))


def files() -> list[Path]:
    found = sorted(data().rglob("*.dcm")) + sorted(data("study_tree_pcir").rglob("*"))
    return [p for p in found if p.is_file() and p.name != "DICOMDIR"]


def outcome(call: object, *args: object) -> bytes | str | None:
    """The bytes, or the name of the dicomsync error raised."""
    try:
        return call(*args)  # type: ignore[operator]
    except (DeidentificationRefused, DicomFileError) as exc:
        return type(exc).__name__


def agrees(eng: Deidentifier, raw: bytes) -> bool:
    """The byte path's answer is the general path's; True if it answered."""
    fast = outcome(rawpath.deidentify, eng, raw, STUDY, "x.dcm")
    if fast is None:
        return False
    assert fast == outcome(eng.general, raw, STUDY, "x.dcm")
    return True


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_test_file_is_written_as_the_general_path_writes_it(profile: str) -> None:
    eng = engine(PROFILES[profile])
    checked = files()
    answered = sum(agrees(eng, path.read_bytes()) for path in checked)
    assert len(checked) > 50
    assert answered > 45  # most files take the byte path


def variants(raw: bytes) -> Iterator[tuple[str, bytes]]:
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        for extra in ("none", "empty", "sequences", "undefined", "un"):
            v = copy.deepcopy(ds)
            v.file_meta.TransferSyntaxUID = syntax
            if extra == "empty":
                v.add_new(0x00280106, "US", None)
                v.add_new(0x00181000, "LO", "")
                v.add_new(0x00091010, "OB", b"")
                v.add_new(0x00080090, "PN", None)
            elif extra in ("sequences", "undefined"):
                item = Dataset()
                item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                item.ReferencedSOPInstanceUID = "1.2.3.4.5"
                item.PatientName = "Inner^Name"
                v.ReferencedImageSequence = Sequence([item])
                v.RequestAttributesSequence = Sequence([Dataset()])
                v["ReferencedImageSequence"].is_undefined_length = extra == "undefined"
            elif extra == "un":
                v.add(DataElement(0x00181030, "UN", b"PROTO 1.2.3.4.5.6 "))
                v.add(DataElement(0x00100040, "UN", b"M "))
            out = io.BytesIO()
            v.save_as(out, enforce_file_format=False, implicit_vr=syntax.is_implicit_VR)
            yield f"{syntax.name} {extra}", out.getvalue()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[-1])
def test_variants_are_written_as_the_general_path_writes_them(sample: tuple[str, ...]) -> None:
    answered = 0
    for options in PROFILES.values():
        eng = engine(options)
        for _, raw in variants(data(*sample).read_bytes()):
            answered += agrees(eng, raw)
    assert answered >= 20


def _ct(**extra: object) -> bytes:
    """A CT image with the usual identifying attributes (and ``extra``)."""
    ds = make_ct("P1", "1.2.3.4.5.1", None, 4096, **extra)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_the_byte_path_is_the_one_instance_takes() -> None:
    eng = engine([])
    raw = _ct()

    def no_general(*args: object) -> bytes:
        raise AssertionError("the general path ran")

    eng.general = no_general  # type: ignore[method-assign, assignment]
    out = pydicom.dcmread(io.BytesIO(eng.instance(raw, STUDY)))
    assert out.PatientID == "DSPSEUDO" and out.PatientIdentityRemoved == "YES"
    assert out.PixelData == pydicom.dcmread(io.BytesIO(raw)).PixelData


def _nested(depth: int) -> bytes:
    """A data set of ``depth`` nested undefined-length sequences."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
        item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        inner = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
        inner += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return inner


def _with_data_set(raw: bytes, body: bytes) -> bytes:
    end = 144 + int.from_bytes(raw[140:144], "little")
    return raw[:end] + body


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("a deflated data set", []),
        ("elements after the pixel data", []),
        ("big endian", []),
        ("tags out of order", []),
        ("nesting deeper than MAX_DEPTH", []),
        ("a value past the end", []),
        ("an unknown explicit VR", []),
        ("no SOP instance UID", []),
        ("an item delimiter at the top level", []),
    ],
)
def test_the_byte_path_declines_what_it_does_not_read(case: str, options: list[str]) -> None:
    raw = _ct()
    if case == "a deflated data set":
        raw = data("odd", "image_dfl.dcm").read_bytes()
    elif case == "elements after the pixel data":
        raw = data("images", "CT_small.dcm").read_bytes()  # trailing padding (FFFC,FFFC)
    elif case == "big endian":
        raw = data("odd", "ExplVR_BigEnd.dcm").read_bytes()
    elif case == "tags out of order":
        body = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 2) + b"A "
        body += struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 4) + b"1.2\0"
        raw = _with_data_set(raw, body)
    elif case == "nesting deeper than MAX_DEPTH":
        raw = _with_data_set(raw, _nested(rawpath.MAX_DEPTH + 2))
    elif case == "a value past the end":
        raw = _with_data_set(raw, struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 200) + b"1.2\0")
    elif case == "an unknown explicit VR":
        raw = _with_data_set(raw, struct.pack("<HH2sH", 0x0008, 0x0018, b"Q!", 4) + b"1.2\0")
    elif case == "an item delimiter at the top level":
        raw = data("rdsr", "CT-RDSR-Siemens-Multi-1.dcm").read_bytes()  # no pixel data
        assert rawpath.deidentify(engine(options), raw, STUDY, "x.dcm") is not None
        raw += struct.pack("<HH2sHI", 0xFFFE, 0xE00D, b"UN", 0, 0)
    elif case == "no SOP instance UID":
        ds = pydicom.dcmread(io.BytesIO(raw))
        del ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
        raw = out.getvalue()
    assert rawpath.deidentify(engine(options), raw, STUDY, "x.dcm") is None


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_compressed_instances_take_the_byte_path_their_fragments_copied(name: str) -> None:
    """Encapsulated pixel data that ends the file is copied as it is, by both paths."""
    raw = data("images", name).read_bytes()
    eng = engine(["allow-burned-in"])
    assert agrees(eng, raw)
    out = pydicom.dcmread(io.BytesIO(eng.instance(raw, STUDY)))
    assert out.PixelData == pydicom.dcmread(io.BytesIO(raw)).PixelData
    assert (
        out.file_meta.TransferSyntaxUID
        == pydicom.dcmread(io.BytesIO(raw)).file_meta.TransferSyntaxUID
    )
    cut = raw[:-8]  # the fragments' delimiter missing: not the usual file
    assert rawpath.deidentify(eng, cut, STUDY, "x.dcm") is None


def test_a_pseudonym_that_is_not_ascii_is_left_to_the_general_path() -> None:
    study = StudyKeys("Ünïcode", "Ünïcode", 5)
    assert rawpath.deidentify(engine([]), _ct(), study, "x.dcm") is None


def test_burned_in_instances_are_refused_as_the_general_path_refuses_them() -> None:
    raw = _ct(BurnedInAnnotation="YES")
    with pytest.raises(DeidentificationRefused, match="BurnedInAnnotation is YES"):
        rawpath.deidentify(engine([]), raw, STUDY, "x.dcm")
    assert rawpath.deidentify(engine(["allow-burned-in"]), raw, STUDY, "x.dcm") is not None


def _with_value(raw: bytes, tag: int, value: bytes) -> bytes:
    """``raw`` with the data set's element ``tag`` (explicit VR, short) holding ``value``."""
    end = 144 + int.from_bytes(raw[140:144], "little")
    found = rawpath.scan(raw, end, False)
    assert found is not None
    el = next(e for e in found[0] if e.tag == tag)
    return raw[: el.value - 2] + struct.pack("<H", len(value)) + value + raw[el.end :]


SECONDARY_CAPTURE = b"1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        (0x00080016, SECONDARY_CAPTURE + b"\0\0"),
        (0x00080016, SECONDARY_CAPTURE + b"\t "),
        (0x00080016, b" " + SECONDARY_CAPTURE),
        (0x00080016, b"1.2.3\\" + SECONDARY_CAPTURE + b"\0"),
        (0x00280301, b"YES "),
        (0x00280301, b" yes"),
        (0x00280301, b"NO\\YES "),
        (0x00280301, b"YES\0\0"),
    ],
)
def test_burned_in_values_count_whatever_their_padding_on_both_paths(
    tag: int, value: bytes
) -> None:
    """A burned-in SOP class or BurnedInAnnotation YES is refused however it is padded and
    whichever of its values says so, by the byte path and by the general path alike."""
    raw = _with_value(_ct(BurnedInAnnotation="NO"), tag, value)
    eng = engine([])
    with pytest.raises(DeidentificationRefused):
        rawpath.deidentify(eng, raw, STUDY, "x.dcm")
    with pytest.raises(DeidentificationRefused):
        eng.general(raw, STUDY, "x.dcm")


@pytest.mark.parametrize(
    ("options", "tag", "value"),
    [
        ([], 0x00080005, b"ISO_IR 100  "),  # the general path's writer decodes the charset
        ([], 0x00080005, b"ISO_IR 100\0\0"),
        (["keep:SpecificCharacterSet"], 0x00080005, b"ISO_IR 100  "),
        (["remove:SpecificCharacterSet"], 0x00080005, b"ISO_IR 100  "),
        ([], 0x00280103, b"\1\0\0"),  # a malformed PixelRepresentation: both write it
        ([], 0x00280301, b"NO  "),  # and the burned-in check reads these two
        ([], 0x00280301, b"NO\\"),
        ([], 0x00080016, b"1.2.840.10008.5.1.4.1.1.2\xe9 "),  # not ASCII: remapped
        ([], 0x00080016, b"1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.4"),
        (["retain-device-identity"], 0x00081010, b"CT01    "),  # kept, read to clean text
        (["retain-device-identity"], 0x00181000, b" SN-1 \0"),
    ],
)
def test_odd_values_are_written_as_the_general_path_writes_them(
    options: list[str], tag: int, value: bytes
) -> None:
    raw = _with_value(_ct(SpecificCharacterSet="ISO_IR 100", BurnedInAnnotation="NO"), tag, value)
    lists = {"Keep": [o[5:] for o in options if o.startswith("keep:")]}
    lists["Remove"] = [o[7:] for o in options if o.startswith("remove:")]
    plain = [o for o in options if ":" not in o]
    assert agrees(engine(plain, **lists), raw)


def test_a_uid_written_in_another_vr_is_remapped() -> None:
    """The byte path leaves an element whose VR is not the dictionary's to the general
    path, which remaps the UID in it all the same."""
    ds = pydicom.dcmread(io.BytesIO(_ct()))
    ds[0x0020000D] = DataElement(0x0020000D, "LO", "1.2.3.4.5.1")  # StudyInstanceUID as LO
    ds[0x00200052] = DataElement(0x00200052, "OB", b"1.2.3.4.5.77")  # FrameOfReferenceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    eng = engine([])
    assert rawpath.deidentify(eng, out.getvalue(), STUDY, "x.dcm") is None
    written = eng.instance(out.getvalue(), STUDY)
    assert b"1.2.3.4.5.1" not in written and b"1.2.3.4.5.77" not in written


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00100020, "US", b"\1\0\0"),  # PatientID: the general path decodes it
        (0x00080005, "UI", b"1.2.3\0"),  # SpecificCharacterSet
        (0x00280103, "LO", b"0 "),  # PixelRepresentation: decoded for the sequences
        (0x00081040, "US", b"\1\0\0"),  # InstitutionalDepartmentName, read to clean text
    ],
)
def test_an_element_in_a_vr_the_dictionary_does_not_give_it_is_left_to_the_general_path(
    tag: int, vr: str, value: bytes
) -> None:
    ds = pydicom.dcmread(io.BytesIO(_ct()))
    ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    for options in ([], ["clean-descriptors"]):
        assert rawpath.deidentify(engine(options), out.getvalue(), STUDY, "x.dcm") is None


def test_the_vr_cache_holds_no_tag_the_dictionary_does_not_know() -> None:
    body = b"".join(struct.pack("<HHI", 0x0008, e, 2) + b"AB" for e in range(0x7000, 0x7400))
    raw = _with_data_set(_ct(), body)
    end = 144 + int.from_bytes(raw[140:144], "little")
    before = len(rawpath._VRS)
    assert rawpath.scan(raw[:end] + body, end, True) is not None
    assert len(rawpath._VRS) == before


def test_hostile_mutations_agree_or_are_declined() -> None:
    """Truncations and flipped bytes of a plain image and of a dose report: whatever the
    byte path answers is the general path's answer; nothing but a dicomsync error."""
    rng = random.Random(13)
    eng = engine(["retain-longitudinal-modified-dates"])
    answered = 0
    for raw in (_ct(), data("rdsr", "CT-RDSR-Siemens-Multi-1.dcm").read_bytes()):
        end = 144 + int.from_bytes(raw[140:144], "little")
        header = min(len(raw), end + 3000)  # the elements, not the pixel bytes
        for _ in range(150):
            mutated = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(end, header)] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated = mutated[: rng.randrange(end, len(raw))]
            answered += agrees(eng, bytes(mutated))
        answered += agrees(eng, _with_data_set(raw, _nested(rawpath.MAX_DEPTH - 2)))
    assert answered > 50
