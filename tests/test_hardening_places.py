"""Issue 9, the folder places: keys that never merge two studies, names in bytes,
regular files only, full and read-only disks, whole-or-nothing receives, bounded memory.

Every test that could hang on a FIFO runs its operation under ``within`` (a thread with
a timeout), so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom.uid import generate_uid
from test_send import make_study, places
from test_walkthrough import sop_uids_in_folder, sop_uids_in_zip

from dicomsync.config import build_place
from dicomsync.errors import ConfigError, RemoteRejected, StorageError
from dicomsync.header_cache import HeaderCache
from dicomsync.identity import StudyIdentity, read_header, safe_component
from dicomsync.places import dicom_root as dicom_root_module
from dicomsync.places import local
from dicomsync.places.base import Instance, Place, StudyRef
from dicomsync.places.dicom_root import DicomRoot
from dicomsync.places.local import RootPlace, WarnOnce, partial_file, sweep_partials
from dicomsync.places.zipped_root import ZippedRoot
from dicomsync.query import StudyQuery
from dicomsync.transfer import send_study

from conftest import Cli
from dicomdata import make_instance

T = TypeVar("T")
KINDS = ["zipped_root", "dicom_root"]


def within(seconds: float, fn: Callable[[], T], unblock: Iterable[Path] = ()) -> T:
    """``fn()`` in a thread; fails the test if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for fifo in unblock:  # let a reader blocked on a FIFO go (it then reads EOF)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"still running after {seconds}s (blocked on a FIFO?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def dest_place(kind: str, root: Path) -> RootPlace:
    root.mkdir(parents=True, exist_ok=True)
    return ZippedRoot("dst", root) if kind == "zipped_root" else DicomRoot("dst", root)


def stored_uids(kind: str, root: Path, patient: str, study: str) -> set[str]:
    if kind == "zipped_root":
        path = root / patient / f"{study}.zip"
        return sop_uids_in_zip(path) if path.exists() else set()
    folder = root / patient / study
    return sop_uids_in_folder(folder) if folder.exists() else set()


def visible_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


class MemorySource(Place):
    """A source whose keys are anything (as an Orthanc or XNAT source's may be)."""

    kind = "memory"
    label = "memory"

    def __init__(self, studies: Mapping[str, list[bytes]]) -> None:
        super().__init__("mem")
        self._studies = dict(studies)

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return "memory"

    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        for key in self._studies:
            patient, study = key.split("/", 1)
            yield StudyRef(self.key, patient, study)

    def identity(self, ref: StudyRef) -> StudyIdentity:
        headers = [read_header(b) for b in self._studies[ref.key]]
        return StudyIdentity(
            headers[0].study_uid, frozenset(h.sop_uid for h in headers), headers[0].patient_id
        )

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        for i, data in enumerate(self._studies[ref.key]):
            sop = read_header(data).sop_uid
            if only is None or sop in only:
                yield Instance(sop, f"im{i}.dcm", functools.partial(bytes, data))


def dicom_bytes(tmp_path: Path, n: int, patient: str = "P") -> list[bytes]:
    study_uid = generate_uid()
    out = []
    for i in range(n):
        path = tmp_path / f"tmp_{generate_uid()}.dcm"
        make_instance(path, patient_id=patient, study_uid=study_uid)
        out.append(path.read_bytes())
        path.unlink()
        del i
    return out


def send_all(source: Place, dest: Place) -> list[str]:
    return [send_study(source, ref, dest).status for ref in source.studies()]


