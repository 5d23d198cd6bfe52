"""De-identification (issue 13): the acceptance walk-through through the CLI, Table E.1-1
checked against an independent copy of the standard's table, and the units' rules."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomsync.deid.keys import Keys
from dicomsync.tags import SOURCETYPE_DOSE_EVENT, SOURCETYPE_DOSE_REPORT, events_from_bytes

from conftest import Cli
from dicomdata import build_seed_tree, data

SECRET = "correct horse battery staple"
RDSR = "CT-RDSR-Toshiba_DoseCheck.dcm"  # PNAME items, UTF-8 names, deep nesting
# Identifying attributes whose values must not survive (the list).
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "StationName", "DeviceSerialNumber", "PersonName",
)  # fmt: skip
MIN_CHARS = 4  # shorter values ("M", "CT") occur by chance in any file


def walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def identifying_values(ds: Dataset) -> set[str]:
    out = set()
    for elem in walk(ds):
        if elem.keyword in IDENTIFYING and elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                for part in [str(v), *str(v).split("^")]:
                    if len(part.strip()) >= MIN_CHARS:
                        out.add(part.strip())
    out |= sr_texts(ds, IDENTIFYING_CONCEPTS)
    return out


# SR TEXT items that name a device, its place or a person's organisation (TID 1002, 1004)
IDENTIFYING_CONCEPTS = frozenset({"121009", "121013", "121016", "121017"})


def sr_texts(ds: Dataset, concepts: frozenset[str]) -> set[str]:
    out = set()
    for item in walk_items(ds):
        code = item.get("ConceptNameCodeSequence")
        text = str(item.get("TextValue", "") or "").strip()
        if code and code[0].get("CodeValue") in concepts and len(text) >= MIN_CHARS:
            out.add(text)
    return out


def walk_items(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk_items(item)


def instance_uids(ds: Dataset) -> set[str]:
    """Every UID value that is not one of DICOM's own (SOP classes, transfer syntaxes)."""
    found = set()
    meta = getattr(ds, "file_meta", None)
    for elem in [*walk(ds), *(meta or [])]:
        if elem.VR == "UI" and elem.value:
            for v in elem.value if elem.VM > 1 else [elem.value]:
                if not str(v).startswith("1.2.840.10008."):
                    found.add(str(v))
    return found


def encodings(value: str) -> set[bytes]:
    out = set()
    for codec in ("utf-8", "latin-1", "utf-16-le"):
        try:
            out.add(value.encode(codec))
        except UnicodeEncodeError:
            pass
    return out


