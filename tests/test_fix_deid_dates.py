"""Review fix (de-identification): modified dates move every date of a value. A range
(``A-B``, ``-B``, ``A-``) moves both sides, a DT keeps its time, fraction and timezone
(whose ``-`` is no range), ACR-NEMA's dotted ``YYYY.MM.DD`` is read as the same date and
written as ``YYYYMMDD``; times stay as they are; what is no date becomes ``19000101``.
Checked on the shift itself and through the transform (values as read and decoded)."""

from __future__ import annotations

import io

import pydicom
import pytest

from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.transform import Deidentifier, StudyKeys
from dicomsync.deid.values import shift

from dicomdata import data

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the inputs' own

DAYS = 100  # 2020-01-01 - 100 days = 2019-09-23; 2020-01-31 - 100 = 2019-10-23
CASES = [
    ("DA", "20200101", "20190923"),
    ("DA", "20200101-20200131", "20190923-20191023"),
    ("DA", "-20200131", "-20191023"),
    ("DA", "20200101-", "20190923-"),
    ("DA", "2020.01.01", "20190923"),
    ("DA", "2020.01.01-2020.01.31", "20190923-20191023"),
    ("DA", "20201301", "19000101"),  # no such month
    ("DA", "junk", "19000101"),
    ("DT", "20200101", "20190923"),
    ("DT", "20200101123456.123456", "20190923123456.123456"),
    ("DT", "20200101123456-0500", "20190923123456-0500"),
    ("DT", "20200101120000+0100-20200131120000+0100", "20190923120000+0100-20191023120000+0100"),
    ("DT", "20200101-20200131", "20190923-20191023"),
    ("DT", "20200101120000-20200131", "20190923120000-20191023"),
    ("DT", "-20200131235959", "-20191023235959"),
    ("DT", "20200101-0500", "20190923-0500"),  # a timezone, not a range
]


@pytest.mark.parametrize("vr,value,expected", CASES)
def test_shift(vr: str, value: str, expected: str) -> None:
    assert shift(value, DAYS, vr) == expected


def deidentify(raw: bytes, options: list[str]) -> pydicom.Dataset:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options}})["p"]
    out = Deidentifier(profile, Keys(b"dates")).instance(raw, StudyKeys("P", "P", DAYS))
    return pydicom.dcmread(io.BytesIO(out))


@pytest.mark.parametrize("options", [[], ["clean-descriptors"]])
def test_dates_datetimes_and_times_through_the_transform(options: list[str]) -> None:
    """Values as read (the fast path on bytes), with and without a text-cleaning option."""
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    ds.StudyDate = "20200101-20200131"
    ds.SeriesDate = "2020.01.01"
    ds.AcquisitionDate = ["20200101", "2020.01.31"]
    ds.AcquisitionDateTime = "20200101123456.5-0500"
    ds.StudyTime = "101010-111111"
    buf = io.BytesIO()
    ds.save_as(buf)
    out = deidentify(buf.getvalue(), ["retain-longitudinal-modified-dates", *options])
    assert out.StudyDate == "20190923-20191023"
    assert out.SeriesDate == "20190923"
    assert list(out.AcquisitionDate) == ["20190923", "20191023"]
    assert out.AcquisitionDateTime == "20190923123456.5-0500"
    assert out.StudyTime == "101010-111111"  # times stay
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDateTime"):
        assert b"2020" not in str(out.get(keyword)).encode()


def test_the_general_path_shifts_ranges_too() -> None:
    """``_clean`` on a decoded element (not the fast path on bytes as read)."""
    from pydicom.dataelem import DataElement

    from dicomsync.deid.transform import _Instance

    profile = parse_profiles(
        {"p": {"SecretEnv": "S", "Options": ["retain-longitudinal-modified-dates"]}}
    )["p"]
    engine = Deidentifier(profile, Keys(b"dates"))
    ctx = _Instance(StudyKeys("P", "P", DAYS), pydicom.Dataset(), False)
    for vr, value, expected in CASES:
        elem = DataElement(0x00080020 if vr == "DA" else 0x0008002A, vr, value)
        assert engine._clean(elem, ctx) == expected, value