# --- 2: a destination key never holds two different studies -----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keys_that_look_alike_stay_apart(tmp_path: Path, cli: Cli, kind: str) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), (kind, "dst"))
    variants = ["pat:1", "pat_1", "pat*1", "pat?1", "pat\\1", "pat|1", " pat_1", "pat_1 "]
    uids = {p: make_study(tmp_path / "src" / p / "s1", 2, patient=p) for p in variants}
    out = cli("send", "src:*", "dst").output
    assert out.splitlines()[-1].startswith(f"{len(variants)} sent, 0 duplicate, 0 failed"), out
    names = {p: safe_component(p) for p in variants}
    assert len(set(names.values())) == len(variants)
    assert names["pat_1"] == "pat_1"  # a name that needs no change is kept
    for p in variants:
        assert stored_uids(kind, tmp_path / "dst", names[p], "s1") == uids[p], p
    again = cli("send", "src:*", "dst").output
    assert again.splitlines()[-1].startswith(f"0 sent, {len(variants)} duplicate, 0 failed")


@pytest.mark.parametrize("kind", KINDS)
def test_member_names_that_look_alike_stay_apart(tmp_path: Path, kind: str) -> None:
    """Names inside a study go through safe_component too: a:b and a_b are two files."""
    blobs = dicom_bytes(tmp_path, 3)
    names = ["a:b.dcm", "a_b.dcm", "a*b.dcm"]

    class Named(MemorySource):
        def instances(
            self, ref: StudyRef, only: Collection[str] | None = None
        ) -> Iterator[Instance]:
            for name, data in zip(names, blobs, strict=True):
                yield Instance(read_header(data).sop_uid, name, functools.partial(bytes, data))

    src = Named({"p/s": blobs})
    dest = dest_place(kind, tmp_path / "dst")
    assert send_all(src, dest) == ["sent"]
    if kind == "zipped_root":
        with zipfile.ZipFile(tmp_path / "dst" / "p" / "s.zip") as zf:
            members = sorted(zf.namelist())
    else:
        members = sorted(p.name for p in (tmp_path / "dst" / "p" / "s").iterdir())
    assert members == sorted(safe_component(n) for n in names)
    assert len(set(members)) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_key_holding_another_study_fails_the_study(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A value that imitates a hashed name meets the value it imitates: refused, not merged."""
    imitation = safe_component("pat:1")  # "pat_1~20544540", a legal PatientID by itself
    assert imitation != "pat:1" and "~" in imitation
    first = dicom_bytes(tmp_path, 2, patient="A")
    second = dicom_bytes(tmp_path, 3, patient="B")
    dest = dest_place(kind, tmp_path / "dst")
    src = MemorySource({f"{imitation}/s1": first, "pat:1/s1": second})
    ref_a, ref_b = list(src.studies())
    assert send_study(src, ref_a, dest).status == "sent"
    before = visible_files(tmp_path / "dst")
    outcome = send_study(src, ref_b, dest)
    assert outcome.status == "failed" and not outcome.retryable
    assert outcome.error is not None and "holds another study" in outcome.error
    assert "\n" not in outcome.error
    assert visible_files(tmp_path / "dst") == before
    assert stored_uids(kind, tmp_path / "dst", imitation, "s1") == {
        read_header(b).sop_uid for b in first
    }
    # receive refuses too (a caller that skips holds, or a writer that came in between)
    with pytest.raises(RemoteRejected, match="holds another study"):
        dest.receive(ref_b.key, src.instances(ref_b), src.identity(ref_b))
    assert visible_files(tmp_path / "dst") == before
    # and the study that is there is still a duplicate of itself
    assert send_study(src, ref_a, dest).status == "duplicate"
    assert not [r for r in caplog.records if r.exc_info]


# --- 3: names are limited in bytes --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("char", ["\U0001f600", "\u6f22", "é", "x"])
def test_long_multibyte_keys_are_stored(tmp_path: Path, kind: str, char: str) -> None:
    """A legal 64-character PatientID of 4-byte characters is a 256-byte name: cut, hashed."""
    patient = char * 64
    study = char * 64 + "." + "9" * 60
    src = MemorySource({f"{patient}/{study}": dicom_bytes(tmp_path, 2)})
    dest = dest_place(kind, tmp_path / "dst")
    assert send_all(src, dest) == ["sent"]
    assert send_all(src, dest) == ["duplicate"]
    for p in (tmp_path / "dst").rglob("*"):
        assert len(os.fsencode(p.name)) <= 255
    assert len(visible_files(tmp_path / "dst")) == (1 if kind == "zipped_root" else 2)


def test_partial_names_fit_255_bytes_and_are_still_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_HOST", "h" * 64)
    target = tmp_path / ("\U0001f600" * 62 + ".zip")  # 252 bytes, the longest we make
    assert len(os.fsencode(target.name)) <= 255
    fd, path = partial_file(target)
    os.close(fd)
    assert len(os.fsencode(Path(path).name)) <= 255
    staging = local.partial_dir(target)
    assert len(os.fsencode(staging.name)) <= 255
    m = local.parse_partial(Path(path).name)
    assert m is not None and m["host"] == "h" * 64 and int(m["pid"]) == os.getpid()
    monkeypatch.setattr(local, "_pid_alive", lambda pid: False)  # as if this writer died
    assert sweep_partials(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_dotted_hostname_still_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = local.host_tag("node1.example.org")
    assert host == "node1_example_org"
    monkeypatch.setattr(local, "_HOST", host)
    fd, path = partial_file(tmp_path / "s.zip")
    os.close(fd)
    m = local.parse_partial(Path(path).name)
    assert m is not None and m["host"] == host and m["target"] == "s.zip"


# --- 4: characters that change how a name is displayed ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_display_changing_characters_never_reach_the_disk(tmp_path: Path, kind: str) -> None:
    keys = ["abc\u202egpj.exe/s", "a\u0085b/s", "l\u2028ine/p\u2029ara", "z\u200bw/s\ufeff"]
    src = MemorySource({k: dicom_bytes(tmp_path, 1) for k in keys})
    dest = dest_place(kind, tmp_path / "dst")
    assert send_all(src, dest) == ["sent"] * len(keys)
    import unicodedata

    for p in (tmp_path / "dst").rglob("*"):
        assert all(unicodedata.category(c) not in {"Cc", "Cf", "Zl", "Zp", "Cs"} for c in p.name), (
            p.name
        )


# --- 5: only regular files are read ------------------------------------------------------


def test_fifo_in_a_dicom_root_source_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uids = make_study(tmp_path / "src" / "p" / "s", 2)
    fifo = tmp_path / "src" / "p" / "s" / "pipe.dcm"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "src" / "p" / "s" / "link_to_pipe.dcm")
    src = DicomRoot("src", tmp_path / "src")
    dest = dest_place("zipped_root", tmp_path / "dst")
    caplog.set_level(logging.WARNING)
    refs = within(10, lambda: list(src.studies()), [fifo])
    assert within(10, lambda: send_study(src, refs[0], dest).status, [fifo]) == "sent"
    assert sop_uids_in_zip(tmp_path / "dst" / "p" / "s.zip") == uids
    special = [r.getMessage() for r in caplog.records if "not a regular file" in r.getMessage()]
    assert len(special) == 2 and all("\n" not in m for m in special), special
    # A second look in the same run says nothing new.
    within(10, lambda: src.identity(refs[0]), [fifo])
    assert len([r for r in caplog.records if "not a regular file" in r.getMessage()]) == 2


def test_fifo_in_a_dicom_root_destination_is_not_opened(tmp_path: Path) -> None:
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 3)
    dest = dest_place("dicom_root", tmp_path / "dst")
    (tmp_path / "dst" / "p" / "s").mkdir(parents=True)
    fifo = tmp_path / "dst" / "p" / "s" / "im0.dcm"  # the name the first instance wants
    os.mkfifo(fifo)
    ref = next(src.studies())
    assert within(10, lambda: send_study(src, ref, dest).status, [fifo]) == "sent"
    assert within(10, lambda: sop_uids_in_folder(tmp_path / "dst" / "p" / "s"), [fifo]) == uids
    assert within(10, lambda: send_study(src, ref, dest).status, [fifo]) == "duplicate"


def test_fifo_named_like_a_zip_is_never_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "zips" / "p").mkdir(parents=True)
    fifo = tmp_path / "zips" / "p" / "s.zip"
    os.mkfifo(fifo)
    zips = ZippedRoot("zips", tmp_path / "zips")
    caplog.set_level(logging.WARNING)
    assert within(10, lambda: list(zips.studies()), [fifo]) == []
    assert any("not a regular file" in r.getMessage() for r in caplog.records)
    # As a destination: holds says nothing is there, receive refuses to replace it.
    src = DicomRoot("src", tmp_path / "src")
    make_study(tmp_path / "src" / "p" / "s", 1)
    ref = next(src.studies())
    outcome = within(10, lambda: send_study(src, ref, zips), [fifo])
    assert outcome.status == "failed" and "not a regular file" in (outcome.error or "")
    assert fifo.is_fifo()
    ref_direct = StudyRef("zips", "p", "s")
    assert within(10, lambda: zips.identity(ref_direct), [fifo]).sop_uids == frozenset()


# --- 8: full disk, read-only, nothing counts as done until whole ---------------------------


def _fail_writes_after(monkeypatch: pytest.MonkeyPatch, n_bytes: int, err: int) -> None:
    """Make every file write fail with ``err`` once ``n_bytes`` have been written."""
    written = {"n": 0}
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if written["n"] + len(data) > n_bytes:
            raise OSError(err, os.strerror(err))
        written["n"] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    real_writestr = zipfile.ZipFile.writestr

    def writestr(self: zipfile.ZipFile, name: Any, data: Any, *a: Any, **k: Any) -> None:
        if written["n"] + len(data) > n_bytes:
            raise OSError(err, os.strerror(err))
        written["n"] += len(data)
        real_writestr(self, name, data, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_full_disk_is_retryable_and_leaves_nothing(
    tmp_path: Path,
    kind: str,
    err: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 14)
    dest = dest_place(kind, tmp_path / "dst")
    ref = next(src.studies())
    one = len(next(src.instances(ref)).read())
    with monkeypatch.context() as m:
        _fail_writes_after(m, 9 * one, err)
        outcomes = [send_study(src, ref, dest) for _ in range(3)]
    for o in outcomes:
        assert o.status == "failed" and o.retryable, o
        assert o.error is not None and os.strerror(err) in o.error and "\n" not in o.error
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert visible_files(tmp_path / "dst") == []  # not 9 of 14
    assert dest.holds(ref.key, src.identity(ref)) == frozenset()
    assert send_study(src, ref, dest).status == "sent"
    assert stored_uids(kind, tmp_path / "dst", "p", "s") == uids
    assert hidden_entries(tmp_path / "dst") == []


@pytest.mark.parametrize("kind", KINDS)
def test_late_instances_appear_all_at_once(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 6)
    dest = dest_place(kind, tmp_path / "dst")
    ref = next(src.studies())
    ident = src.identity(ref)
    first = sorted(uids)[:3]
    dest.receive(ref.key, src.instances(ref, only=first), ident)
    assert dest.holds(ref.key, ident) == set(first)
    one = len(next(src.instances(ref)).read())
    with monkeypatch.context() as m:
        _fail_writes_after(m, one + one // 2, errno.ENOSPC)  # the 2nd new instance fails
        outcome = send_study(src, ref, dest, identity=ident)
    assert outcome.status == "failed" and outcome.retryable
    assert dest.holds(ref.key, ident) == set(first)  # not 4 of 6
    assert stored_uids(kind, tmp_path / "dst", "p", "s") == set(first)
    assert send_study(src, ref, dest).status == "sent"
    assert stored_uids(kind, tmp_path / "dst", "p", "s") == uids
    assert hidden_entries(tmp_path / "dst") == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("err", "retryable"),
    [
        (errno.EROFS, True),
        (errno.EACCES, True),
        (errno.EPERM, True),
        (errno.ENAMETOOLONG, False),
        (errno.EINVAL, False),
    ],
)
def test_every_oserror_of_a_receive_is_translated(
    tmp_path: Path,
    kind: str,
    err: int,
    retryable: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only folder (simulated: tests run as root, where chmod stops nothing)."""
    src = DicomRoot("src", tmp_path / "src")
    make_study(tmp_path / "src" / "p" / "s", 2)
    dest = dest_place(kind, tmp_path / "dst")
    ref = next(src.studies())

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err), str(args[0]) if args else None)

    import tempfile

    calls = [(Path, "mkdir"), (os, "open")]
    if kind == "zipped_root":
        calls += [(tempfile, "mkstemp"), (os, "replace")]
    else:
        calls += [(tempfile, "mkdtemp"), (os, "rename")]
    for owner, name in calls:
        with monkeypatch.context() as m:
            m.setattr(owner, name, refuse)
            outcome = send_study(src, ref, dest)
        assert outcome.status == "failed", (name, outcome)
        assert outcome.retryable is retryable, (name, outcome)
        assert outcome.error and outcome.error.startswith("cannot write"), (name, outcome)
        assert os.strerror(err) in outcome.error
    expected = StorageError if retryable else RemoteRejected
    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", refuse)
        with pytest.raises(expected):
            dest.receive(ref.key, src.instances(ref), src.identity(ref))
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert visible_files(tmp_path / "dst") == []