def dose_numbers(raw: bytes) -> list[tuple[str, Any]]:
    """Every number and unit of the dose events, by path (identity fields left out)."""
    out: list[tuple[str, Any]] = []

    def leaves(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                leaves(f"{prefix}/{k}", v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                leaves(f"{prefix}[{i}]", v)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            out.append((prefix, node))
        elif prefix.endswith("@unit"):
            out.append((prefix, node))

    for event in events_from_bytes(raw):
        if event.sourcetype in (SOURCETYPE_DOSE_REPORT, SOURCETYPE_DOSE_EVENT):
            leaves(event.sourcetype, event.fields)
    return sorted(out, key=repr)


def configure(cli: Cli, tmp_path: Path, options: list[str] | None = None, **extra: Any) -> None:
    cfg = json.loads(cli.config.read_text())
    cfg["Deidentify"] = {
        "research": {
            "Profile": "basic",
            "Options": options if options is not None else ["retain-longitudinal-modified-dates"],
            "SecretEnv": "DEID_SECRET",
            **extra,
        }
    }
    cli.config.write_text(json.dumps(cfg))


@pytest.fixture
def seed(tmp_path: Path, cli: Cli) -> dict[str, list[Path]]:
    layout = build_seed_tree(tmp_path / "dicom_root")
    folder = tmp_path / "dicom_root" / "patient3" / "dose1"
    folder.mkdir(parents=True)
    shutil.copyfile(data("rdsr", RDSR), folder / "rdsr.dcm")
    layout["patient3/dose1"] = [data("rdsr", RDSR)]
    (tmp_path / "out").mkdir()
    (tmp_path / "other").mkdir()
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "dicom_root"))
    cli("place", "add", "dicom_root", "research", str(tmp_path / "out"))
    cli("place", "add", "dicom_root", "other", str(tmp_path / "other"))
    configure(cli, tmp_path)
    return layout


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_seed_tree_and_rdsr_sent_deidentified(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    out = cli("send", "my_studies:*", "research", "--deidentify", "research").output
    assert out.splitlines()[-1].startswith("5 sent, 0 duplicate, 0 failed")

    originals = [pydicom.dcmread(p) for p in files_under(tmp_path / "dicom_root")]
    outputs = files_under(tmp_path / "out")
    secrets_found = set().union(*(identifying_values(ds) for ds in originals))
    uids = set().union(*(instance_uids(ds) for ds in originals))
    assert len(secrets_found) > 12 and len(uids) > 30  # the check has something to find
    for path in outputs:
        raw = path.read_bytes()
        for value in secrets_found:
            assert not any(e in raw for e in encodings(value)), f"{value!r} in {path}"
        for uid in uids:
            assert uid.encode() not in raw, f"original UID {uid} in {path}"
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
            "113100",
            "113107",
        ]
        assert str(ds.SOPInstanceUID).startswith("2.25.")

    # Counts kept: studies, series, instances.
    def counts(datasets: Sequence[Dataset]) -> tuple[int, int, int]:
        return (
            len({str(d.StudyInstanceUID) for d in datasets}),
            len({str(d.SeriesInstanceUID) for d in datasets}),
            len({str(d.SOPInstanceUID) for d in datasets}),
        )

    deidentified = [pydicom.dcmread(p) for p in outputs]
    assert counts(deidentified) == counts(originals)
    # Pixel data unchanged, dose values equal, references consistent: each output is the
    # image of one original under the keyed UID map.
    keys = Keys(SECRET.encode())
    by_uid = {str(d.SOPInstanceUID): d for d in deidentified}
    for original in originals:
        new = by_uid[keys.uid(str(original.SOPInstanceUID))]
        assert new.StudyInstanceUID == keys.uid(str(original.StudyInstanceUID))
        assert new.SeriesInstanceUID == keys.uid(str(original.SeriesInstanceUID))
        if "PixelData" in original:
            assert new.PixelData == original.PixelData
    rdsr = data("rdsr", RDSR).read_bytes()
    new_rdsr = next(
        p for p in outputs if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"
    )
    assert dose_numbers(new_rdsr.read_bytes()) == dose_numbers(rdsr)
    assert len(dose_numbers(rdsr)) > 50

    # A second send is all duplicates, and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in outputs}
    out = cli("send", "my_studies:*", "research", "--deidentify", "research").output
    assert out.splitlines()[-1].startswith("0 sent, 5 duplicate, 0 failed")
    assert {p: p.stat().st_mtime_ns for p in files_under(tmp_path / "out")} == before

    # Another secret: other UIDs and other pseudonyms.
    monkeypatch.setenv("DEID_SECRET", SECRET + "!")
    cli("send", "my_studies:*", "other", "--deidentify", "research")
    others = [pydicom.dcmread(p, stop_before_pixels=True) for p in files_under(tmp_path / "other")]
    assert len(others) == len(outputs)
    assert not {str(d.SOPInstanceUID) for d in others} & set(by_uid)
    assert not {str(d.PatientID) for d in others} & {str(d.PatientID) for d in deidentified}


