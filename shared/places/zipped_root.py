"""``zipped_root``: one zip per study, ``root/<patient>/<study>.zip``.

A zip is always written whole to a temporary file beside it (``.<study>.zip.…partial``)
and renamed into place, so an interrupted send never leaves a zip that counts as
sent. A partial destination is completed by rewriting the zip with the members it
had plus the missing instances (the old members are copied compressed, not
re-read as DICOM). Member names keep the source's relative paths, each part made a
safe component. A ``<study>.zip`` that is not a regular file (a FIFO, a device) is
skipped with one warning and never opened; a send there fails that study.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from dicomsync.errors import NotFound
from dicomsync.header_cache import CachedHeader
from dicomsync.identity import StudyIdentity, contained_path, safe_component
from dicomsync.places.base import Instance, Receipt, StudyRef
from dicomsync.places.local import (
    EMPTY_SCAN,
    UNREADABLE_SCAN,
    Member,
    NotRegularFile,
    RootPlace,
    Scan,
    is_hidden,
    locked,
    open_regular,
    partial_file,
    scan_members,
    storage_errors,
    sweep_partials,
)

log = logging.getLogger(__name__)


class ZippedRoot(RootPlace):
    kind = "zipped_root"
    label = "Zipped DICOM Root folder"
    suffix = ".zip"

    def describe(self) -> str:
        return f"Zipped DICOM Root folder at '{self.root}'"

    def _study_name(self, entry: os.DirEntry[str]) -> str | None:
        if is_hidden(entry.name) or not entry.name.endswith(".zip"):
            return None
        try:
            st = entry.stat()
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            self.warn(
                ("special", entry.path, st.st_mode), "skipping %s: not a regular file", entry.path
            )
            return None
        return entry.name[: -len(".zip")]

    def _zip_path(self, ref: StudyRef) -> Path:
        return self.root / ref.patient / f"{ref.study}.zip"

    def scan(self, ref: StudyRef) -> Scan:
        path = self._zip_path(ref)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return EMPTY_SCAN
        except OSError as exc:
            self.warn(("zip", str(path)), "skipping unreadable zip %s: %s", path, exc.strerror)
            return UNREADABLE_SCAN
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                self.warn(
                    ("special", str(path), st.st_mode), "skipping %s: not a regular file", path
                )
            return EMPTY_SCAN
        try:
            with open_regular(path) as f, zipfile.ZipFile(f) as zf:
                members = [
                    Member(
                        i.filename,
                        st.st_size,
                        st.st_mtime_ns,
                        functools.partial(zf.open, i.filename),
                    )
                    for i in zf.infolist()
                    if not i.is_dir() and not is_hidden(os.path.basename(i.filename))
                ]
                return scan_members(str(path), members, self.cache, self.warn)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.warn(
                ("zip", str(path), st.st_size, st.st_mtime_ns),
                "skipping unreadable zip %s: %s",
                path,
                reason,
            )
            return UNREADABLE_SCAN

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        path = self._zip_path(ref)
        if not path.is_file():
            raise NotFound(f"{ref}: no such zip {path}")
        scan = self._scan_for(ref)
        wanted = [
            (sop, name)
            for sop, name in sorted(scan.files.items(), key=lambda kv: kv[1])
            if only is None or sop in only
        ]
        if not wanted:
            return
        try:
            with open_regular(path) as f, zipfile.ZipFile(f) as zf:
                for sop, name in wanted:
                    # Read here, while the zip is open: consumers may load bytes on other
                    # threads.
                    data = zf.read(name)
                    yield Instance(sop, name, functools.partial(bytes, data))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise NotFound(f"cannot read {path}: {reason}") from None

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        self._check_root()
        ref = self.dest_ref(key)
        with storage_errors(str(self._zip_path(ref))):
            folder = contained_path(self.root, ref.patient)
            target = contained_path(folder, ref.study + ".zip")
            folder.mkdir(parents=True, exist_ok=True)
            # One writer per zip at a time (a plugin route and a CLI send may meet here):
            # without the lock, the second rename would drop the first writer's instances.
            with locked(folder):
                sweep_partials(folder)
                if os.path.lexists(target) and not target.is_file():
                    raise NotRegularFile(
                        errno.EISDIR, "exists and is not a regular file", str(target)
                    )
                entries, written = self._rewrite(key, ref, target, instances, identity)
                st = target.stat()
        self.cache.store(
            str(target),
            [
                CachedHeader(
                    n,
                    st.st_size,
                    st.st_mtime_ns,
                    sop,
                    identity.study_uid,
                    identity.patient_id,
                    None,
                )
                for n, sop in entries
            ],
            replace_all=True,
        )
        self._scans.pop(ref.key, None)
        return Receipt(written, str(target))

    def _rewrite(
        self,
        key: str,
        ref: StudyRef,
        target: Path,
        instances: Iterable[Instance],
        identity: StudyIdentity,
    ) -> tuple[list[tuple[str, str]], int]:
        """Write old members plus ``instances`` to a partial file and rename it over ``target``.

        Returns the (member, SOP UID) pairs now in the zip and the count written. A zip
        that can't be read is replaced (its members are lost, and re-sent by ``send``).
        A zip that holds another study refuses (``RemoteRejected``).
        """
        old = self.scan(ref) if target.exists() else EMPTY_SCAN
        if not old.readable:
            open_regular(target).close()  # can't be opened (EACCES, EIO): raise, don't replace
        self.check_same_study(key, old, identity)
        fd, tmp = partial_file(target)
        os.close(fd)
        names: set[str] = set()
        entries: list[tuple[str, str]] = []
        written = 0
        try:
            with zipfile.ZipFile(
                tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1
            ) as out:
                if old.readable and target.exists():
                    self._copy_old(old, target, out, names, entries)
                present = {sop for _, sop in entries}  # another writer may have added some
                for inst in instances:
                    if inst.sop_uid in present:
                        continue
                    name = "/".join(
                        safe_component(p) for p in inst.name.split("/") if p not in ("", ".")
                    )
                    if not name or name in names:
                        name = safe_component(inst.sop_uid) + ".dcm"
                    n = 1
                    while name in names:
                        name = f"{safe_component(inst.sop_uid)}~{n}.dcm"
                        n += 1
                    out.writestr(name, inst.read())
                    names.add(name)
                    present.add(inst.sop_uid)
                    entries.append((name, inst.sop_uid))
                    written += 1
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return entries, written

    def _copy_old(
        self,
        old: Scan,
        target: Path,
        out: zipfile.ZipFile,
        names: set[str],
        entries: list[tuple[str, str]],
    ) -> None:
        """Copy every sound member of the old zip (``old`` is its scan, read under the lock).

        Each member is read through once (its CRC checked) before it is copied: a member
        found damaged half-way through a copy would already be in ``out`` under a fresh,
        valid CRC, truncated, and still count as held. A damaged member is left out (one
        warning), so the send's verification finds it missing and sends it again.
        """
        by_name = {n: s for s, n in old.files.items()}
        damage = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)
        try:
            with open_regular(target) as f, zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    try:
                        with zf.open(info) as src:
                            while src.read(1 << 20):
                                pass
                    except damage as exc:
                        log.warning(
                            "leaving out damaged member %s of %s: %s", info.filename, target, exc
                        )
                        continue
                    with zf.open(info) as src, out.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    names.add(info.filename)
                    if info.filename in by_name:
                        entries.append((info.filename, by_name[info.filename]))
        except damage as exc:  # the zip itself cannot be opened: nothing was copied yet
            # Its scan found members, so this is damage deeper in: said once, here.
            log.warning("replacing damaged zip %s: %s", target, exc)
            names.clear()
            entries.clear()
