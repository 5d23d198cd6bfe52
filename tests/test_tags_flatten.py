"""Flattening and dose events, checked against the real vendor files.

Expected values are read from the files with DCMTK's ``dcmdump`` (an independent
reader), not with pydicom, so a pydicom-side mistake cannot hide.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from dicomsync.errors import DicomFileError
from dicomsync.tags import (
    SOURCETYPE_DOSE_EVENT,
    SOURCETYPE_DOSE_REPORT,
    SOURCETYPE_INSTANCE,
    Event,
    dose,
    events_from_bytes,
    events_from_dataset,
    events_from_path,
    read_dataset,
    sr,
)
from dicomsync.tags.lite import reader_for
from dicomsync.tags.simplify import simplify, utf8_repair_enabled

from dicomdata import data, data_dir, make_instance

ROOT = "X-Ray Radiation Dose Report"


def dose_files() -> list[Path]:
    base = data_dir()
    return sorted((base / "rdsr").glob("*.dcm")) + sorted(
        (base / "study_petct_siemens").glob("*.dcm")
    )


def dcmdump_lines(path: Path) -> list[str]:
    """dcmdump's listing; +U8 (convert to UTF-8) when the file's charset allows it."""
    out = subprocess.run(["dcmdump", "+U8", str(path)], capture_output=True)
    if out.returncode != 0:
        out = subprocess.run(["dcmdump", str(path)], capture_output=True, check=True)
    return out.stdout.decode("utf-8", "replace").splitlines()


_LINE = re.compile(r"^(\s*)\(([0-9a-f]{4}),([0-9a-f]{4})\) \w\w \[(.*?)\]\s+#")


def _dcmdump_values(path: Path, meaning: str, tag: tuple[str, str], depth: int) -> list[str]:
    """Values of element ``tag`` in content items whose concept meaning is ``meaning``;
    ``depth`` is how much deeper than the value dcmdump prints that concept's meaning."""
    last_meaning_at: dict[int, str] = {}
    found = []
    for line in dcmdump_lines(path):
        m = _LINE.match(line)
        if not m:
            continue
        indent, group, elem, value = len(m.group(1)), m.group(2), m.group(3), m.group(4)
        if (group, elem) == ("0008", "0104"):
            last_meaning_at[indent] = value
        elif (group, elem) == tag and last_meaning_at.get(indent + depth) == meaning:
            found.append(value)
    return found


def dcmdump_numbers(path: Path, meaning: str) -> list[str]:
    """NumericValue texts of every NUM whose concept meaning is ``meaning``, in file order.

    In dcmdump's listing, a NUM's concept CodeMeaning and its NumericValue sit at the
    same indentation (the unit's CodeMeaning is deeper).
    """
    return _dcmdump_values(path, meaning, ("0040", "a30a"), 0)


def dcmdump_uids(path: Path, meaning: str) -> list[str]:
    """UIDREF values whose concept meaning is ``meaning`` (concept one level deeper)."""
    return _dcmdump_values(path, meaning, ("0040", "a124"), 4)


def by_type(events: list[Event], sourcetype: str) -> list[Event]:
    return [e for e in events if e.sourcetype == sourcetype]


def walk(obj: Any, path: str = "") -> Any:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, obj