@pytest.mark.parametrize(("err", "status"), [(errno.ENOSPC, "failed"), (errno.EPERM, "sent")])
def test_late_batch_when_hard_links_fail(
    tmp_path: Path, err: int, status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late batch links the old files into the staging folder: a full disk fails it (and
    keeps the old files); a file system without hard links gets copies."""
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 3)
    dest = dest_place("dicom_root", tmp_path / "dst")
    ref = next(src.studies())
    first = sorted(uids)[:1]
    dest.receive(ref.key, src.instances(ref, only=first), src.identity(ref))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    with monkeypatch.context() as m:
        m.setattr(os, "link", refuse)
        outcome = send_study(src, ref, dest)
    assert outcome.status == status, outcome
    assert outcome.retryable is (status == "failed")
    want = set(first) if status == "failed" else uids
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / "s") == want
    assert hidden_entries(tmp_path / "dst") == []


@pytest.mark.parametrize("name", ["s", "x" * 240])  # 240: cut inside the retired name
def test_swap_without_exchange_and_a_writer_killed_between_renames(
    tmp_path: Path, name: str
) -> None:
    """Where the file system can't exchange, a kill -9 between the two renames loses nothing."""
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / name, 4)
    dest = dest_place("dicom_root", tmp_path / "dst")
    ref = next(src.studies())
    first = sorted(uids)[:2]
    dest.receive(ref.key, src.instances(ref, only=first), src.identity(ref))
    code = """
import os, sys
from pathlib import Path
from dicomsync.places import dicom_root
from dicomsync.places.dicom_root import DicomRoot
dicom_root._renameat2 = None
real = os.rename
def rename(a, b):
    real(a, b)
    if str(b).endswith(".retired"):
        os._exit(9)  # killed between the two renames
os.rename = rename
src, dst = DicomRoot("src", Path(sys.argv[1])), DicomRoot("dst", Path(sys.argv[2]))
ref = next(src.studies())
dst.receive(ref.key, src.instances(ref), src.identity(ref))
"""
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 9, child.stderr
    assert not (tmp_path / "dst" / "p" / name).exists()  # the window: no study folder
    assert [p.suffix for p in (tmp_path / "dst" / "p").iterdir()] != []
    # The next write to that patient folder, even for another study, restores what the
    # study had; nothing of it is swept away as a dead writer's leftover.
    other = make_study(tmp_path / "src" / "p" / "t", 1)
    fresh = DicomRoot("dst", tmp_path / "dst")
    ref_t = next(r for r in src.studies() if r.study == "t")
    assert send_study(src, ref_t, fresh).status == "sent"
    if len(name) < 100:
        assert sop_uids_in_folder(tmp_path / "dst" / "p" / name) == set(first)
    else:  # its name was cut in the retired name: kept for its own next write
        assert [p.suffix for p in (tmp_path / "dst" / "p").glob(".*")] == [".retired"]
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / "t") == other
    # Then the study itself gets what is missing.
    assert send_study(src, ref, fresh).status == "sent"
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / name) == uids
    assert hidden_entries(tmp_path / "dst") == []


