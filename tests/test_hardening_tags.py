"""Issue 9, point 1 (tags): no recursion without bound on the sequences of a DICOM file.

A content tree or any sequence nested 1,000 or 10,000 levels deep gives the documented
``{"@invalid": …}`` placeholder at the first level too deep, and the other instances
(and the rest of this one) are indexed as usual. A file that pydicom itself cannot read
(undefined-length sequences nested past its recursion) is an unreadable instance
(``DicomFileError``), never a ``RecursionError``.

The deep files are written here: pydicom encodes one level, a flat loop nests it.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomsync import jsonsafe
from dicomsync.errors import DicomFileError
from dicomsync.tags import events_from_bytes, lite, sr
from dicomsync.tags.lite import LiteError, parse_sequence
from dicomsync.tags.simplify import MAX_DEPTH as SQ_MAX_DEPTH

from dicomdata import data

CONTENT = 0x0040A730
EVIDENCE = 0x0040A375  # CurrentRequestedProcedureEvidenceSequence: any SQ will do
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
UNDEFINED = 0xFFFFFFFF


def _encoded(ds: Dataset) -> bytes:
    """Explicit VR little endian bytes of a dataset, written by pydicom."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def nested(
    tag: int,
    body: bytes,
    depth: int,
    *,
    undefined: bool,
    first: bytes = b"",
    sibling: bytes = b"",
) -> bytes:
    """Element ``tag`` (SQ) with one item holding ``body`` and the same SQ, ``depth`` levels
    deep (``first`` replaces the body of the outermost item; ``sibling``, when given, is the
    body of a second item in every sequence). Lengths are computed from the inside out, so
    even 10,000 levels take one pass."""

    def sq(length: int) -> bytes:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, length)

    def item(length: int) -> bytes:
        return struct.pack("<HHI", 0xFFFE, 0xE000, length)

    bodies = [first or body] + [body] * (depth - 1)
    second = item(len(sibling)) + sibling if sibling else b""
    if undefined:
        end = (
            struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + second + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
        return b"".join(sq(UNDEFINED) + item(UNDEFINED) + b for b in bodies) + end * depth
    headers: list[bytes] = []
    inner = 0  # length of the SQ element one level down
    for b in reversed(bodies):
        item_length = len(b) + inner
        headers.append(sq(8 + item_length + len(second)) + item(item_length))
        inner = 12 + 8 + item_length + len(second)
    return b"".join(h + b for h, b in zip(reversed(headers), bodies, strict=True)) + second * depth


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _container(value: str, scheme: str, meaning: str) -> bytes:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = [_code(value, scheme, meaning)]
    return _encoded(item)


def instance(tail: bytes, *, sop_class: str = DOSE_SR, root: str = "") -> bytes:
    """A Part 10 SR file (written by pydicom) whose dataset ends with the bytes ``tail``
    (elements with tags above every tag the header uses)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "DEEP"
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [
        _code("121070", "DCM", root)
        if root
        else _code("113701", "DCM", "X-Ray Radiation Dose Report")
    ]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue() + tail


def deep_report(depth: int, *, undefined: bool = False, event_first: bool = False) -> bytes:
    """A dose report whose content tree nests CONTAINER "Level" ``depth`` levels deep
    (the outermost one a CT Acquisition event when ``event_first``)."""
    level = _container("L1", "99TEST", "Level")
    first = _container("113819", "DCM", "CT Acquisition") if event_first else b""
    return instance(nested(CONTENT, level, depth, undefined=undefined, first=first))


def by_type(events: list[Any]) -> dict[str, Any]:
    return {e.sourcetype.split(":")[1]: e for e in events}


def levels(value: Any, key: str) -> tuple[int, Any]:
    """Follow ``key`` down nested objects: (how many levels, the last value)."""
    n = 0
    while isinstance(value, dict) and key in value:
        value, n = value[key], n + 1
    return n, value


def assert_bounded_json(events: list[Any]) -> None:
    """Every event serializes, and parses back within jsonsafe's default depth."""
    for event in events:
        jsonsafe.loads(json.dumps(event.to_json()))


@pytest.mark.parametrize("depth", [sr.MAX_DEPTH + 1, 1000, 10_000])
def test_deep_content_tree_gives_invalid_marker(depth: int) -> None:
    events = by_type(events_from_bytes(deep_report(depth)))
    report = events["dose_report"].fields["X-Ray Radiation Dose Report"]
    n, last = levels(report, "Level")
    assert n == sr.MAX_DEPTH + 1
    assert last == {"@invalid": f"content nested deeper than {sr.MAX_DEPTH} levels"}
    assert_bounded_json(list(events.values()))


@pytest.mark.parametrize("undefined", [False, True])
def test_repeated_concepts_at_every_level_stay_within_jsonsafe_depth(undefined: bool) -> None:
    """The worst shape: a repeated concept (a list) at every level, 10,000 (or, with
    undefined lengths, 150) levels deep; in the report and in a generic SR's instance event."""
    level = _container("L1", "99TEST", "Level")
    depth = 150 if undefined else 10_000
    tail = nested(CONTENT, level, depth, undefined=undefined, sibling=level)
    events = events_from_bytes(instance(tail)) + events_from_bytes(
        instance(tail, sop_class=COMPREHENSIVE_SR, root="Notes")
    )
    assert len(events) == 3
    report = by_type(events[:2])["dose_report"].fields["X-Ray Radiation Dose Report"]
    n = 0
    while isinstance(report, dict) and isinstance(report.get("Level"), list):
        report, n = report["Level"][0], n + 1
    assert n == sr.MAX_DEPTH + 1 and report == {
        "@invalid": f"content nested deeper than {sr.MAX_DEPTH} levels"
    }
    assert_bounded_json(events)


def test_content_tree_at_the_limit_is_whole() -> None:
    events = by_type(events_from_bytes(deep_report(sr.MAX_DEPTH)))
    report = events["dose_report"].fields["X-Ray Radiation Dose Report"]
    n, last = levels(report, "Level")
    assert (n, last) == (sr.MAX_DEPTH, {})
    assert "@invalid" not in json.dumps(report)


@pytest.mark.parametrize("depth", [1000, 10_000])
def test_deep_content_under_an_irradiation_event(depth: int) -> None:
    """The event walk is flat and bounded; the event's own content gets the marker."""
    events = by_type(events_from_bytes(deep_report(depth, event_first=True)))
    event = events["dose_event"].fields
    assert event["EventType"] == "CT Acquisition"
    n, last = levels(event, "Level")
    assert n == sr.MAX_DEPTH  # the event container itself is level 1
    assert last == {"@invalid": f"content nested deeper than {sr.MAX_DEPTH} levels"}
    assert_bounded_json(list(events.values()))


@pytest.mark.parametrize("depth", [1000, 5000])
def test_undefined_length_nesting_pydicom_cannot_read_is_an_unreadable_file(depth: int) -> None:
    """pydicom parses undefined-length sequences recursively while reading the file."""
    with pytest.raises(DicomFileError, match=r"corrupt DICOM \(sequences nested too deep\)$"):
        events_from_bytes(deep_report(depth, undefined=True), source="deep.dcm")


def test_undefined_length_nesting_pydicom_can_read_is_bounded_by_us() -> None:
    events = by_type(events_from_bytes(deep_report(100, undefined=True)))
    n, last = levels(events["dose_report"].fields["X-Ray Radiation Dose Report"], "Level")
    assert n == sr.MAX_DEPTH + 1 and "@invalid" in last


@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("depth", [SQ_MAX_DEPTH + 1, 1000, 10_000])
def test_simplified_tags_of_any_deep_sequence(depth: int, undefined: bool) -> None:
    """Any SQ, in any instance: the simplified tags stop with the placeholder."""
    if undefined and depth > 100:
        depth = 100  # deeper, pydicom cannot read it (see the test above)
    item = Dataset()
    item.SeriesInstanceUID = "1.2.3"
    tail = nested(EVIDENCE, _encoded(item), depth, undefined=undefined)
    (event,) = events_from_bytes(instance(tail, sop_class=COMPREHENSIVE_SR, root="Notes"))
    value: Any = event.fields
    n = 0
    while isinstance(value, dict) and isinstance(
        value.get("CurrentRequestedProcedureEvidenceSequence"), list
    ):
        (value,) = value["CurrentRequestedProcedureEvidenceSequence"]
        assert value["SeriesInstanceUID"] == "1.2.3"
        n += 1
    assert n == SQ_MAX_DEPTH
    assert value["CurrentRequestedProcedureEvidenceSequence"] == {
        "@invalid": f"sequence nested deeper than {SQ_MAX_DEPTH} levels"
    }
    assert_bounded_json([event])


def test_deep_content_of_a_generic_sr_in_its_instance_event() -> None:
    """A non-dose SR keeps its ContentSequence in the instance event: bounded too."""
    tail = nested(CONTENT, _container("L1", "99TEST", "Level"), 10_000, undefined=False)
    (event,) = events_from_bytes(instance(tail, sop_class=COMPREHENSIVE_SR, root="Notes"))
    assert "@invalid" in json.dumps(event.fields)
    assert_bounded_json([event])


def test_fast_reader_refuses_deep_nesting_and_pydicom_takes_over() -> None:
    raw = nested(CONTENT, _container("L1", "99TEST", "Level"), lite.MAX_DEPTH + 1, undefined=False)
    value = raw[12:]  # the SQ's value: its items
    with pytest.raises(LiteError, match="nested deeper"):
        parse_sequence(value, implicit=False, little=True)
    ok = nested(CONTENT, _container("L1", "99TEST", "Level"), lite.MAX_DEPTH // 2, undefined=False)
    assert len(parse_sequence(ok[12:], implicit=False, little=True)) == 1


def test_on_a_worker_thread() -> None:
    """Lanes run on threading.Thread with the default stack: same result, no crash."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["events"] = events_from_bytes(deep_report(10_000, event_first=True))
            events_from_bytes(deep_report(5000, undefined=True))
        except BaseException as exc:  # the test reports it
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert isinstance(out.get("error"), DicomFileError), out.get("error")
    assert len(out["events"]) == 3


def test_cli_tags_folder_with_deep_files_prints_the_others(cli: Any, tmp_path: Path) -> None:
    """The deep reports are indexed with their marker, the unreadable one is named in one
    warning, and a real report beside them gives its events as usual."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_deep.dcm").write_bytes(deep_report(10_000, event_first=True))
    (folder / "b_unreadable.dcm").write_bytes(deep_report(5000, undefined=True))
    real = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    (folder / "c_real.dcm").write_bytes(real.read_bytes())
    cli("init")
    result = cli("tags", str(folder))
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    sources = {Path(e["source"]).name for e in lines}
    assert sources == {"a_deep.dcm", "c_real.dcm"}
    real_sop = str(pydicom.dcmread(real, stop_before_pixels=True).SOPInstanceUID)
    assert sum(e["id"].startswith(real_sop) for e in lines) == 2 + 4  # instance, report, 4 events
    assert "b_unreadable.dcm: corrupt DICOM (sequences nested too deep)" in result.output
    assert "Traceback" not in result.output


# --- the index query language and the index ----------------------------------------------------
def test_index_query_bounds(tmp_path: Path) -> None:
    """A query is bounded in conditions and length; SQLite never sees a tree too deep."""
    from dicomsync.errors import QueryError
    from dicomsync.index_query import MAX_CONDITIONS, MAX_LENGTH, IndexQuery
    from dicomsync.sinks.sqlite_index import SqliteIndex

    index = SqliteIndex("local", tmp_path / "index.sqlite")
    most = " AND ".join(f"F{i}!=1" for i in range(MAX_CONDITIONS))  # != is two EXISTS
    assert list(index.query(IndexQuery.parse(most))) == []
    with pytest.raises(QueryError, match=f"more than {MAX_CONDITIONS} conditions"):
        IndexQuery.parse(most + " AND G=1")
    for text in ("A=1 " * (MAX_LENGTH // 4 + 1), 'F="' + "x" * 1_000_000):
        with pytest.raises(QueryError) as caught:
            IndexQuery.parse(text)
        assert len(str(caught.value)) < 200  # never the query echoed back
    index.close()


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400"])
def test_index_query_refuses_non_finite_numbers(number: str) -> None:
    from dicomsync.errors import QueryError
    from dicomsync.index_query import IndexQuery

    with pytest.raises(QueryError, match="out of range"):
        IndexQuery.parse(f"Dose>{number}")
    assert IndexQuery.parse(f'Dose="{number}"').conditions[0].kind == "text"


def test_index_flattens_deep_fields_without_recursion() -> None:
    from dicomsync.index_query import flatten_fields

    deep: Any = {"leaf": 1}
    for _ in range(5000):  # the paths grow with the depth: 5,000 is past any recursion limit
        deep = {"a": [deep]}
    ((path, value),) = list(flatten_fields(deep))
    assert value == 1 and path.count("a{}") == 5000
    assert list(flatten_fields({"x": {"y": [1, {"z": 2}], "w": None}, "v": "t"})) == [
        ("x.y{}", 1),
        ("x.y{}.z", 2),
        ("v", "t"),
    ]


# --- in a real Orthanc with the plugin ----------------------------------------------------------
@pytest.mark.orthanc
def test_plugin_lane_indexes_reports_nested_1000_deep(tmp_path: Path) -> None:
    """Reports nested 1,000 deep reach Orthanc by C-STORE (Orthanc 1.10's own REST upload
    dies on about 60 levels, without any plugin: see the report) and are indexed by the
    sink's lane with the marker, beside a real report; the lane keeps running. (Orthanc
    stores what it receives with defined lengths, so the undefined-length variant is
    indexed too.)"""
    import subprocess

    from dicomsync.sinks.sqlite_index import SqliteIndex

    from plugin_helpers import plugin_orthanc, status, wait_for

    files = [tmp_path / "deep.dcm", tmp_path / "deep_undefined.dcm"]
    files[0].write_bytes(deep_report(1000, event_first=True))
    files[1].write_bytes(deep_report(1000, undefined=True, event_first=True))
    real = data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm")
    state = tmp_path / "state"
    a = plugin_orthanc(
        tmp_path / "a",
        "a",
        {},
        [],
        sync={
            "Sinks": {"local": {"Kind": "sqlite_index", "Path": "index.sqlite"}},
            "StateDirectory": str(state),
        },
    ).start()
    try:
        for path in (*files, real):
            subprocess.run(
                ["storescu", "-aec", "A", "127.0.0.1", str(a.dicom_port), str(path)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        assert int(a.get("/statistics")["CountInstances"]) == 3

        def settled() -> dict[str, Any] | None:
            s = status(a)["Sinks"]["local"]
            done = s["Done"] + s["Failed"] == 3 and s["Queued"] == s["Sending"] == 0
            return s if done else None

        sink = wait_for(settled, what="the three instances handled")
        assert (sink["State"], sink["Error"], sink["Done"], sink["Failed"]) == (
            "running",
            None,
            3,
            0,
        ), sink
    finally:
        a.stop()
    assert "Traceback" not in a.log_text()
    index = SqliteIndex("check", state / "index.sqlite")
    try:
        for path in files:
            sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)  # dcmread: too deep
            report = index.event(f"{sop}:dose_report")
            assert report is not None, path.name
            body = report["event"]["X-Ray Radiation Dose Report"]["CT Acquisition"]
            n, last = levels(body, "Level")
            assert n == sr.MAX_DEPTH and "@invalid" in last, path.name  # 1 is the event
        real_sop = str(pydicom.dcmread(real, stop_before_pixels=True).SOPInstanceUID)
        assert index.event(f"{real_sop}:dose_report") is not None
        assert sum(index.stats()["events"].values()) == 2 * 3 + 2 + 4
    finally:
        index.close()