# --- every shared dose file ---------------------------------------------------------------
@pytest.mark.parametrize("path", dose_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_dose_file_flattens_without_placeholders(path: Path) -> None:
    events = events_from_path(path)
    assert events[0].id.endswith(":instance")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "event ids must be unique"
    text = json.dumps([e.fields for e in events], ensure_ascii=False)
    assert "@invalid" not in text  # the real files hold no unrepresentable item
    if str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88"):
        report = by_type(events, SOURCETYPE_DOSE_REPORT)
        assert len(report) == 1
        root = str(ds.ConceptNameCodeSequence[0].CodeMeaning)
        assert root in report[0].fields
        # every root content item is represented under the root key
        names = {str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in ds.ContentSequence}
        assert names <= set(report[0].fields[root])


@pytest.mark.parametrize("path", dose_files(), ids=lambda p: p.name)
def test_lite_reader_matches_pydicom_reader(path: Path) -> None:
    """The fast sequence reader gives exactly what pydicom's own parsing gives."""
    ds_fast = read_dataset(path.read_bytes())
    ds_ref = read_dataset(path.read_bytes())
    fast = sr.flatten(ds_fast)
    reference = sr.Flattener(utf8_repair_enabled(ds_ref), reader_for(ds_ref, lite=False))
    assert fast == sr.flatten(ds_ref, flattener=reference)


# --- Siemens TAP-SS -----------------------------------------------------------------------
def test_siemens_tap_ss_four_events_with_file_values() -> None:
    path = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    ctdi = [float(v) for v in dcmdump_numbers(path, "Mean CTDIvol")]
    dlp = [float(v) for v in dcmdump_numbers(path, "DLP")]
    total = [float(v) for v in dcmdump_numbers(path, "CT Dose Length Product Total")]
    uids = dcmdump_uids(path, "Irradiation Event UID")
    assert ctdi == [0.14, 1.2, 3.61, 9.91]  # what dcmdump reads
    assert dlp == [11.51, 1.2, 3.61, 708.2]
    assert total == [724.52]
    assert len(uids) == 4

    events = events_from_path(path)
    per_event = by_type(events, SOURCETYPE_DOSE_EVENT)
    assert len(per_event) == 4
    for ev, c, d, uid in zip(per_event, ctdi, dlp, uids, strict=True):
        assert ev.fields["EventType"] == "CT Acquisition"
        assert ev.fields["CT Dose"]["Mean CTDIvol"] == c
        assert ev.fields["CT Dose"]["Mean CTDIvol@unit"] == "mGy"
        assert ev.fields["CT Dose"]["DLP"] == d
        assert ev.fields["Irradiation Event UID"] == uid
        sop = ev.fields["SOPInstanceUID"]
        assert ev.id == f"{sop}:event:{uid}"
        # the study context, so that Splunk can run stats ... by without walking arrays
        for key in (
            "StudyInstanceUID",
            "AccessionNumber",
            "StudyDate",
            "Manufacturer",
            "ManufacturerModelName",
            "StationName",
            "Device Observer UID",
        ):
            assert ev.fields[key], key
        assert ev.fields["Manufacturer"] == "SIEMENS"
        assert ev.fields["AccessionNumber"] == "ACC12345601"
        assert ev.fields["Device Observer UID"] == (
            "1.3.6.1.4.1.5962.99.1.2662687737.2058515598.1471541535737.2.0"
        )
    (summary,) = by_type(events, SOURCETYPE_DOSE_REPORT)
    acc = summary.fields[ROOT]["CT Accumulated Dose Data"]
    assert acc["CT Dose Length Product Total"] == total[0]
    assert acc["CT Dose Length Product Total@unit"] == "mGycm"  # as the vendor wrote it
    assert acc["CT Dose Length Product Total@concept"] == "DCM:113813"
    # CopyDICOM's shape: the repeated CT Acquisition container becomes a list of 4
    assert len(summary.fields[ROOT]["CT Acquisition"]) == 4


def test_tap_ss_utf8_under_latin1_is_repaired_and_children_of_codes_kept() -> None:
    path = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    assert any("testæøå" in line for line in dcmdump_lines(path)) is False  # dcmdump shows mojibake
    events = events_from_path(path)
    first = by_type(events, SOURCETYPE_DOSE_EVENT)[0]
    assert first.fields["Acquisition Protocol"] == "testæøå"
    assert events[0].fields["ReferringPhysicianName"] == "Müller"  # real Latin-1 stays right
    role = first.fields["Device Role in Procedure@children"]
    assert role["Device Manufacturer"] == "SIEMENS"
    assert first.fields["Device Role in Procedure"] == "Irradiating Device"
    assert first.fields["Device Role in Procedure@code"] == "DCM:113859"


# --- other vendor quirks ------------------------------------------------------------------
def test_dual_source_ct_keeps_both_sources() -> None:
    path = data("rdsr", "CT-RDSR-Siemens_Flash-QA-DS.dcm")
    kvps = [float(v) for v in dcmdump_numbers(path, "KVP")]
    events = by_type(events_from_path(path), SOURCETYPE_DOSE_EVENT)
    assert len(events) * 2 == len(kvps)
    seen = []
    for ev in events:
        sources = ev.fields["CT Acquisition Parameters"]["CT X-Ray Source Parameters"]
        assert isinstance(sources, list) and len(sources) == 2
        assert [s["Identification of the X-Ray Source"] for s in sources] == ["A", "B"]
        assert ev.fields["CT Acquisition Parameters"]["CT X-Ray Source Parameters@concept"] == [
            "DCM:113831",
            "DCM:113831",
        ]
        seen += [s["KVP"] for s in sources]
    assert seen == kvps


@pytest.mark.parametrize(
    ("name", "text", "value", "unit"),
    [
        ("RF-RDSR-Siemens-Zee.dcm", "1.6e-005", 1.6e-5, "Gym2"),
        ("DX-RDSR-Canon_CXDI.dcm", "1.07E-05", 1.07e-5, "Gy.m2"),
    ],
)
def test_vendor_number_formats(name: str, text: str, value: float, unit: str) -> None:
    path = data("rdsr", name)
    assert text in dcmdump_numbers(path, "Dose Area Product Total")
    (report,) = by_type(events_from_path(path), SOURCETYPE_DOSE_REPORT)
    acc = report.fields[ROOT]["Accumulated X-Ray Dose Data"]
    assert acc["Dose Area Product Total"] == value
    assert acc["Dose Area Product Total@unit"] == unit  # the unit code as the vendor wrote it


def test_unit_meaning_sibling_only_when_it_differs_from_the_code() -> None:
    events = events_from_path(data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"))
    params = by_type(events, SOURCETYPE_DOSE_EVENT)[0].fields["CT Acquisition Parameters"]
    assert params["Number of X-Ray Sources@unit"] == "{X-Ray sources}"
    assert params["Number of X-Ray Sources@unit_meaning"] == "X-Ray sources"
    assert "Scanning Length@unit_meaning" not in params  # "mm" == "mm"


def test_enhanced_sr_ge_optima_is_a_dose_report() -> None:
    path = data("rdsr", "CT-ESR-GE_Optima.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"
    assert dose.is_dose_report(ds)
    events = events_from_path(path)
    assert len(by_type(events, SOURCETYPE_DOSE_REPORT)) == 1
    per_event = by_type(events, SOURCETYPE_DOSE_EVENT)
    assert len(per_event) == len(dcmdump_uids(path, "Irradiation Event UID")) == 6
    ctdi = [float(v) for v in dcmdump_numbers(path, "Mean CTDIvol")]
    assert "CT Dose" not in per_event[0].fields  # the localizer has no dose container
    assert [e.fields["CT Dose"]["Mean CTDIvol"] for e in per_event if "CT Dose" in e.fields] == ctdi


def test_non_dose_sr_is_not_a_dose_report() -> None:
    for name in ("ESR_non-dose.dcm", "reportsi.dcm", "test-SR.dcm"):
        events = events_from_path(data("sr", name))
        assert [e.sourcetype for e in events] == [SOURCETYPE_INSTANCE], name
    tags = events_from_path(data("sr", "reportsi.dcm"))[0].fields
    assert len(tags["ContentSequence"]) == 5  # a non-dose SR keeps its tree in the tags


def test_radiopharmaceutical_report_detected_without_irradiation_events() -> None:
    events = events_from_path(data("study_petct_siemens", "NM-RRDSR-Siemens.dcm"))
    (report,) = by_type(events, SOURCETYPE_DOSE_REPORT)
    assert "Radiopharmaceutical Radiation Dose Report" in report.fields
    assert by_type(events, SOURCETYPE_DOSE_EVENT) == []


def test_zero_is_kept_and_empty_is_null() -> None:
    path = data("rdsr", "DX-RDSR-Canon_CXDI_noDAP.dcm")
    events = events_from_path(path)
    (report,) = by_type(events, SOURCETYPE_DOSE_REPORT)
    values = dict(walk(report.fields))
    zeros = [p for p, v in values.items() if v == 0 and not isinstance(v, bool)]
    assert len(zeros) >= 2  # dcmdump shows two NumericValue [0]
    assert values[f"{ROOT}.Accumulated X-Ray Dose Data.Dose Area Product Total"] is None
    assert f"{ROOT}.Accumulated X-Ray Dose Data.Dose Area Product Total" in values


def test_code_items_without_concept_code_become_null() -> None:
    for name in ("CT-RDSR-GEPixelMed.dcm", "CT-RDSR-Philips_BigBore4DCT.dcm"):
        events = by_type(events_from_path(data("rdsr", name)), SOURCETYPE_DOSE_EVENT)
        assert events
        assert "Target Region" in events[0].fields
        assert events[0].fields["Target Region"] is None


def test_big_endian_giotto() -> None:
    path = data("rdsr", "MG-RDSR-Giotto-DBT.dcm")
    assert (
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        == "1.2.840.10008.1.2.2"
    )
    expected = [float(v) for v in dcmdump_numbers(path, "Average Glandular Dose")]
    assert expected
    events = by_type(events_from_path(path), SOURCETYPE_DOSE_EVENT)
    assert [e.fields["Average Glandular Dose"] for e in events] == expected


def test_iso2022_allura_reads() -> None:
    events = events_from_path(data("rdsr", "RF-RDSR-Philips_Allura.dcm"))
    assert len(by_type(events, SOURCETYPE_DOSE_EVENT)) == 3


# --- times --------------------------------------------------------------------------------
def test_event_time_uses_lenient_timezone_offset() -> None:
    # RF-RDSR-GE writes TimezoneOffsetFromUTC as "UTC-04:00"; content 20190327 144119
    events = events_from_path(data("rdsr", "RF-RDSR-GE.dcm"))
    assert events[0].time_source == "content+tz"
    assert events[0].time == 1553697679.0 + 4 * 3600  # 2019-03-27 14:41:19 -04:00


def test_event_times_out_of_order_are_kept() -> None:
    events = by_type(
        events_from_path(data("rdsr", "DX-RDSR-Carestream_DRXEvolution.dcm")), SOURCETYPE_DOSE_EVENT
    )
    times = [e.time for e in events]
    assert times != sorted(times)  # the vendor wrote them out of order; we keep them as written
    assert all(e.time_source == "event_start/utc-assumed" for e in events)


def test_time_falls_back_to_study_then_now(tmp_path: Path) -> None:
    ds = make_instance(None, patient_id="p", study_uid="1.2.3", pixel_bytes=0)
    ds.TimezoneOffsetFromUTC = "+0100"
    [ev] = events_from_dataset(ds)
    assert ev.time_source == "study+tz"
    assert ev.time == 1704110400.0 - 3600  # 2024-01-01 12:00 +01:00 (1704110400 = 12:00 UTC)
    del ds.StudyDate
    [ev] = events_from_dataset(ds, now=123.0)
    assert (ev.time, ev.time_source) == (123.0, "now")


# --- synthetic: placeholders and value types ------------------------------------------------
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(vt: str, meaning: str | None, **kw: Any) -> Dataset:
    it = Dataset()
    it.RelationshipType = "CONTAINS"
    it.ValueType = vt
    if meaning is not None:
        it.ConceptNameCodeSequence = Sequence([_code("99" + meaning[:3], "99X", meaning)])
    for k, v in kw.items():
        setattr(it, k, v)
    return it


def _num(meaning: str, text: str | None, unit: str = "mGy") -> Dataset:
    if text is None:
        return _item("NUM", meaning)
    mv = Dataset()
    mv.MeasurementUnitsCodeSequence = Sequence([_code(unit, "UCUM", unit)])
    mv.NumericValue = text
    return _item("NUM", meaning, MeasuredValueSequence=Sequence([mv]))


def _synthetic_report(tmp_path: Path) -> bytes:
    ds = make_instance(None, patient_id="p", study_uid="1.2.3.4", modality="SR", pixel_bytes=0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.67")
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    bad_num = _num("Broken", "9.9999")  # corrupted to "1.2.3" in the bytes below
    ok = _num("Zero", "0")
    empty = _num("Empty", None)
    odd = _item("WHATEVER", "Unknown type")
    pname = _item("PNAME", "Person", PersonName="Doe^Jane")
    date = _item("DATE", "Day", Date="20240102")
    tm = _item("TIME", "When", Time="101112")
    text = _item("TEXT", "Note", TextValue="")
    image = _item("IMAGE", "Pic", ReferencedSOPSequence=Sequence([Dataset()]))
    image.ReferencedSOPSequence[0].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    ref = Dataset()
    ref.RelationshipType = "INFERRED FROM"
    ref.ReferencedContentItemIdentifier = [1, 3, 2]
    event = _item(
        "CONTAINER",
        "CT Acquisition",
        ContentSequence=Sequence(
            [
                _item("UIDREF", "Irradiation Event UID", UID="1.2.3.4.9"),
                _num("Mean CTDIvol", "55.5"),
                _num("Mean CTDIvol", "1.07E-05"),
            ]
        ),
    )
    event.ConceptNameCodeSequence[0].CodeValue = "113819"
    event.ConceptNameCodeSequence[0].CodingSchemeDesignator = "DCM"
    ds.ContentSequence = Sequence(
        [bad_num, ok, empty, odd, pname, date, tm, text, image, ref, event]
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    assert raw.count(b"9.9999") == 1
    return raw.replace(b"9.9999", b"1.2.3 ")


def test_bad_items_become_placeholders_and_keep_their_container(tmp_path: Path) -> None:
    events = events_from_bytes(_synthetic_report(tmp_path))
    (report,) = by_type(events, SOURCETYPE_DOSE_REPORT)
    body = report.fields[ROOT]
    assert body["Broken"] == {"@invalid": "not a number: '1.2.3'"}
    assert body["Unknown type"] == {"@invalid": "unsupported value type 'WHATEVER'"}
    assert body["Zero"] == 0 and body["Zero@unit"] == "mGy"
    assert "Empty" in body and body["Empty"] is None
    assert body["Person"] == "Doe^Jane"
    assert body["Day"] == "20240102"
    assert body["When"] == "101112"
    assert body["Note"] is None
    assert body["Pic"] == "1.2.3.4.5" and body["Pic@sop_class"] == "1.2.840.10008.5.1.4.1.1.2"
    assert body["@reference"] == "1.3.2"
    (ev,) = by_type(events, SOURCETYPE_DOSE_EVENT)
    assert ev.fields["Mean CTDIvol"] == [55.5, 1.07e-05]  # a repeated concept becomes a list
    assert ev.fields["Mean CTDIvol@unit"] == ["mGy", "mGy"]  # siblings too, aligned
    assert ev.id.endswith(":event:1.2.3.4.9")


def test_not_dicom_is_a_dicom_file_error() -> None:
    with pytest.raises(DicomFileError, match="not a DICOM file"):
        events_from_bytes(b"hello world" * 20, source="x.txt")


# --- simplified tags ----------------------------------------------------------------------
def test_simplified_tags_are_orthanc_style() -> None:
    ds = pydicom.dcmread(data("images", "CT_small.dcm"), stop_before_pixels=True)
    tags = simplify(ds)
    assert tags["PatientName"] == "CompressedSamples^CT1"
    assert tags["StudyDate"] == str(ds.StudyDate) and len(tags["StudyDate"]) == 8
    assert tags["ImagePositionPatient"].count("\\") == 2
    assert "PixelData" not in tags
    assert all(not isinstance(v, bytes) for _, v in walk(tags))
    seqs = [k for k, v in tags.items() if isinstance(v, list)]
    assert seqs and all(isinstance(i, dict) for k in seqs for i in tags[k])
    priv = [k for k in tags if re.fullmatch(r"[0-9a-f]{4},[0-9a-f]{4}", k)]
    assert priv  # private tags by gggg,eeee