def test_missing_secret_is_one_clear_line_and_nothing_is_sent(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEID_SECRET", raising=False)
    result = cli("send", "my_studies:*", "research", "--deidentify", "research", ok=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: de-identification profile 'research': the environment variable DEID_SECRET "
        "(its secret) is not set; nothing was sent"
    ]
    assert not (tmp_path / "out").exists() or not files_under(tmp_path / "out")


def test_secret_never_in_config_logs_or_errors(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    log = tmp_path / "run.log"
    result = cli("-vv", "--log-file", str(log), "send", "my_studies:*", "research",
                 "--deidentify", "research")  # fmt: skip
    assert SECRET not in result.output
    assert SECRET not in log.read_text()
    assert SECRET not in cli.config.read_text()
    for path in files_under(tmp_path / "out"):
        assert SECRET.encode() not in path.read_bytes()


# --- Table E.1-1, checked against a copy of the standard that is not ours -----------------
# The implementation's table is generated from the standard (scripts/gen_deid_table.py,
# the innolitics extraction of PS3.15 2024b). The test's copy is dicom-anonymizer's
# (its own generator, over PS3.15 2026c): rows with an action that exist in the files.
TABLE_FILES = [
    ("rdsr", RDSR),
    ("rdsr", "RF-RDSR-Philips_Allura.dcm"),
    ("rdsr", "MG-RDSR-Hologic_2D.dcm"),
    ("images", "CT_small.dcm"),
    ("images", "MR_small.dcm"),
    ("images", "examples_overlay.dcm"),
    ("study_petct_siemens", "NM-PetIm-Siemens.dcm"),
]


def standard_basic_profile() -> dict[int, str]:
    # a test dependency (pyproject's test extra): imported, never skipped
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as fields

    names = {
        "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
        "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
        "X_Z_U_STAR_TAGS": "X/Z/U*",
    }  # fmt: skip
    out = {}
    for name, action in names.items():
        for entry in getattr(fields, name):
            if len(entry) == 2:  # (group, element); 4-tuples are repeating groups
                out[(entry[0] << 16) | entry[1]] = action
    return out


def check_action(action: str, before: pydicom.DataElement, after: Dataset) -> str | None:
    """None when ``after`` follows ``action`` for ``before``; else what is wrong."""
    tag = before.tag
    present = tag in after
    empty = present and after[tag].value in (None, "", b"", [])
    changed = present and after[tag].value != before.value
    uid_replaced = present and (
        before.VR != "UI" or all(str(v).startswith("2.25.") for v in _values(after[tag]))
    )
    rules = {
        "X": not present,
        "Z": empty,
        # a D sequence keeps its items, whose values are checked one depth down
        "D": present and (before.VR == "SQ" or (not empty and changed)),
        "U": present and uid_replaced and changed,
        "K": present and not changed,
        "X/Z": not present or empty,
        "X/D": not present or (not empty and changed),
        "Z/D": empty or changed,
        "X/Z/D": not present or empty or changed,
        "X/Z/U*": not present or empty or before.VR == "SQ",
    }
    return None if rules[action] else f"{before.keyword or tag}: {action} not applied"


def _values(elem: pydicom.DataElement) -> list[Any]:
    return list(elem.value) if elem.VM > 1 else [elem.value]


def deidentify(raw: bytes, options: list[str], secret: str = SECRET) -> bytes:
    from dicomsync.deid.options import parse_profiles
    from dicomsync.deid.transform import Deidentifier, StudyKeys

    profile = parse_profiles({"p": {"SecretEnv": "S", "Options": options}})["p"]
    engine = Deidentifier(profile, Keys(secret.encode()))
    return engine.instance(raw, StudyKeys("DSPSEUDONYM", "DSPSEUDONYM", 100))


def test_table_e1_1_rows_present_in_the_files_are_applied() -> None:
    """At every depth: the items of a sequence the output keeps are checked against the
    items of the original, row by row (nested attributes: ``Sequence>Keyword``)."""
    standard = standard_basic_profile()
    checked: set[str] = set()
    problems: list[str] = []

    def compare(before: Dataset, after: Dataset, where: str) -> None:
        for elem in before:
            action = standard.get(int(elem.tag))
            if elem.VR == "SQ" and elem.tag in after and after[elem.tag].VR == "SQ":
                items = after[elem.tag].value
                if len(items) == len(elem.value):
                    for old, new in zip(elem.value, items, strict=True):
                        compare(old, new, f"{where}{elem.keyword}>")
            if action is None or elem.value in (None, "", b"", []):
                continue
            if elem.tag == 0x00100010 and not where:  # PatientName: the pseudonym
                assert after.PatientName == "DSPSEUDONYM"
                continue
            checked.add(f"{where}{elem.keyword}:{action}")
            if (problem := check_action(action, elem, after)) is not None:
                problems.append(f"{where}{problem}")

    for folder, name in TABLE_FILES:
        raw = data(folder, name).read_bytes()
        before = pydicom.dcmread(io.BytesIO(raw))
        after = pydicom.dcmread(io.BytesIO(deidentify(raw, [])))
        compare(before, after, "")
        assert not problems, name
    # the walk met every kind of action the files hold, at the top and nested
    assert {a.split(":")[1] for a in checked} >= {"X", "Z", "D", "U", "X/Z", "X/D", "X/Z/D"}
    assert len(checked) > 40
    assert len([a for a in checked if ">" in a]) > 10


def test_our_table_agrees_with_the_standard_copy_on_the_rows_of_the_files() -> None:
    from dicomsync.deid import table

    ours = table.actions([])
    standard = standard_basic_profile()
    for folder, name in TABLE_FILES:
        for elem in pydicom.dcmread(data(folder, name)):
            if int(elem.tag) in standard:
                assert ours.get(int(elem.tag)) == standard[int(elem.tag)], elem.keyword


def test_replicate_deidentifies_the_matching_studies_and_a_late_instance_goes_alone(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    cli("sink", "add", "sqlite_index", "local", str(tmp_path / "idx.sqlite"))
    cli("index", "my_studies:*", "--sink", "local")
    args = ("replicate", "my_studies", "research", "--where", "Modality=SR")
    out = cli(*args, "--deidentify", "research").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed")
    (sent,) = files_under(tmp_path / "out")
    assert pydicom.dcmread(sent).PatientIdentityRemoved == "YES"
    assert (
        cli(*args, "--deidentify", "research")
        .output.splitlines()[-1]
        .startswith("0 sent, 1 duplicate")
    )
    # A late instance of a study sent before: only that instance travels, into the same
    # de-identified study.
    cli("send", "my_studies:patient1/study1", "research", "--deidentify", "research")
    study = [p for p in files_under(tmp_path / "out") if p != sent]
    late = pydicom.dcmread(seed["patient1/study1"][0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5.6.7.8.9")
    late.save_as(tmp_path / "dicom_root" / "patient1" / "study1" / "late.dcm")
    result = cli("send", "my_studies:patient1/study1", "research", "--deidentify", "research")
    assert result.output.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (1 instances")
    now = [p for p in files_under(tmp_path / "out") if p != sent]
    assert len(now) == len(study) + 1 and {p.parent for p in now} == {study[0].parent}


def test_pseudonym_map_preloaded_from_csv_used_by_send_and_exported(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    configure(cli, tmp_path, PatientIds="pseudonyms")
    patient = str(pydicom.dcmread(seed["patient2/study1"][0]).PatientID)
    csv_in = tmp_path / "subjects.csv"
    csv_in.write_text(
        f"original_id,pseudonym_id,pseudonym_name\n{patient},SUBJ-007,Subject^Seven\n"
    )
    out = cli("deid", "map", "import", "research", str(csv_in)).output
    assert out.startswith("1 pseudonyms added")
    cli("send", "my_studies:*", "research", "--deidentify", "research")
    ids = {str(pydicom.dcmread(p).PatientID) for p in files_under(tmp_path / "out")}
    assert "SUBJ-007" in ids and len(ids) >= 3
    assert (tmp_path / "SUBJ-007").exists() is False  # the key is under the destination root
    assert (tmp_path / "out" / "SUBJ-007").is_dir()
    names = {
        str(pydicom.dcmread(p).PatientName) for p in files_under(tmp_path / "out" / "SUBJ-007")
    }
    assert names == {"Subject^Seven"}
    exported = tmp_path / "map.csv"
    cli("deid", "map", "export", "research", str(exported))
    rows = exported.read_text().splitlines()
    assert rows[0] == "original_id,pseudonym_id,pseudonym_name"
    assert f"{patient},SUBJ-007,Subject^Seven" in rows and len(rows) == len(ids) + 1
    assert exported.stat().st_mode & 0o077 == 0
    state = tmp_path / "dicomsync-state" / "deid.sqlite"
    assert state.exists() and state.stat().st_mode & 0o077 == 0
    refused = cli("deid", "map", "export", "research", str(exported), ok=False)
    assert refused.exit_code == 1 and "exists" in refused.output
