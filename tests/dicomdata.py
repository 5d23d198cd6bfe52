"""Test data: the shared real files, and pydicom-generated bulk studies.

The real third-party files live in ``../shared/data/dicom`` (override with
``DICOMSYNC_TEST_DATA``) and are read from there, never copied into the repo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(
        os.environ.get("DICOMSYNC_TEST_DATA") or REPO_ROOT.parent / "shared" / "data" / "dicom"
    )


def data(*parts: str) -> Path:
    path = data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"test data missing: {path} (set DICOMSYNC_TEST_DATA)")
    return path


def pcir_study_files() -> dict[str, list[Path]]:
    """StudyInstanceUID -> files, for study_tree_pcir (31 instances, 6 studies)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(data("study_tree_pcir").rglob("*")):
        if p.is_file() and p.name != "DICOMDIR":
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.setdefault(str(ds.StudyInstanceUID), []).append(p)
    return out


def build_seed_tree(root: Path) -> dict[str, list[Path]]:
    """The seed README's tree: patient1/study1..3 and patient2/study1, from real files.

    Each study folder holds the files of one real study from study_tree_pcir (files are
    linked or copied into the temp tree, never into the repo). Returns key -> files.
    """
    studies = list(pcir_study_files().values())
    layout = {
        "patient1/study1": studies[0],
        "patient1/study2": studies[1],
        "patient1/study3": studies[2],
        "patient2/study1": studies[3],
    }
    for key, files in layout.items():
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            shutil.copyfile(f, folder / f"file{i + 1}.dcm")
    return layout


def make_instance(
    path: Path | None,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "Test^Patient",
    modality: str = "OT",
    pixel_bytes: int = 64,
    **tags: object,
) -> FileDataset:
    """A small valid DICOM instance (Secondary Capture), written to ``path`` if given."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path or "mem.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixel_bytes:
        side = max(1, int((pixel_bytes / 2) ** 0.5))
        ds.Rows = side
        ds.Columns = side
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = b"\x01\x02" * (side * side)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return ds


def generate_root(root: Path, studies: int, instances: int = 2, pixel_bytes: int = 64) -> None:
    """A dicom_root of ``studies`` generated studies, ``instances`` files each."""
    for s in range(studies):
        patient = f"patient{s // 10:04d}"
        study_uid = generate_uid()
        series_uid = generate_uid()
        for i in range(instances):
            make_instance(
                root / patient / f"study{s:05d}" / f"im{i}.dcm",
                patient_id=patient,
                study_uid=study_uid,
                series_uid=series_uid,
                pixel_bytes=pixel_bytes,
            )


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_ct(
    patient_id: str,
    study_uid: str,
    series_uid: str | None = None,
    pixel_bytes: int = 64,
    **tags: object,
) -> FileDataset:
    """A CT image with the usual identifying attributes (name, birth date, accession,
    institution, physician, station, serial number, dates), for de-identification."""
    usual: dict[str, object] = {
        "PatientBirthDate": "19600101",
        "AccessionNumber": f"ACC{patient_id}",
        "InstitutionName": "General Hospital",
        "ReferringPhysicianName": "Who^Doctor",
        "StationName": "CT01",
        "DeviceSerialNumber": "SN-12345",
        "SeriesDate": "20240101",
        "AcquisitionDate": "20240101",
        "ContentDate": "20240101",
        "FrameOfReferenceUID": generate_uid(),
    }
    ds = make_instance(
        None,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_name=f"Doe^{patient_id}",
        modality="CT",
        pixel_bytes=pixel_bytes,
    )
    for keyword, value in (usual | tags).items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    return ds


def study_bytes(patient: str, n: int, pixel_bytes: int = 64) -> list[bytes]:
    """``n`` instances of one new study of ``patient``, as DICOM files' bytes."""
    from io import BytesIO

    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for _ in range(n):
        ds = make_instance(
            None,
            patient_id=patient,
            study_uid=study_uid,
            series_uid=series_uid,
            pixel_bytes=pixel_bytes,
        )
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out
