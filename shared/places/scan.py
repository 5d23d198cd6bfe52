"""Reading a study's files: ``scan_members`` and what it returns (``Scan``, ``Member``).

``scan_members(container, members, cache, warn)`` reads the DICOM header of every member
of one study (a folder's files or a zip's members), through the ``HeaderCache`` when a
member's size and mtime are unchanged, and returns a ``Scan``: SOP UID -> member name,
the study's identity, every StudyInstanceUID named. It never raises for a bad member:
an unreadable or damaged one is skipped with one warning naming it (``WarnOnce``,
bounded), and is cached as such so a later run warns again without reading it. It
raises only what the cache raises. ``WarnOnce`` is not thread-safe; a place uses its
own from one thread at a time. Used by ``dicomsync.places.local`` (re-exported there).
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import IO

from dicomsync.errors import DicomFileError
from dicomsync.header_cache import CachedHeader, HeaderCache
from dicomsync.identity import InstanceHeader, StudyIdentity, identity_of, read_header

log = logging.getLogger(__name__)


class WarnOnce:
    """Keys already warned about, bounded (oldest forgotten first): one line per file a run."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def __call__(self, key: Hashable, msg: str, *args: object) -> None:
        if key in self._seen:
            self._seen.move_to_end(key)
            log.debug(msg, *args)
            return
        self._seen[key] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        log.warning(msg, *args)

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class Member:
    """One file of a study: its name inside the study, signature, and how to open it."""

    name: str
    size: int
    mtime_ns: int
    open: Callable[[], IO[bytes]]


@dataclass
class Scan:
    """The readable instances of a study (SOP UID -> member name) and its identity.

    ``study_uids`` is every StudyInstanceUID its instances name (usually one);
    ``readable`` is False for a container (a zip) that could not be opened at all."""

    identity: StudyIdentity
    files: dict[str, str]
    study_uids: frozenset[str] = field(default_factory=frozenset)
    readable: bool = True


EMPTY_SCAN = Scan(StudyIdentity("", frozenset()), {})
UNREADABLE_SCAN = Scan(StudyIdentity("", frozenset()), {}, readable=False)


def scan_members(
    container: str,
    members: Iterable[Member],
    cache: HeaderCache,
    warn: WarnOnce | None = None,
) -> Scan:
    """Headers of every member, from the cache when the signature is unchanged.

    Each unreadable file is skipped with one warning that names it, on every run: a
    failure is cached (so the file is not parsed again) with its reason, and the
    warning is given from the cache too. ``warn`` keeps it to one line per file within
    one place's life (a second scan of the same study in one run says nothing new).
    """
    if warn is None:
        warn = WarnOnce()
    cached = cache.load(container)
    headers: list[InstanceHeader] = []
    files: dict[str, str] = {}
    fresh: list[CachedHeader] = []
    seen: set[str] = set()
    for m in members:
        seen.add(m.name)
        entry = cached.get(m.name)
        if entry is None or entry.size != m.size or entry.mtime_ns != m.mtime_ns:
            entry = _read_member(container, m, warn)
            if entry is None:
                continue
            fresh.append(entry)
        if entry.error:
            warn(
                ("unreadable", container, m.name, m.size, m.mtime_ns),
                "skipping unreadable file %s/%s: %s",
                container,
                m.name,
                entry.error,
            )
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
    return Scan(
        identity=identity_of(headers),
        files=files,
        study_uids=frozenset(h.study_uid for h in headers if h.study_uid),
    )


def _read_member(container: str, m: Member, warn: WarnOnce) -> CachedHeader | None:
    """A fresh header entry for one member; failures become cached error entries."""
    try:
        with m.open() as f:
            h = read_header(f)
        return CachedHeader(m.name, m.size, m.mtime_ns, h.sop_uid, h.study_uid, h.patient_id, None)
    except DicomFileError as exc:
        reason = str(exc).split(": ", 1)[-1]
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged zip member
        reason = f"damaged ({exc})"
    except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
        reason = f"cannot be unpacked ({exc})"
    except OSError as exc:  # vanished or unreadable: not cached, tried again next time
        warn(
            ("unreadable", container, m.name, m.size, m.mtime_ns),
            "skipping unreadable file %s/%s: %s",
            container,
            m.name,
            exc.strerror or exc,
        )
        return None
    return CachedHeader(m.name, m.size, m.mtime_ns, None, None, None, reason)
