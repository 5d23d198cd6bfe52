"""What the two folder-based places share: a root folder, listing, and cached headers."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dicomsync.config import resolve_path
from dicomsync.errors import DicomFileError, NotFound
from dicomsync.header_cache import CachedHeader, HeaderCache, shared_cache
from dicomsync.identity import (
    InstanceHeader,
    StudyIdentity,
    identity_of,
    read_header,
    safe_component,
)
from dicomsync.places.base import Place, StudyRef, require, split_key
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)


def is_hidden(name: str) -> bool:
    """Temporary and hidden entries (our own partial writes start with a dot)."""
    return name.startswith(".")


# Partial writes are named ``.<target>.<host>~<pid>~<random>.partial``, so a later writer
# can tell the leftovers of a process that died (kill -9, power loss) from live writes.
_HOST = socket.gethostname().replace("~", "_")
_PARTIAL = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.~]*)~(?P<pid>\d+)~[^.]*\.partial$")


def partial_file(target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target`` (its fd and path); hidden from listings."""
    return tempfile.mkstemp(
        prefix=f".{target.name}.{_HOST}~{os.getpid()}~", suffix=".partial", dir=target.parent
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: Path, recursive: bool = False) -> int:
    """Delete partial writes left in ``folder`` by dead processes of this host."""
    removed = 0
    candidates = folder.rglob(".*.partial") if recursive else folder.glob(".*.partial")
    for path in candidates:
        m = _PARTIAL.match(path.name)
        if m is None or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        try:
            path.unlink()
            removed += 1
            log.info("removed %s, left by a write that was interrupted", path)
        except OSError:
            pass
    return removed


@dataclass(frozen=True)
class Member:
    """One file of a study: its name inside the study, signature, and how to open it."""

    name: str
    size: int
    mtime_ns: int
    open: Callable[[], IO[bytes]]


@dataclass
class Scan:
    """The readable instances of a study (SOP UID -> member name) and its identity."""

    identity: StudyIdentity
    files: dict[str, str]


def scan_members(container: str, members: Iterable[Member], cache: HeaderCache) -> Scan:
    """Headers of every member, from the cache when the signature is unchanged.

    Each unreadable file is skipped with one warning that names it (cached
    failures are warned about again at debug level only).
    """
    cached = cache.load(container)
    headers: list[InstanceHeader] = []
    files: dict[str, str] = {}
    fresh: list[CachedHeader] = []
    seen: set[str] = set()
    for m in members:
        seen.add(m.name)
        entry = cached.get(m.name)
        if entry is None or entry.size != m.size or entry.mtime_ns != m.mtime_ns:
            entry = _read_member(container, m)
            if entry is None:
                continue
            fresh.append(entry)
        elif entry.error:
            log.debug("skipping unreadable file %s/%s (cached)", container, m.name)
        if entry.sop_uid:
            headers.append(
                InstanceHeader(entry.sop_uid, entry.study_uid or "", entry.patient_id or "", "")
            )
            files.setdefault(entry.sop_uid, m.name)
    if fresh:
        cache.store(container, fresh)
    stale = set(cached) - seen
    if stale:
        cache.forget(container, stale)
    return Scan(identity=identity_of(headers), files=files)


def _read_member(container: str, m: Member) -> CachedHeader | None:
    """A fresh header entry for one member; failures become cached error entries."""
    try:
        with m.open() as f:
            h = read_header(f)
        return CachedHeader(m.name, m.size, m.mtime_ns, h.sop_uid, h.study_uid, h.patient_id, None)
    except DicomFileError as exc:
        reason = str(exc).split(": ", 1)[-1]
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged zip member
        reason = f"damaged ({exc})"
    except OSError as exc:  # vanished or unreadable: not cached, tried again next time
        log.warning("skipping unreadable file %s/%s: %s", container, m.name, exc.strerror or exc)
        return None
    log.warning("skipping unreadable file %s/%s: %s", container, m.name, reason)
    return CachedHeader(m.name, m.size, m.mtime_ns, None, None, None, reason)


class RootPlace(Place):
    """A place stored under ``root/<patient>/<study…>``."""

    suffix: str = ""  # ".zip" for zipped roots

    def __init__(self, key: str, root: Path, cache: HeaderCache | None = None) -> None:
        super().__init__(key)
        self.root = root
        self._cache = cache
        self._scans: dict[str, Scan] = {}

    @property
    def cache(self) -> HeaderCache:
        return self._cache or shared_cache()

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        path = resolve_path(require(section, "Path", key, f"{cls.kind} place"), base_dir)
        return cls(key, path)

    def to_config(self) -> dict[str, Any]:
        return {"Kind": self.kind, "Path": str(self.root)}

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise NotFound(
                f"{self.kind} place {self.key!r}: root folder {self.root} does not exist"
            )

    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        self._check_root()
        query = query or StudyQuery(self.key)
        try:
            patients = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            raise NotFound(
                f"{self.kind} place {self.key!r}: cannot list {self.root}: {exc.strerror}"
            ) from None
        for p in patients:
            if is_hidden(p.name) or not p.is_dir():
                continue
            try:
                entries = sorted(os.scandir(p.path), key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list %s: %s", p.path, exc.strerror)
                continue
            for s in entries:
                study = self._study_name(s)
                if study is not None and query.matches(p.name, study):
                    yield StudyRef(self.key, p.name, study, handle=s.path)

    def _study_name(self, entry: os.DirEntry[str]) -> str | None:
        raise NotImplementedError

    def scan(self, ref: StudyRef) -> Scan:
        raise NotImplementedError

    def identity(self, ref: StudyRef) -> StudyIdentity:
        scan = self.scan(ref)
        self._scans[ref.key] = scan
        return scan.identity

    def _scan_for(self, ref: StudyRef) -> Scan:
        scan = self._scans.get(ref.key)
        if scan is None:
            scan = self.scan(ref)
            self._scans[ref.key] = scan
        return scan

    def dest_ref(self, key: str) -> StudyRef:
        """Where a study sent under ``key`` lives here: both parts made safe components.

        ``holds`` and ``receive`` both go through this, so the duplicate check reads
        exactly what a send wrote, and no key from a remote source escapes the root.
        """
        patient, study = split_key(key)
        return StudyRef(self.key, safe_component(patient), safe_component(study))

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        self._check_root()
        ref = self.dest_ref(key)
        scan = self.scan(ref)
        self._scans[ref.key] = scan
        if scan.identity.sop_uids and scan.identity.study_uid != identity.study_uid:
            log.warning(
                "%s:%s holds a different study (%s) than the one being sent (%s)",
                self.key,
                key,
                scan.identity.study_uid,
                identity.study_uid,
            )
        return scan.identity.sop_uids & identity.sop_uids