def test_swap_without_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom_root_module, "_renameat2", None)
    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 4, subfolders=True)
    dest = dest_place("dicom_root", tmp_path / "dst")
    ref = next(src.studies())
    dest.receive(ref.key, src.instances(ref, only=sorted(uids)[:1]), src.identity(ref))
    assert send_study(src, ref, dest).status == "sent"
    assert sop_uids_in_folder(tmp_path / "dst" / "p" / "s") == uids
    assert hidden_entries(tmp_path / "dst") == []


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_writers_to_one_study_keep_both(tmp_path: Path, kind: str) -> None:
    """Two writers (separate place objects, as two processes) add halves of one study."""
    import time

    src = DicomRoot("src", tmp_path / "src")
    uids = make_study(tmp_path / "src" / "p" / "s", 8, subfolders=True)
    (tmp_path / "dst").mkdir()
    ref = next(src.studies())
    ident = src.identity(ref)
    insts = list(src.instances(ref))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(part: list[Instance]) -> None:
        dest = dest_place(kind, tmp_path / "dst")

        def slow() -> Iterator[Instance]:
            for inst in part:
                time.sleep(0.03)  # keep both writes in flight at once
                yield inst

        barrier.wait()
        try:
            dest.receive(ref.key, slow(), ident)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(insts[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert stored_uids(kind, tmp_path / "dst", "p", "s") == uids
    assert hidden_entries(tmp_path / "dst") == []


# --- 10: a Path that is a file ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_path_that_is_a_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError) as err:
        build_place("x", {"Kind": kind, "Path": str(tmp_path / "afile")}, tmp_path)
    assert "not a folder" in str(err.value) and "\n" not in str(err.value)
    build_place("x", {"Kind": kind, "Path": str(tmp_path / "not-yet")}, tmp_path)  # allowed


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_path_is_reported_when_the_config_is_read(
    tmp_path: Path, cli: Cli, kind: str
) -> None:
    """A Path that became a file after ``place add``: every command says so, in one line."""
    cli("init")
    (tmp_path / "later").mkdir()
    cli("place", "add", kind, "x", str(tmp_path / "later"))
    (tmp_path / "later").rmdir()
    (tmp_path / "later").write_text("x")
    assert "exists but is not a folder" in cli("place", "list").output
    result = cli("place", "ls", "x", ok=False)
    assert result.exit_code != 0
    assert "exists but is not a folder" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# --- 12: unreadable files are named on every run -----------------------------------------


@pytest.mark.parametrize("kind", ["dicom_root", "zipped_root"])
def test_unreadable_files_are_named_on_every_run(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "src" / "p" / "s"
    make_study(folder, 1)
    (folder / "junk.dcm").write_bytes(b"not dicom at all" * 10)
    if kind == "zipped_root":
        with zipfile.ZipFile(tmp_path / "src" / "p" / "s.zip", "w") as zf:
            for f in folder.iterdir():
                zf.write(f, f.name)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    cache = HeaderCache(tmp_path / "cache.sqlite")
    caplog.set_level(logging.WARNING)
    for run in range(3):  # three runs, each a new place (as each CLI run is), one cache
        caplog.clear()
        place: RootPlace = (
            DicomRoot("src", tmp_path / "src", cache)
            if kind == "dicom_root"
            else ZippedRoot("src", tmp_path / "src", cache)
        )
        ref = next(place.studies())
        assert len(place.identity(ref)) == 1
        place.identity(ref)  # twice in one run: still one line
        lines = [r.getMessage() for r in caplog.records if "junk.dcm" in r.getMessage()]
        assert len(lines) == 1, (run, lines)


def test_unreadable_files_are_named_on_every_send(
    tmp_path: Path, cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "dst"))
    make_study(tmp_path / "src" / "p" / "s", 1)
    (tmp_path / "src" / "p" / "s" / "junk.dcm").write_bytes(b"junk")
    caplog.set_level(logging.WARNING)
    for run in range(2):
        caplog.clear()
        cli("send", "src:*", "dst")
        lines = [r.getMessage() for r in caplog.records if "junk.dcm" in r.getMessage()]
        assert len(lines) == 1, (run, lines)


# --- 17: bounded memory ------------------------------------------------------------------


def test_scans_stay_bounded_over_many_studies(tmp_path: Path) -> None:
    root = tmp_path / "dst"
    dest = DicomRoot("dst", root)
    root.mkdir()
    blob = dicom_bytes(tmp_path, 1)
    src = MemorySource({"p/s": blob})
    ref = next(src.studies())
    ident = src.identity(ref)
    for i in range(300):
        key = f"p{i % 7}/s{i}"
        dest.holds(key, ident)
        dest.receive(key, src.instances(ref), ident)
        dest.holds(key, ident)  # the verifying holds
        dest.identity(StudyRef("dst", f"p{i % 7}", f"s{i}"))
        assert len(dest._scans) <= dest.max_scans
    assert len(dest._scans) <= dest.max_scans
    assert len(dest.warn) <= dest.warn.size


def test_scans_stay_bounded_over_100000_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a long-running plugin worker does per routed study, 100,000 times (no disk)."""
    dest = DicomRoot("dst", tmp_path)
    scans = [
        local.Scan(
            StudyIdentity(f"1.2.{i}", frozenset({f"1.2.{i}.1"})), {f"1.2.{i}.1": "a"}, frozenset()
        )
        for i in range(50)
    ]
    monkeypatch.setattr(dest, "scan", lambda ref: scans[hash(ref.key) % 50])
    for i in range(100_000):
        ref = StudyRef("dst", "p", f"s{i}")
        ident = dest.identity(ref)
        dest.holds(ref.key, ident)
        dest.holds(ref.key, ident)
    assert len(dest._scans) <= dest.max_scans


def test_warn_once_is_bounded() -> None:
    w = WarnOnce(size=10)
    for i in range(1000):
        w(("k", i), "x %s", i)
    assert len(w) == 10


# --- 19: a bad zip is warned about once --------------------------------------------------


def test_a_bad_destination_zip_is_warned_about_once(
    tmp_path: Path, cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    uids = make_study(tmp_path / "src" / "p" / "s", 2)
    (tmp_path / "zips" / "p").mkdir()
    (tmp_path / "zips" / "p" / "s.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    caplog.set_level(logging.WARNING)
    cli("send", "src:*", "zips")
    lines = [r.getMessage() for r in caplog.records if "s.zip" in r.getMessage()]
    assert len(lines) == 1, lines
    assert sop_uids_in_zip(tmp_path / "zips" / "p" / "s.zip") == uids


def test_a_bad_source_zip_is_warned_about_once(
    tmp_path: Path, cli: Cli, caplog: pytest.LogCaptureFixture
) -> None:
    places(tmp_path, cli, ("zipped_root", "zips"), ("dicom_root", "dst"))
    (tmp_path / "zips" / "p").mkdir()
    (tmp_path / "zips" / "p" / "s.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    caplog.set_level(logging.WARNING)
    cli("send", "zips:*", "dst", ok=False)
    lines = [r.getMessage() for r in caplog.records if "s.zip" in r.getMessage()]
    assert len(lines) == 1, lines


# --- 8 again, on real file systems: a full tmpfs and a read-only bind mount ---------------


@contextlib.contextmanager
def mounted(*commands: list[str], at: Path) -> Iterator[Path]:
    """Run mount ``commands`` (skipping the test where mounting is not allowed), then unmount."""
    at.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for cmd in commands:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"cannot mount here ({' '.join(cmd)}: {r.stderr.strip()})")
            done += 1
        yield at
    finally:
        if done:
            r = subprocess.run(["umount", str(at)], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(at)], capture_output=True, timeout=30)


def big_study(folder: Path, n: int, size: int) -> set[str]:
    """``n`` instances of about ``size`` bytes of random (incompressible) pixel data."""
    study_uid = generate_uid()
    uids = set()
    for i in range(n):
        path = folder / f"im{i}.dcm"
        ds = make_instance(path, patient_id="P", study_uid=study_uid, pixel_bytes=size)
        ds.PixelData = os.urandom(len(ds.PixelData))
        ds.save_as(path)
        uids.add(str(ds.SOPInstanceUID))
    return uids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mounts")
@pytest.mark.parametrize("kind", KINDS)
def test_a_really_full_disk(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    uids = big_study(tmp_path / "src" / "p" / "s", 14, 16 * 1024)
    src = DicomRoot("src", tmp_path / "src")
    ref = next(src.studies())
    disk = tmp_path / "disk"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], at=disk):
        dest = dest_place(kind, disk)
        outcome = send_study(src, ref, dest)
        assert outcome.status == "failed" and outcome.retryable, outcome
        assert outcome.error and "No space left on device" in outcome.error
        assert visible_files(disk) == [] and hidden_entries(disk) == []
        assert dest.holds(ref.key, src.identity(ref)) == frozenset()
    assert not [r for r in caplog.records if r.exc_info]
    del uids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mounts")
@pytest.mark.parametrize("kind", KINDS)
def test_a_really_read_only_folder(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_study(tmp_path / "src" / "p" / "s", 3)
    src = DicomRoot("src", tmp_path / "src")
    ref = next(src.studies())
    backing = tmp_path / "backing"
    (backing / "p").mkdir(parents=True)  # the patient folder exists, as after a first send
    ro = tmp_path / "ro"
    with mounted(
        ["mount", "--bind", str(backing), str(ro)],
        ["mount", "-o", "remount,bind,ro", str(ro)],
        at=ro,
    ):
        dest = dest_place(kind, ro)
        for _ in range(3):
            outcome = send_study(src, ref, dest)
            assert outcome.status == "failed" and outcome.retryable, outcome
            assert outcome.error and "Read-only file system" in outcome.error
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert list(backing.rglob("*")) == [backing / "p"]


def _noisy_instance(path: Path, study_uid: str) -> bytes:
    """A ~3 MB instance of random pixels (deflate cannot shrink it), written to ``path``."""
    ds = make_instance(None, patient_id="P1", study_uid=study_uid, pixel_bytes=3_000_000)
    ds.PixelData = os.urandom(len(ds.PixelData))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_a_member_damaged_mid_copy_is_left_out_and_sent_again(tmp_path: Path, cli: Cli) -> None:
    """Late instances rewrite the zip. A member whose damage shows only at its end (a bad
    CRC after 1 MiB chunks were already copied) must not survive the rewrite truncated
    under a fresh CRC, nor take the members after it with it."""
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    study = tmp_path / "src" / "p" / "s"
    study_uid = generate_uid()
    originals = {
        name: _noisy_instance(study / name, study_uid) for name in ("a.dcm", "b.dcm", "c.dcm")
    }
    cli("send", "src:*", "zips")
    target = tmp_path / "zips" / "p" / "s.zip"
    with zipfile.ZipFile(target) as zf:
        info = zf.getinfo("b.dcm")
    raw = bytearray(target.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    data_start = info.header_offset + 30 + name_len + extra_len
    raw[data_start + info.compress_size * 3 // 4] ^= 0xFF  # past the header, before the end
    target.write_bytes(bytes(raw))
    originals["d.dcm"] = _noisy_instance(study / "d.dcm", study_uid)  # a late instance

    cli("send", "src:*", "zips", "--retries", "3")

    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == ["a.dcm", "b.dcm", "c.dcm", "d.dcm"]
        for name, data in originals.items():
            assert zf.read(name) == data, name
