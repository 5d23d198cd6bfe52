"""``dicom_root``: DICOM files under ``root/<patient>/<study>/**``.

A study is every regular file below its study folder, at any depth. Files keep their
relative paths when a study is sent folder→folder, so no subfolder is dropped.
Hidden files and our partial writes (names starting with ``.``), ``DICOMDIR`` and
anything that is not a regular file (FIFOs, devices, sockets: skipped with one
warning, never opened) are ignored.

A study is received the way a zip is: whole or not at all. Under an exclusive lock on
the patient folder, a hidden staging folder ``.<study>.<host>~<pid>~<random>.partial``
is filled beside the study folder, then renamed to it. When the study folder already
exists (late instances), the staging folder gets hard links to every file it has plus
the new instances, and the two folders are exchanged atomically
(``renameat2(RENAME_EXCHANGE)``). Where the file system cannot exchange, the old folder
is first renamed aside to ``.<study>.<host>~<pid>~<tag>.retired``; a writer killed
between the two renames leaves no study folder, and the next write to that patient
folder renames the retired folder back (it holds everything the study had); retired
folders are never deleted while their study folder is missing. So a
partial study never looks complete and ``holds`` never counts a partial batch.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import shutil
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

from dicomsync.errors import NotFound
from dicomsync.header_cache import CachedHeader
from dicomsync.identity import StudyIdentity, contained_path, safe_component
from dicomsync.places.base import Instance, Receipt, StudyRef
from dicomsync.places.local import (
    EMPTY_SCAN,
    Member,
    NotRegularFile,
    RootPlace,
    Scan,
    is_hidden,
    locked,
    open_regular,
    parse_partial,
    partial_dir,
    retired_name,
    retired_tag,
    scan_members,
    storage_errors,
    sweep_partials,
    writer_dead,
)

log = logging.getLogger(__name__)

SKIP_NAMES = {"DICOMDIR"}


class DicomRoot(RootPlace):
    kind = "dicom_root"
    label = "Root folder"

    def describe(self) -> str:
        return f"Root folder at '{self.root}'"

    def _study_name(self, entry: os.DirEntry[str]) -> str | None:
        try:
            if is_hidden(entry.name) or not entry.is_dir():
                return None
        except OSError:
            return None
        return entry.name

    def _members(self, folder: Path) -> Iterator[Member]:
        def unlisted(exc: OSError) -> None:
            log.warning("cannot list %s: %s", exc.filename, exc.strerror or exc)

        for dirpath, dirnames, filenames in os.walk(folder, onerror=unlisted):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if is_hidden(name) or name in SKIP_NAMES:
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError as exc:
                    self.warn(("stat", full), "skipping unreadable file %s: %s", full, exc.strerror)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self.warn(
                        ("special", full, st.st_mode),
                        "skipping %s: not a regular file",
                        full,
                    )
                    continue
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                yield Member(rel, st.st_size, st.st_mtime_ns, functools.partial(open_regular, full))

    def _folder(self, ref: StudyRef) -> Path:
        return self.root / ref.patient / ref.study

    def scan(self, ref: StudyRef) -> Scan:
        folder = self._folder(ref)
        if not folder.is_dir():
            return EMPTY_SCAN
        return scan_members(str(folder), self._members(folder), self.cache, self.warn)

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        folder = self._folder(ref)
        if not folder.is_dir():
            raise NotFound(f"{ref}: no such study folder {folder}")
        scan = self._scan_for(ref)
        for sop, rel in sorted(scan.files.items(), key=lambda kv: kv[1]):
            if only is not None and sop not in only:
                continue
            path = folder / rel
            yield Instance(sop, rel, functools.partial(_read_file, path), path=path)

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        self._check_root()
        ref = self.dest_ref(key)
        with storage_errors(f"{self.root / ref.patient / ref.study}"):
            patient = contained_path(self.root, ref.patient)
            folder = contained_path(patient, ref.study)
            patient.mkdir(parents=True, exist_ok=True)
            # One writer per patient folder at a time (a plugin route and a CLI send may
            # meet here): the exchange below would otherwise drop the other's instances.
            with locked(patient):
                written = self._stage_and_swap(key, ref, patient, folder, instances, identity)
        if written:
            self.cache.store(str(folder), written)
        self._scans.pop(ref.key, None)
        return Receipt(len(written), str(folder))

    def _stage_and_swap(
        self,
        key: str,
        ref: StudyRef,
        patient: Path,
        folder: Path,
        instances: Iterable[Instance],
        identity: StudyIdentity,
    ) -> list[CachedHeader]:
        _settle_retired(patient, folder)
        sweep_partials(patient)
        exists = folder.is_dir()
        if exists:
            sweep_partials(folder, recursive=True)  # per-file partials of older versions
        elif os.path.lexists(folder):
            raise NotRegularFile(errno.ENOTDIR, "exists and is not a folder", str(folder))
        old = self.scan(ref) if exists else EMPTY_SCAN
        self.check_same_study(key, old, identity)
        present = set(old.files)
        staging = partial_dir(folder)
        try:
            if exists:
                _link_tree(folder, staging)
            written: list[CachedHeader] = []
            for inst in instances:
                if inst.sop_uid in present:  # another writer added it since holds()
                    continue
                target = _free_name(staging, inst)
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_new(target, inst.read())
                st = target.stat()
                present.add(inst.sop_uid)
                written.append(
                    CachedHeader(
                        target.relative_to(staging).as_posix(),
                        st.st_size,
                        st.st_mtime_ns,
                        inst.sop_uid,
                        identity.study_uid,
                        identity.patient_id,
                        None,
                    )
                )
            if not written:
                shutil.rmtree(staging, ignore_errors=True)
                return written
            if exists:
                _swap(staging, folder)
                shutil.rmtree(staging, ignore_errors=True)  # now the old folder
            else:
                os.rename(staging, folder)
        except BaseException:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return written


def _free_name(staging: Path, inst: Instance) -> Path:
    """The path in ``staging`` for ``inst``: its own relative path, made safe, unless taken
    (or a skipped name), then ``<SOP UID>.dcm``, then ``<SOP UID>~<n>.dcm``."""
    parts = [safe_component(p) for p in inst.name.split("/") if p not in ("", ".")]
    if parts and parts[-1] not in SKIP_NAMES:
        target = contained_path(staging, *parts)
        if not os.path.lexists(target) and not _under_file(staging, parts):
            return target
    base = safe_component(inst.sop_uid)
    target = staging / f"{base}.dcm"
    n = 1
    while os.path.lexists(target):
        target = staging / f"{base}~{n}.dcm"
        n += 1
    return target


def _under_file(staging: Path, parts: list[str]) -> bool:
    """Whether a parent of ``parts`` in ``staging`` exists and is not a folder."""
    here = staging
    for p in parts[:-1]:
        here = here / p
        if os.path.lexists(here) and not here.is_dir():
            return True
    return False


def _link_tree(src: Path, dst: Path) -> None:
    """Fill ``dst`` with hard links to everything below ``src`` (copies where a link fails).

    Links keep size and mtime, so the header cache stays valid for every old file."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        here = dst if rel == "." else dst / rel
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                (here / d).mkdir(exist_ok=True)
        entries = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in entries:
            m = parse_partial(name)
            if m is not None and writer_dead(m):
                continue
            s, t = os.path.join(dirpath, name), here / name
            try:
                os.link(s, t, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                    raise
                if os.path.islink(s):
                    os.symlink(os.readlink(s), t)
                elif stat.S_ISREG(os.lstat(s).st_mode):
                    shutil.copy2(s, t)
                else:
                    log.warning("not keeping %s: not a regular file", s)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc ≥ 2.28
        return None
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder``, and the old ``folder`` at ``staging``."""
    if _exchange(staging, folder):
        return
    retired = retired_name(folder)
    os.rename(folder, retired)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(retired, folder)
        raise
    os.rename(retired, staging)


def _settle_retired(patient: Path, folder: Path) -> None:
    """Finish the swaps that dead writers left half done in ``patient``: a retired folder
    whose study folder is missing holds that study and is renamed back; one whose study
    folder exists was replaced already and is removed. One whose study can't be told (a
    cut name, and that study not here to compare) is left for that study's next write."""
    for path in sorted(patient.glob(".*.retired")):
        m = parse_partial(path.name)
        if m is None or not writer_dead(m):
            continue
        original = _original_of(patient, m["target"], m["rand"], folder.name)
        if original is None:
            continue
        if os.path.lexists(original):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, original)
            log.info("restored %s from %s, left by a write that was interrupted", original, path)


def _original_of(patient: Path, cut: str, tag: str, hint: str) -> Path | None:
    names = [hint, cut]
    with os.scandir(patient) as entries:
        names += [e.name for e in entries if e.name.startswith(cut) and not is_hidden(e.name)]
    for name in names:
        if name.startswith(cut) and retired_tag(name) == tag:
            return patient / name
    return None


def _write_new(target: Path, data: bytes) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None
