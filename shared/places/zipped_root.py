"""``zipped_root``: one zip per study, ``root/<patient>/<study>.zip``.

A zip is always written whole to a temporary file beside it (``.<study>.zip.…partial``)
and renamed into place, so an interrupted send never leaves a zip that counts as
sent. A partial destination is completed by rewriting the zip with the members it
had plus the missing instances (the old members are copied compressed, not
re-read as DICOM). Member names keep the source's relative paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import zipfile
import zlib
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from dicomsync.errors import NotFound, RemoteRejected
from dicomsync.header_cache import CachedHeader
from dicomsync.identity import StudyIdentity, contained_path, safe_component
from dicomsync.places.base import Instance, Receipt, StudyRef
from dicomsync.places.local import (
    Member,
    RootPlace,
    Scan,
    is_hidden,
    partial_file,
    scan_members,
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
        if is_hidden(entry.name) or not entry.name.endswith(".zip") or not entry.is_file():
            return None
        return entry.name[: -len(".zip")]

    def _zip_path(self, ref: StudyRef) -> Path:
        return self.root / ref.patient / f"{ref.study}.zip"

    def scan(self, ref: StudyRef) -> Scan:
        path = self._zip_path(ref)
        try:
            st = path.stat()
        except FileNotFoundError:
            return Scan(StudyIdentity("", frozenset()), {})
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            log.warning("skipping unreadable zip %s: %s", path, exc)
            return Scan(StudyIdentity("", frozenset()), {})
        with zf:
            members = [
                Member(
                    i.filename, st.st_size, st.st_mtime_ns, functools.partial(zf.open, i.filename)
                )
                for i in zf.infolist()
                if not i.is_dir() and not is_hidden(os.path.basename(i.filename))
            ]
            return scan_members(str(path), members, self.cache)

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
        with zipfile.ZipFile(path) as zf:
            for sop, name in wanted:
                # Read here, while the zip is open: consumers may load bytes on other threads.
                data = zf.read(name)
                yield Instance(sop, name, functools.partial(bytes, data))

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        self._check_root()
        ref = self.dest_ref(key)
        folder = contained_path(self.root, ref.patient)
        target = contained_path(folder, ref.study + ".zip")
        folder.mkdir(parents=True, exist_ok=True)
        # One writer per zip at a time (a plugin route and a CLI send may meet here):
        # without the lock, the second rename would drop the first writer's instances.
        with _locked(folder):
            sweep_partials(folder)
            entries, written = self._rewrite(ref, target, instances)
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
        self, ref: StudyRef, target: Path, instances: Iterable[Instance]
    ) -> tuple[list[tuple[str, str]], int]:
        """Write old members plus ``instances`` to a partial file and rename it over ``target``.

        Returns the (member, SOP UID) pairs now in the zip and the count written. A zip
        that can't be read is replaced (its members are lost, and re-sent by ``send``).
        """
        fd, tmp = partial_file(target)
        os.close(fd)
        names: set[str] = set()
        entries: list[tuple[str, str]] = []
        written = 0
        try:
            with zipfile.ZipFile(
                tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1
            ) as out:
                if target.exists():
                    self._copy_old(ref, target, out, names, entries)
                present = {sop for _, sop in entries}  # another writer may have added some
                for inst in instances:
                    if inst.sop_uid in present:
                        continue
                    name = "/".join(
                        safe_component(p) for p in inst.name.split("/") if p not in ("", ".")
                    )
                    if not name or name in names:
                        name = safe_component(inst.sop_uid) + ".dcm"
                    out.writestr(name, inst.read())
                    names.add(name)
                    entries.append((name, inst.sop_uid))
                    written += 1
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise RemoteRejected(f"cannot write {target}: {exc.strerror or exc}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return entries, written

    def _copy_old(
        self,
        ref: StudyRef,
        target: Path,
        out: zipfile.ZipFile,
        names: set[str],
        entries: list[tuple[str, str]],
    ) -> None:
        by_name = {n: s for s, n in self.scan(ref).files.items()}
        try:
            with zipfile.ZipFile(target) as old:
                for info in old.infolist():
                    with old.open(info) as src, out.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    names.add(info.filename)
                    if info.filename in by_name:
                        entries.append((info.filename, by_name[info.filename]))
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            log.warning("replacing unreadable zip %s: %s", target, exc)
            names.clear()
            entries.clear()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the patient folder itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
