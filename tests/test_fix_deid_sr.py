"""Review fix (de-identification): ``clean-structured-content`` keeps no device identity
and no original UID in SR TEXT items. Without ``retain-device-identity`` the device
observer's TEXT items (DCM 121012-121017) get a dummy; a TEXT value that holds a UID
(a Performed Procedure Step SOP Instance UID, a Device Observer UID as text) is remapped
as the UI values are. Checked on all 18 vendor RDSRs of the test data."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.transform import Deidentifier, StudyKeys

from dicomdata import data

SECRET = b"sr secret"
STUDY = StudyKeys("DSPSEUDO", "DSPSEUDO", 100)
RDSRS = sorted(p.name for p in data("rdsr").glob("*.dcm"))
DEVICE = frozenset({"121012", "121013", "121014", "121015", "121016", "121017"})
UID = re.compile(r"\d+(?:\.\d+){3,}")
OPTION_SETS = [
    ["clean-structured-content"],
    ["clean-structured-content", "clean-descriptors", "retain-longitudinal-modified-dates"],
    ["clean-structured-content", "retain-institution-identity"],
    [],
]


def deidentify(raw: bytes, options: list[str]) -> bytes:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": [*options, "allow-burned-in"]}})[
        "p"
    ]
    return Deidentifier(profile, Keys(SECRET)).instance(raw, STUDY)


def content(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content(item)


def concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def uids_in(raw: bytes) -> set[bytes]:
    found = set(re.findall(rb"\d+(?:\.\d+){4,}", raw))
    return {u for u in found if not u.startswith(b"1.2.840.10008.") and len(u) > 12}


def test_the_vendor_rdsrs_are_all_here() -> None:
    assert len(RDSRS) == 18


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "basic")
@pytest.mark.parametrize("name", RDSRS)
def test_no_original_uid_in_the_output_bytes(name: str, options: list[str]) -> None:
    raw = data("rdsr", name).read_bytes()
    out = deidentify(raw, options)
    survivors = sorted(u.decode() for u in uids_in(raw) if u in out)
    assert not survivors


@pytest.mark.parametrize("name", RDSRS)
def test_device_observer_text_is_a_dummy_unless_device_identity_is_retained(name: str) -> None:
    raw = data("rdsr", name).read_bytes()
    before = [
        (concept(i), str(i.TextValue))
        for i in content(pydicom.dcmread(io.BytesIO(raw)))
        if i.get("ValueType") == "TEXT"
    ]
    cleaned = pydicom.dcmread(io.BytesIO(deidentify(raw, ["clean-structured-content"])))
    after = [(concept(i), str(i.TextValue)) for i in content(cleaned) if "TextValue" in i]
    assert [c for c, _ in after] == [c for c, _ in before]  # the tree keeps its items
    keys = Keys(SECRET)
    for (code, old), (_, new) in zip(before, after, strict=True):
        if code in DEVICE:
            assert new == "ANONYMIZED", (code, old)
        elif UID.fullmatch(old.strip()) and not old.startswith("1.2.840.10008."):
            assert new == keys.uid(old.strip()), (code, old)
        else:
            assert UID.sub("", new) == UID.sub("", old.strip()) or "XXXX" in new
    kept = pydicom.dcmread(
        io.BytesIO(deidentify(raw, ["clean-structured-content", "retain-device-identity"]))
    )
    device_after = [(concept(i), str(i.TextValue)) for i in content(kept) if "TextValue" in i]
    for (code, old), (_, new) in zip(before, device_after, strict=True):
        if code in DEVICE:
            assert new == old.strip(), (code, old)


def test_a_text_item_that_is_a_uid_maps_to_the_uid_of_its_ui_twin() -> None:
    """RF-RDSR-GE names its Performed Procedure Step SOP Instance UID in a TEXT item:
    the remapped text equals the keyed UID, so it still matches where it is a UI value."""
    raw = data("rdsr", "RF-RDSR-GE.dcm").read_bytes()
    texts = {
        concept(i): str(i.TextValue).strip()
        for i in content(pydicom.dcmread(io.BytesIO(raw)))
        if i.get("ValueType") == "TEXT"
    }
    uid_items = {c: v for c, v in texts.items() if UID.fullmatch(v) and c not in DEVICE}
    assert uid_items
    out = pydicom.dcmread(io.BytesIO(deidentify(raw, ["clean-structured-content"])))
    got = {concept(i): str(i.TextValue) for i in content(out) if "TextValue" in i}
    for code, value in uid_items.items():
        assert got[code] == Keys(SECRET).uid(value)
