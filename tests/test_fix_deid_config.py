"""Review fix (de-identification): a profile's Keep/Remove lists cannot name what the
remapping depends on. Keeping a UI attribute (the destination would be asked about the
keyed UIDs while it holds the original ones: every re-send a new copy), removing an
instance's own UIDs, and keeping or removing PatientID/PatientName (always the
pseudonym) are refused by the configuration check, one line each, naming the way that
does it (``retain-uids``, ``PatientIds``)."""

from __future__ import annotations

import pytest

from dicomsync.deid.options import parse_profiles
from dicomsync.errors import ConfigError


def problems(**extra: object) -> list[str]:
    found: list[str] = []
    parse_profiles({"p": {"SecretEnv": "S", **extra}}, problems=found)
    return found


@pytest.mark.parametrize(
    "keyword",
    [
        "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
        "ReferencedSOPInstanceUID", "DeviceUID",
    ],
)  # fmt: skip
def test_keeping_a_uid_attribute_is_refused(keyword: str) -> None:
    found = problems(Keep=["StudyDescription", keyword])
    assert len(found) == 1
    assert keyword in found[0] and "retain-uids" in found[0] and ".Keep" in found[0]


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_removing_an_instance_identity_uid_is_refused(keyword: str) -> None:
    found = problems(Remove=[keyword])
    assert len(found) == 1 and keyword in found[0] and ".Remove" in found[0]


@pytest.mark.parametrize("listing", ["Keep", "Remove"])
@pytest.mark.parametrize("keyword", ["PatientID", "PatientName"])
def test_keeping_or_removing_the_pseudonymised_attributes_is_refused(
    listing: str, keyword: str
) -> None:
    found = problems(**{listing: [keyword]})
    assert len(found) == 1
    assert keyword in found[0] and "PatientIds" in found[0] and f".{listing}" in found[0]


def test_one_error_line_names_every_problem_and_ordinary_lists_pass() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_profiles({"p": {"SecretEnv": "S", "Keep": ["SOPInstanceUID", "PatientName"]}})
    message = str(caught.value)
    assert "\n" not in message
    assert "SOPInstanceUID" in message and "PatientName" in message
    assert not problems(Keep=["StudyDescription", "InstitutionName"], Remove=["Manufacturer"])
    assert not problems(Remove=["FrameOfReferenceUID"])  # not what duplicates are found by
