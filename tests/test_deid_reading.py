"""``deid.reading.read_header`` reads what ``dcmread(stop_before_pixels=True)`` reads.

Checked on every file of the test data (vendor dose reports, images, charsets, the study
tree, the broken files) and on variants of one file that must leave the fast path:
whatever path a file takes, the elements, their raw values, the stop offset, the file
meta's SOP and syntax UIDs and the encoding are the same as pydicom's own.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest

from dicomsync.deid import reading

from dicomdata import data


def files() -> list[Path]:
    found = sorted(data().rglob("*.dcm")) + sorted(data("study_tree_pcir").rglob("*"))
    return [p for p in found if p.is_file() and p.name != "DICOMDIR"]


def same_as_pydicom(raw: bytes) -> None:
    fp = io.BytesIO(raw)
    try:
        theirs = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
    except Exception as exc:  # pydicom cannot read it: neither may we
        with pytest.raises(type(exc)):
            reading.read_header(raw)
        return
    stop = fp.tell()
    ours, where = reading.read_header(raw)
    assert where == stop
    assert list(ours.keys()) == list(theirs.keys())
    for tag in theirs.keys():
        a, b = ours[tag], theirs[tag]
        assert (a.VR, a.value) == (b.VR, b.value), tag
    assert ours.original_encoding == theirs.original_encoding
    for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        assert str(ours.file_meta.get(keyword, "")) == str(theirs.file_meta.get(keyword, ""))


def test_every_test_file_reads_as_pydicom_reads_it() -> None:
    fast = 0
    checked = files()
    assert len(checked) > 50
    for path in checked:
        raw = path.read_bytes()
        same_as_pydicom(raw)
        fast += reading._meta(raw) is not None
    assert fast > 40  # most files take the fast path


def _ct() -> bytes:
    return data("images", "CT_small.dcm").read_bytes()


def _meta_end(raw: bytes) -> int:
    return 144 + int.from_bytes(raw[140:144], "little")


@pytest.mark.parametrize(
    "variant",
    [
        "no-preamble",
        "no-group-length",
        "big-endian",
        "truncated-meta",
        "huge-meta-length",
        "meta-element-too-long",
        "command-set",
        "empty-data-set",
    ],
)
def test_files_off_the_fast_path_read_as_pydicom_reads_them(variant: str) -> None:
    raw = _ct()
    end = _meta_end(raw)
    if variant == "big-endian":  # the data set's bytes are then read as big endian
        syntax = b"1.2.840.10008.1.2.1\0"
        assert syntax in raw[:end]
        raw = raw.replace(syntax, b"1.2.840.10008.1.2.2\0", 1)
    elif variant == "no-preamble":
        raw = raw[132:]
    elif variant == "no-group-length":
        raw = raw[:132] + raw[144:]
    elif variant == "truncated-meta":
        raw = raw[: end - 3]
    elif variant == "huge-meta-length":
        raw = raw[:140] + struct.pack("<I", 0xFFFFFFF0) + raw[144:]
    elif variant == "meta-element-too-long":  # its length runs past the group's end
        second = 144 + 12 + int.from_bytes(raw[152:156], "little")  # after (0002,0001) OB
        assert raw[second : second + 6] == b"\x02\x00\x02\x00UI"
        raw = raw[: second + 6] + struct.pack("<H", 0xFFF0) + raw[second + 8 :]
    elif variant == "command-set":
        command = struct.pack("<HHI", 0x0000, 0x0002, 4) + b"1.2\0"  # (0000,0002) UI, implicit
        raw = raw[:end] + command + raw[end:]
    elif variant == "empty-data-set":
        raw = raw[:end]
    assert reading._meta(raw) is None
    same_as_pydicom(raw)
