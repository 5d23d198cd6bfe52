"""``dicom_root``: DICOM files under ``root/<patient>/<study>/**``.

A study is every file below its study folder, at any depth. Files keep their
relative paths when a study is sent folder→folder, so no subfolder is dropped.
Hidden files and our partial writes (names starting with ``.``) and ``DICOMDIR``
are ignored. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

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

SKIP_NAMES = {"DICOMDIR"}


class DicomRoot(RootPlace):
    kind = "dicom_root"
    label = "Root folder"

    def describe(self) -> str:
        return f"Root folder at '{self.root}'"

    def _study_name(self, entry: os.DirEntry[str]) -> str | None:
        if is_hidden(entry.name) or not entry.is_dir():
            return None
        return entry.name

    def _members(self, folder: Path) -> Iterator[Member]:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if is_hidden(name) or name in SKIP_NAMES:
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError as exc:
                    log.warning("skipping unreadable file %s: %s", full, exc.strerror)
                    continue
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                yield Member(rel, st.st_size, st.st_mtime_ns, functools.partial(_open_binary, full))

    def _folder(self, ref: StudyRef) -> Path:
        return self.root / ref.patient / ref.study

    def scan(self, ref: StudyRef) -> Scan:
        folder = self._folder(ref)
        if not folder.is_dir():
            return Scan(StudyIdentity("", frozenset()), {})
        return scan_members(str(folder), self._members(folder), self.cache)

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
        folder = contained_path(self.root, ref.patient, ref.study)
        folder.mkdir(parents=True, exist_ok=True)
        sweep_partials(folder, recursive=True)
        written: list[CachedHeader] = []
        for inst in instances:
            parts = [safe_component(p) for p in inst.name.split("/") if p not in ("", ".")]
            if not parts or parts[-1] in SKIP_NAMES:
                parts = [safe_component(inst.sop_uid) + ".dcm"]
            target = contained_path(folder, *parts)
            if target.exists():  # a different instance already has this name
                target = folder / (safe_component(inst.sop_uid) + ".dcm")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = inst.read()
            _atomic_write(target, data)
            st = target.stat()
            rel = target.relative_to(folder).as_posix()
            written.append(
                CachedHeader(
                    rel,
                    st.st_size,
                    st.st_mtime_ns,
                    inst.sop_uid,
                    identity.study_uid,
                    identity.patient_id,
                    None,
                )
            )
        self.cache.store(str(folder), written)
        self._scans.pop(ref.key, None)
        return Receipt(len(written), str(folder))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")  # the caller closes it


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = partial_file(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RemoteRejected(f"cannot write {target}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
