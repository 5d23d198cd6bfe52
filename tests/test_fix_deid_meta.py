"""Review fix (de-identification): the file meta never keeps the original
MediaStorageSOPInstanceUID (0002,0003), also when the data set has no SOPInstanceUID
(then pydicom's writer is used, and the meta's UID is remapped as a UI value is)."""

from __future__ import annotations

import io

import pydicom
import pytest

from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.transform import Deidentifier, StudyKeys

from dicomdata import data

SECRET = b"meta secret"
STUDY = StudyKeys("DSPSEUDO", "DSPSEUDO", 100)


def deidentify(raw: bytes, options: list[str] | None = None) -> bytes:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options or []}})["p"]
    return Deidentifier(profile, Keys(SECRET)).instance(raw, STUDY)


def without_sop_instance(folder: str, name: str) -> bytes:
    ds = pydicom.dcmread(data(folder, name))
    if "SOPInstanceUID" in ds:
        del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    "folder,name",
    [("odd", "priv_SQ.dcm"), ("images", "CT_small.dcm"), ("images", "MR_small.dcm")],
)
def test_media_storage_uid_is_remapped_without_a_sop_instance_uid(folder: str, name: str) -> None:
    raw = without_sop_instance(folder, name)
    original = str(pydicom.dcmread(io.BytesIO(raw)).file_meta.MediaStorageSOPInstanceUID)
    out = deidentify(raw)
    assert original.encode() not in out
    meta = pydicom.dcmread(io.BytesIO(out), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == Keys(SECRET).uid(original)
    kept = pydicom.dcmread(io.BytesIO(deidentify(raw, ["retain-uids"])), force=True)
    assert kept.file_meta.MediaStorageSOPInstanceUID == original
