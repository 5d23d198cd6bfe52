from __future__ import annotations

import hashlib
import io
import os
import unicodedata
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomsync.errors import DicomFileError
from dicomsync.identity import (
    MAX_COMPONENT_BYTES,
    StudyIdentity,
    contained_path,
    orthanc_study_id,
    read_header,
    safe_component,
)

from dicomdata import make_instance
from orthanc_server import OrthancProcess


def _h(value: str) -> str:
    """The hash suffix safe_component appends to a value it had to change."""
    return "~" + hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # names that need no change stay exactly as they are
        ("patient1", "patient1"),
        ("study [1]", "study [1]"),
        ("Müller^Hans", "Müller^Hans"),
        ("1.2.840.113619.2.55", "1.2.840.113619.2.55"),
        ("a b", "a b"),
        ("pat_1", "pat_1"),
        ("a~b", "a~b"),
        ("x~0123abc", "x~0123abc"),  # 7 hex digits: not hash-like
        ("", "unknown"),
        # changed names keep a hash of the original
        ("../../etc", "_._.._etc" + _h("../../etc")),
        ("..", "_." + _h("..")),
        (".", "_" + _h(".")),
        (".hidden", "_hidden" + _h(".hidden")),
        ("  ", "unknown" + _h("  ")),
        (" a ", "a" + _h(" a ")),
        ("a/b\\c", "a_b_c" + _h("a/b\\c")),
        ("nul\x00ctl\x1fend", "nul_ctl_end" + _h("nul\x00ctl\x1fend")),
        ("a:b*c?d", "a_b_c_d" + _h("a:b*c?d")),
        ("abc\u202egpj.exe", "abc_gpj" + _h("abc\u202egpj.exe") + ".exe"),
        # the hash goes before a short extension, not into it or after it
        ("a:b.dcm", "a_b" + _h("a:b.dcm") + ".dcm"),
        ("1.2.3:4", "1.2.3_4" + _h("1.2.3:4")),  # the last part of a UID is no extension
        ("a\u0085b\u2028c\u2029d", "a_b_c_d" + _h("a\u0085b\u2028c\u2029d")),
        ("zero\u200bwidth\ufeff", "zero_width_" + _h("zero\u200bwidth\ufeff")),
        ("bad\udcffbyte", "bad_byte" + _h("bad\udcffbyte")),
        ("pat_1~0123abcd", "pat_1~0123abcd"),  # a name made here maps to itself
    ],
)
def test_safe_component(value: str, expected: str) -> None:
    assert safe_component(value) == expected


def test_safe_component_gives_the_readmes_names() -> None:
    """The README's example, as literal names: not recomputed the way the code hashes."""
    assert [safe_component(v) for v in ("pat:1", "pat_1", "pat*1")] == [
        "pat_1~20544540",
        "pat_1",
        "pat_1~be28b37e",
    ]


def test_nfd_is_normalised_and_kept_apart_from_nfc() -> None:
    nfc = unicodedata.normalize("NFC", "Müller")
    nfd = unicodedata.normalize("NFD", "Müller")
    assert safe_component(nfc) == nfc
    assert safe_component(nfd) == nfc + _h(nfd)


# Every character a study key might hold that the mapping must not let through.
_HOSTILE = [chr(c) for c in range(0x20)] + [
    *'/\\:*?"<>|',
    "\x7f",
    "\x85",
    "\u200b",
    "\u200e",
    "\u200f",
    "\u202a",
    "\u202e",
    "\u2066",
    "\u2069",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\udc80",
]


def test_safe_component_is_injective_over_a_class_of_inputs() -> None:
    """Values that map to the same visible text stay apart: 1,000+ values, 1,000+ names."""
    values = {"pat_1", "pat_1 ", " pat_1", ".pat_1", "_pat_1", "pat_1~"}
    for ch in _HOSTILE:
        values |= {f"pat{ch}1", f"{ch}pat1", f"pat1{ch}", ch, ch * 2}
    for a in "._ ~":
        for b in "._ ~":
            values.add(a + b)
    names = {v: safe_component(v) for v in values if v}
    assert len(set(names.values())) == len(names)
    for v, name in names.items():
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert name not in (".", "..")
        assert all(unicodedata.category(ch) not in {"Cc", "Cf", "Zl", "Zp", "Cs"} for ch in name), (
            v,
            name,
        )
        assert safe_component(v) == name  # deterministic
        assert safe_component(name) == name  # and a name made here maps to itself


@pytest.mark.parametrize("char", ["x", "é", "\u20ac", "\U0001f600", "\u6f22"])
def test_names_are_limited_in_bytes(char: str) -> None:
    """Each component fits 255 bytes with a .zip suffix, whatever the width of its characters."""
    for n in (60, 63, 64, 65, 120, 300):
        value = char * n
        name = safe_component(value)
        assert len(os.fsencode(name + ".zip")) <= 255, (char, n)
        if len(os.fsencode(value)) <= MAX_COMPONENT_BYTES:
            assert name == value
        else:
            assert name.endswith(_h(value))
    assert safe_component(char * 300) != safe_component(char * 299)
    # A legal 64-character PatientID of 4-byte characters is 256 bytes: it is cut.
    assert len(os.fsencode(safe_component("\U0001f600" * 64))) <= MAX_COMPONENT_BYTES


def test_contained_path_refuses_escape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert contained_path(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(DicomFileError):
        contained_path(tmp_path, "..", "etc")


# PatientIDs that have tripped up a recomputed hash: spaces (inner, leading, trailing,
# only), non-ASCII in two character sets, the empty value, the longest legal value.
_AWKWARD_PATIENTS = [
    ("P1", None),
    ("with space", None),
    ("  lead", None),
    ("trail  ", None),
    ("   ", None),
    ("", None),
    ("Müller^Zoë", "ISO_IR 100"),
    ("山田^太郎", "ISO_IR 192"),
    ("Ünïcödé 名前", "ISO_IR 192"),
    ("x" * 64, None),
]


@pytest.mark.orthanc
def test_orthanc_study_id_is_orthancs_own(orthanc: OrthancProcess) -> None:
    """Orthanc's answer, not a recomputation: upload, read the header the way places do,
    and compare ``orthanc_study_id`` with the study ID Orthanc gives the instance."""
    wrong = []
    for patient, charset in _AWKWARD_PATIENTS:
        tags: dict[str, Any] = {"SpecificCharacterSet": charset} if charset else {}
        buf = io.BytesIO()
        make_instance(None, patient_id=patient, study_uid=generate_uid(), **tags).save_as(
            buf, enforce_file_format=True
        )
        answer = orthanc.upload(buf.getvalue())
        assert orthanc.get(f"/instances/{answer['ID']}/study")["ID"] == answer["ParentStudy"]
        header = read_header(buf.getvalue())
        ours = orthanc_study_id(header.patient_id, header.study_uid)
        if ours != answer["ParentStudy"]:
            wrong.append((patient, header.patient_id, ours, answer["ParentStudy"]))
    assert wrong == []


def test_identity_equality_ignores_patient() -> None:
    a = StudyIdentity("1.2", frozenset({"1", "2"}), "p")
    b = StudyIdentity("1.2", frozenset({"2", "1"}), "q")
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.missing_from({"1"}) == {"2"}


def test_read_header_errors_name_the_file(shared_data) -> None:  # type: ignore[no-untyped-def]
    path = shared_data / "broken" / "no_meta_stray_leading_byte.dcm"
    with pytest.raises(DicomFileError) as err:
        read_header(path)
    assert str(path) in str(err.value)
    h = read_header(shared_data / "images" / "CT_small.dcm")
    assert h.study_uid == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
