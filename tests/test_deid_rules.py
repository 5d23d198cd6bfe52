"""De-identification rules (issue 13): each PS3.15 option changes the actions its Table
E.1-1 column names, at every depth; UIDs, dates and pseudonyms are keyed and repeatable;
SR content and dose reports; the burned-in safety rule; the pseudonym map; the
configuration's checks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from test_deid import dose_numbers, walk

from dicomsync.deid import table
from dicomsync.deid.keys import Keys
from dicomsync.deid.options import parse_profiles
from dicomsync.deid.pseudonyms import EntryCache, PseudonymMap
from dicomsync.deid.transform import Deidentifier, StudyKeys
from dicomsync.errors import ConfigError, DeidentificationRefused

from dicomdata import data

SECRET = b"rules secret"
STUDY = StudyKeys("DSPSEUDO", "DSPSEUDO", 100)
FILES = [
    ("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm"),
    ("rdsr", "RF-RDSR-Philips_Allura.dcm"),
    ("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"),
    ("images", "CT_small.dcm"),
    ("images", "MR_small.dcm"),
    ("study_petct_siemens", "NM-PetIm-Siemens.dcm"),
]
RDSRS = sorted(p.name for p in data("rdsr").glob("*.dcm"))


def engine(options: list[str], **extra: Any) -> Deidentifier:
    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options, **extra}})["p"]
    return Deidentifier(profile, Keys(SECRET))


def run(options: list[str], raw: bytes, **extra: Any) -> Dataset:
    return pydicom.dcmread(io.BytesIO(engine(options, **extra).instance(raw, STUDY)))


def shifted(value: Any, days: int) -> Any:
    import datetime

    if not isinstance(value, str):
        return [shifted(str(v), days) for v in value]
    date = datetime.datetime.strptime(value[:8], "%Y%m%d").date()
    return (date - datetime.timedelta(days=days)).strftime("%Y%m%d") + value[8:]


@pytest.mark.parametrize(
    "option",
    [
        "retain-uids",
        "retain-device-identity",
        "retain-institution-identity",
        "retain-patient-characteristics",
        "retain-longitudinal-full-dates",
        "retain-longitudinal-modified-dates",
        "clean-descriptors",
    ],
)
def test_each_option_applies_its_column_to_the_attributes_of_the_files(option: str) -> None:
    """Every row whose option column names K or C, for attributes present in the files
    (at any depth): K keeps the value, C cleans it (dates move back by the offset)."""
    column = {r.tag: r.options[option] for r in table.rows() if option in r.options}
    checked = 0
    for folder, name in FILES:
        raw = data(folder, name).read_bytes()
        before = {e.tag: e for e in walk(pydicom.dcmread(io.BytesIO(raw)))}
        after = {e.tag: e for e in walk(run([option], raw))}
        basic = {e.tag: e for e in walk(run([], raw))}
        for tag, elem in before.items():
            action = column.get(f"{int(tag):08x}")
            if action is None or elem.VR == "SQ" or elem.value in (None, ""):
                continue
            if tag in (0x00100010, 0x00100020):  # PatientName, PatientID: pseudonyms
                continue
            checked += 1
            assert tag in after, f"{name}: {elem.keyword} removed under {option}"
            if action == "K":
                assert after[tag].value == elem.value, f"{name}: {elem.keyword} not kept"
            elif elem.VR in ("DA", "DT"):
                assert after[tag].value == shifted(elem.value, 100), elem.keyword
            elif elem.VR == "TM":
                assert after[tag].value == elem.value
            # without the option the basic action applies
            if action == "K" and elem.VR != "UI" and tag in basic:
                assert basic[tag].value != elem.value or elem.VR in ("CS",), elem.keyword
    assert checked >= 2, f"no attribute of the files has a {option} action"


def test_uids_are_keyed_consistent_and_references_follow() -> None:
    raw = data("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm").read_bytes()
    before = pydicom.dcmread(io.BytesIO(raw))
    after = run([], raw)
    keys = Keys(SECRET)
    pairs = list(zip(walk(before), walk(after), strict=False))
    for old, new in pairs:
        if old.tag == new.tag and old.VR == "UI" and old.value:
            values = old.value if old.VM > 1 else [old.value]
            if str(values[0]).startswith("1.2.840.10008."):
                assert new.value == old.value  # DICOM's own UIDs stay
            else:
                expected = [keys.uid(str(v)) for v in values]
                assert (list(new.value) if new.VM > 1 else [new.value]) == expected
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert run([], raw).SOPInstanceUID == after.SOPInstanceUID  # repeatable
    other = Deidentifier(engine([]).profile, Keys(b"another")).instance(raw, STUDY)
    assert pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID != after.SOPInstanceUID
    assert run(["retain-uids"], raw).SOPInstanceUID == before.SOPInstanceUID
    assert len(str(after.SOPInstanceUID)) <= 64


def test_dates_shift_per_patient_and_keep_intervals() -> None:
    keys = Keys(SECRET)
    assert keys.date_offset("A") == keys.date_offset("A")
    assert 1 <= keys.date_offset("A") <= 3650
    assert len({keys.date_offset(str(i)) for i in range(50)}) > 40
    raw = data("images", "CT_small.dcm").read_bytes()
    before = pydicom.dcmread(io.BytesIO(raw))
    after = run(["retain-longitudinal-modified-dates"], raw)
    assert after.StudyDate == shifted(before.StudyDate, 100)
    assert after.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "StudyDate" not in run([], raw) or run([], raw).StudyDate in ("", None)


def test_sr_content_tree_keeps_dose_and_follows_the_profile() -> None:
    raw = data("rdsr", "CT-RDSR-Toshiba_DoseCheck.dcm").read_bytes()
    before, after = pydicom.dcmread(io.BytesIO(raw)), run([], raw)
    texts = {
        i.ConceptNameCodeSequence[0].CodeValue: (i.get("TextValue"), i.get("PersonName"))
        for i in _items(after)
        if "ConceptNameCodeSequence" in i and i.get("ValueType") in ("TEXT", "PNAME")
    }
    names = [v[1] for v in texts.values() if v[1] is not None]
    assert names and all(str(n) == "ANONYMOUS" for n in names)  # observer names
    assert all(t[0] in (None, "ANONYMIZED") for t in texts.values())
    raw = data("rdsr", "CT-RDSR-Siemens-Multi-2.dcm").read_bytes()
    before = pydicom.dcmread(io.BytesIO(raw))
    kept = run(["retain-device-identity"], raw)
    serials = [
        i.TextValue
        for i in _items(kept)
        if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121013"
    ]
    originals = [
        i.TextValue
        for i in _items(before)
        if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121013"
    ]
    assert serials == originals and originals  # device observer name kept with the option
    assert run(["retain-device-identity"], raw).DeviceSerialNumber == before.DeviceSerialNumber
    assert (
        "DeviceSerialNumber" not in after or after.DeviceSerialNumber != before.DeviceSerialNumber
    )


@pytest.mark.parametrize("name", RDSRS)
def test_every_vendor_rdsr_keeps_its_dose_numbers(name: str) -> None:
    raw = data("rdsr", name).read_bytes()
    for options in ([], ["clean-structured-content", "retain-longitudinal-modified-dates"]):
        out = engine(options).instance(raw, STUDY)
        assert dose_numbers(out) == dose_numbers(raw), options


def _items(ds: Dataset) -> list[Dataset]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out.append(item)
                out.extend(_items(item))
    return out


def test_records_and_cid_7050_codes() -> None:
    raw = data("images", "MR_small.dcm").read_bytes()
    out = run(["retain-device-identity", "retain-longitudinal-full-dates"], raw)
    assert out.PatientIdentityRemoved == "YES"
    codes = [
        (c.CodeValue, c.CodingSchemeDesignator) for c in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM"), ("113109", "DCM"), ("113106", "DCM")]
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    from pydicom.sr._concepts_dict import concepts  # PS3.16, as pydicom ships it

    from dicomsync.deid.options import CID_7050

    cid_7050: dict[str, str] = {}
    entries: dict[str, dict[str, tuple[str, list[int]]]] = concepts["DCM"]  # type: ignore[assignment]
    for entry in entries.values():
        for code, (meaning, cids) in entry.items():
            if 7050 in cids:
                cid_7050[code] = meaning
    for code in out.DeidentificationMethodCodeSequence:  # PS3.16 CID 7050's own codes
        assert code.CodeMeaning == cid_7050[code.CodeValue]
    assert dict(CID_7050.values()).items() <= cid_7050.items()


def test_private_attributes_removed_or_safe_ones_kept() -> None:
    raw = data("rdsr", "RF-RDSR-Philips_Allura.dcm").read_bytes()
    assert any(e.tag.is_private for e in pydicom.dcmread(io.BytesIO(raw)))
    assert not any(e.tag.is_private for e in walk(run([], raw)))
    kept = [e for e in walk(run(["retain-safe-private"], raw)) if e.tag.is_private]
    assert kept and all(
        e.VR in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "AT", "UV", "SV")
        or (e.VR == "LO" and 0x10 <= (int(e.tag) & 0xFFFF) <= 0xFF)
        for e in kept
    )


def test_keep_and_remove_lists() -> None:
    raw = data("images", "CT_small.dcm").read_bytes()
    before = pydicom.dcmread(io.BytesIO(raw))
    out = run([], raw, Keep=["InstitutionName"], Remove=["Manufacturer"])
    assert out.InstitutionName == before.InstitutionName
    assert "Manufacturer" not in out


@pytest.mark.parametrize(
    "folder,name", [("charset", "chrGerm.dcm"), ("odd", "ExplVR_BigEnd.dcm")]
)  # Secondary Capture, Ultrasound
def test_burned_in_classes_are_refused_unless_allowed(folder: str, name: str) -> None:
    raw = data(folder, name).read_bytes()
    with pytest.raises(DeidentificationRefused, match="allow-burned-in"):
        engine([]).instance(raw, STUDY)
    assert run(["allow-burned-in"], raw).PatientIdentityRemoved == "YES"


def test_burned_in_annotation_yes_is_refused() -> None:
    ds = pydicom.dcmread(data("images", "CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DeidentificationRefused, match="BurnedInAnnotation is YES"):
        engine([]).instance(buf.getvalue(), STUDY)


def test_pseudonym_map_import_export_and_derived_entries(tmp_path: Path) -> None:
    m = PseudonymMap(tmp_path / "deid.sqlite", "pseudonyms")
    added = m.import_csv(
        io.StringIO(
            "original_id,pseudonym_id,pseudonym_name\nP1,SUBJ-001,Subject^One\nP2,SUBJ-002\n"
        )
    )
    assert added == 2
    assert m.get("P1") == ("SUBJ-001", "Subject^One") and m.get("P2") == ("SUBJ-002", "SUBJ-002")
    assert m.put("P3", "DSX") == ("DSX", "DSX") and m.put("P3", "other") == ("DSX", "DSX")
    with pytest.raises(ConfigError, match="already another patient's"):
        m.import_csv(io.StringIO("P9,SUBJ-001\n"))
    assert m.get("P9") is None
    out = io.StringIO()
    assert m.export_csv(out) == 3
    assert out.getvalue().splitlines()[0] == "original_id,pseudonym_id,pseudonym_name"
    m.close()
    assert (tmp_path / "deid.sqlite").stat().st_mode & 0o077 == 0  # owner only
    again = PseudonymMap(tmp_path / "deid.sqlite", "pseudonyms")
    assert again.get("P1") == ("SUBJ-001", "Subject^One")  # durable


def test_pseudonym_map_remembers_entries_and_commits_as_the_queue_does(tmp_path: Path) -> None:
    m = PseudonymMap(tmp_path / "deid.sqlite", "pseudonyms")
    try:
        mode = m._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert (mode, m._db.execute("PRAGMA synchronous").fetchone()[0]) == ("wal", 1)  # NORMAL
        statements: list[str] = []
        m._db.set_trace_callback(statements.append)
        assert m.put("P1", "DS1") == ("DS1", "DS1")
        assert statements  # stored
        statements.clear()
        assert m.get("P1") == ("DS1", "DS1") and m.put("P1", "DS2") == ("DS1", "DS1")
        assert statements == []  # answered from memory
    finally:
        m.close()
    cache = EntryCache(size=2)
    for key in ("a", "b", "a", "c"):
        cache.put(key, (key, key))
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") == ("a", "a")


def test_profile_section_problems_are_listed() -> None:
    problems: list[str] = []
    parse_profiles(
        {
            "a": {"SecretEnv": "S", "Options": ["retain-everything"]},
            "b": {"Options": []},
            "c": {"SecretEnv": "S", "Keep": ["NoSuchKeyword"], "PatientIds": "x; drop"},
            "d": {"SecretEnv": "S", "Options": ["retain-longitudinal-full-dates",
                                                 "retain-longitudinal-modified-dates"]},
        },
        problems=problems,
    )  # fmt: skip
    text = "\n".join(problems)
    assert "unknown option 'retain-everything'" in text
    assert "option 'SecretEnv' is required" in text
    assert "'NoSuchKeyword' is not a DICOM attribute keyword" in text
    assert "PatientIds must be a table name" in text
    assert "exclude each other" in text


def test_routes_must_name_a_known_profile_and_agree_per_destination(tmp_path: Path) -> None:
    from dicomsync import routing

    places = {"b": {"Kind": "dicom_root", "Path": str(tmp_path)}}
    section = {
        "Places": places,
        "Deidentify": {"research": {"SecretEnv": "S"}},
        "Routes": [
            {"Destination": "b", "Deidentify": "research"},
            {"Destination": "b"},
            {"Destination": "b", "Deidentify": "nope"},
        ],
    }
    problems = routing.validate({"DicomSync": section})
    assert any("unknown profile 'nope'" in p for p in problems)
    assert any("must name the same profile" in p for p in problems)
    section["Routes"] = [{"Destination": "b", "Deidentify": "research"}]
    cfg = routing.load({"DicomSync": section}, tmp_path / "orthanc.json")
    assert cfg is not None and cfg.deidentify == {"b": "research"}
    place = cfg.build_place("b")
    assert type(place).__name__ == "Deidentified"
    assert json.dumps(cfg.routes[0].to_dict())


def _concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def test_clean_structured_content_cuts_identifying_values_out_of_sr_text() -> None:
    ds = pydicom.dcmread(data("rdsr", "CT-RDSR-Siemens-Multi-2.dcm"))
    family = str(ds.PatientName).split("^")[0]
    comments = [  # 121106 Comment (device observer TEXT items are dummies: test_fix_deid_sr)
        i for i in _items(ds) if i.get("ValueType") == "TEXT" and _concept(i) == "121106"
    ]
    comments[0].TextValue = f"scan of {family} at {ds.InstitutionName}, ok"
    buf = io.BytesIO()
    ds.save_as(buf)
    cleaned = run(["clean-structured-content"], buf.getvalue())
    value = next(str(i.TextValue) for i in _items(cleaned) if "scan of" in str(i.get("TextValue")))
    assert family not in value and str(ds.InstitutionName) not in value
    assert value == "scan of XXXX at XXXX, ok"
    basic = run([], buf.getvalue())
    assert not [i for i in _items(basic) if "scan of" in str(i.get("TextValue", ""))]


@pytest.mark.parametrize("name", ["CT_small.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_file_meta_is_written_anew(name: str) -> None:
    """Both writers (ours for native encodings, dcmwrite for compressed ones): the meta
    names the new instance, and keeps no AE title or private information of the old."""
    ds = pydicom.dcmread(data("images", name))
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_AE"
    ds.file_meta.SendingApplicationEntityTitle = "SENDER_AE"
    buf = io.BytesIO()
    ds.save_as(buf)
    raw = engine([]).instance(buf.getvalue(), STUDY)
    assert b"HOSPITAL_AE" not in raw and b"SENDER_AE" not in raw
    out = pydicom.dcmread(io.BytesIO(raw))  # a valid Part 10 file, read strictly
    meta = out.file_meta
    assert (
        meta.MediaStorageSOPInstanceUID
        == out.SOPInstanceUID
        == Keys(SECRET).uid(str(ds.SOPInstanceUID))
    )
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert out.PixelData == ds.PixelData


def test_our_little_endian_writer_writes_what_pydicom_writes() -> None:
    """The writer of elements still as read (``values._write_little_endian``) gives the
    bytes of pydicom's ``write_dataset``, on every little-endian file of the test data."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomsync.deid import values

    compared = sequences = 0
    for path in sorted(data().rglob("*.dcm")) + sorted(data("study_tree_pcir").rglob("*")):
        if not path.is_file() or path.name == "DICOMDIR" or "broken" in path.parts:
            continue
        ds = pydicom.dcmread(path)
        encoding = ds.original_encoding
        if not encoding[1]:
            continue
        ours, theirs = DicomBytesIO(), DicomBytesIO()
        for fp in (ours, theirs):
            fp.is_implicit_VR, fp.is_little_endian = encoding
        write_dataset(theirs, ds)
        values._write_little_endian(ours, ds, bool(encoding[0]), "iso8859", {})
        assert ours.getvalue() == theirs.getvalue(), path.name
        # the same once every sequence is decoded (as the walk leaves them): written item
        # by item by ours, with pydicom's lengths
        decoded = _decode_sequences(ds)
        ours, theirs = DicomBytesIO(), DicomBytesIO()
        for fp in (ours, theirs):
            fp.is_implicit_VR, fp.is_little_endian = encoding
        write_dataset(theirs, ds)
        values._write_little_endian(ours, ds, bool(encoding[0]), "iso8859", {})
        assert ours.getvalue() == theirs.getvalue(), f"{path.name}, sequences decoded"
        compared += 1
        sequences += decoded
    assert compared > 50
    assert sequences > 100


def _decode_sequences(ds: Any) -> int:
    """Decode every sequence of ``ds``, at every depth (their items' other elements stay
    as read); how many."""
    from dicomsync.deid.values import vr_of

    n = 0
    for tag in list(ds.keys()):
        if vr_of(ds, tag) == "SQ":
            n += 1
            for item in ds[tag].value:
                n += _decode_sequences(item)
    return n
