from __future__ import annotations

import hashlib

import pytest

from dicomsync.errors import DicomFileError
from dicomsync.identity import (
    StudyIdentity,
    contained_path,
    orthanc_study_id,
    read_header,
    safe_component,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("patient1", "patient1"),
        ("../../etc", ".._.._etc"),
        ("..", "_.."),
        (".", "_."),
        ("", "unknown"),
        ("  ", "unknown"),
        ("a/b\\c", "a_b_c"),
        ("nul\x00ctl\x1fend", "nul_ctl_end"),
        ("study [1]", "study [1]"),
        ("Müller^Hans", "Müller^Hans"),
        ("a:b*c?d", "a_b_c_d"),
    ],
)
def test_safe_component(value: str, expected: str) -> None:
    assert safe_component(value) == expected


def test_safe_component_long_values_are_cut_with_hash() -> None:
    out = safe_component("x" * 500)
    assert len(out) == 120 and out != safe_component("x" * 499)


def test_contained_path_refuses_escape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert contained_path(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(DicomFileError):
        contained_path(tmp_path, "..", "etc")


def test_orthanc_study_id() -> None:
    digest = hashlib.sha1(b"P1|1.2.3").hexdigest()
    assert orthanc_study_id("P1", "1.2.3") == "-".join(digest[i : i + 8] for i in range(0, 40, 8))


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
