"""What the two folder-based places share: a root folder, listing, and cached headers
(read by ``dicomsync.places.scan``, whose names are re-exported here).

Also the rules both follow on disk:

- **Keys**: ``dest_ref`` maps a study key to ``<safe patient>/<safe study>`` with
  ``safe_component``, which is injective; a destination study that holds another
  StudyInstanceUID than the one being sent is refused (``RemoteRejected``), never merged.
- **Only regular files are opened** (``open_regular``): FIFOs, devices and sockets are
  skipped with one warning, so nothing blocks on them.
- **Writes are staged** under hidden names (``partial_file``, ``partial_dir``) and
  renamed into place; leftovers of dead writers are swept (``sweep_partials``).
- **Every OSError of a write is translated** (``storage_errors``): disk full, quota,
  read-only, I/O and permission errors become the retryable ``StorageError``; the rest
  (a name too long, a file where a folder must be) ``RemoteRejected``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dicomsync.config import resolve_path
from dicomsync.errors import (
    ConfigError,
    NotFound,
    PlaceError,
    RemoteRejected,
    StorageError,
)
from dicomsync.header_cache import HeaderCache, shared_cache
from dicomsync.identity import (
    StudyIdentity,
    cut_to_bytes,
    name_bytes,
    safe_component,
)
from dicomsync.options import option, parse
from dicomsync.places.base import Place, StudyRef, split_key
from dicomsync.places.scan import EMPTY_SCAN as EMPTY_SCAN  # re-exported, as below
from dicomsync.places.scan import UNREADABLE_SCAN as UNREADABLE_SCAN
from dicomsync.places.scan import Member as Member
from dicomsync.places.scan import Scan, WarnOnce
from dicomsync.places.scan import scan_members as scan_members
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)


def is_hidden(name: str) -> bool:
    """Temporary and hidden entries (our own partial writes start with a dot)."""
    return name.startswith(".")


# Partial writes are named ``.<target>.<host>~<pid>~<random>.partial``, so a later writer
# can tell the leftovers of a process that died (kill -9, power loss) from live writes.
# The host part has no ``.`` or ``~`` (so the name parses back), and the target part is cut
# so that the whole name stays within 255 bytes.
def host_tag(hostname: str) -> str:
    """The host part of a partial name: no ``.``, ``~``, ``/`` or space, at most 64 bytes."""
    return cut_to_bytes(re.sub(r"[.~/\s]", "_", hostname), 64) or "_"


_HOST = host_tag(socket.gethostname())
_PARTIAL = re.compile(
    r"^\.(?P<target>.*)\.(?P<host>[^.~]*)~(?P<pid>\d+)~(?P<rand>[^.]*)\.(?P<kind>partial|retired)$",
    re.DOTALL,
)
_NAME_MAX = 255
_RAND_BYTES = 8  # what tempfile adds


def _partial_prefix(target: Path, rand_bytes: int = _RAND_BYTES, kind: str = "partial") -> str:
    fixed = f"..{_HOST}~{os.getpid()}~"
    room = _NAME_MAX - name_bytes(fixed) - rand_bytes - len("." + kind)
    return f".{cut_to_bytes(target.name, room)}.{_HOST}~{os.getpid()}~"


def partial_file(target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target`` (its fd and path); hidden from listings."""
    return tempfile.mkstemp(prefix=_partial_prefix(target), suffix=".partial", dir=target.parent)


def partial_dir(target: Path) -> Path:
    """A new temporary folder beside ``target``; hidden from listings, swept like files."""
    return Path(
        tempfile.mkdtemp(prefix=_partial_prefix(target), suffix=".partial", dir=target.parent)
    )


def retired_tag(name: str) -> str:
    return hashlib.sha1(os.fsencode(name)).hexdigest()[:_RAND_BYTES]


def retired_name(target: Path) -> Path:
    """Where a folder is put aside while its replacement is renamed in (without an atomic
    exchange): ``.<target>.<host>~<pid>~<retired_tag(target)>.retired``, so the folder it
    came from can be told by name, even where ``<target>`` had to be cut."""
    return (
        target.parent
        / f"{_partial_prefix(target, kind='retired')}{retired_tag(target.name)}.retired"
    )


def parse_partial(name: str) -> re.Match[str] | None:
    return _PARTIAL.match(name)


def writer_dead(m: re.Match[str]) -> bool:
    """Whether the writer that named a partial is a dead process of this host."""
    return m["host"] == _HOST and not _pid_alive(int(m["pid"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: Path, recursive: bool = False) -> int:
    """Delete partial writes (files or staging folders) left in ``folder`` by dead processes
    of this host. ``.retired`` folders are never swept here: they may hold a study
    (``dicom_root`` settles them)."""
    removed = 0
    candidates = folder.rglob(".*.partial") if recursive else folder.glob(".*.partial")
    for path in candidates:
        m = _PARTIAL.match(path.name)
        if m is None or not writer_dead(m):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
            log.info("removed %s, left by a write that was interrupted", path)
        except OSError:
            pass
    return removed


# --- OSError translation ---------------------------------------------------------------

# Conditions of the storage that may pass without a change to dicomsync's configuration:
# a full disk or quota, a read-only or failing file system, a permission an operator
# fixes, a stale NFS handle, too many open files. EACCES and EPERM are here on purpose:
# retrying is bounded (the queue's Retry policy), and fixing ownership then needs no rerun.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EIO",
        "EACCES",
        "EPERM",
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ESTALE",
        "ENOLCK",
        "EMFILE",
        "ENFILE",
        "ENOMEM",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)


def storage_error(exc: OSError, what: str) -> PlaceError:
    """The dicomsync error for an OSError met while writing ``what`` (one line)."""
    reason = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else what
    message = f"cannot write {os.fsdecode(where) if isinstance(where, bytes) else where}: {reason}"
    if exc.errno in TRANSIENT_ERRNOS:
        return StorageError(message)
    return RemoteRejected(message)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate every ``OSError`` inside into ``StorageError`` or ``RemoteRejected``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, what) from None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- regular files only ----------------------------------------------------------------


class NotRegularFile(OSError):
    """A path that is a FIFO, device, socket or folder where a file was expected."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (symlinks to one are fine).

    Opened non-blocking, checked with ``fstat``, then set back to blocking: a FIFO put
    there after a ``stat`` cannot make the open (or a read) wait forever.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class RootOptions:
    """The options of a ``dicom_root`` or ``zipped_root`` place section."""

    path: str = option("Path", "path", "the root folder", required=True)


class RootPlace(Place):
    """A place stored under ``root/<patient>/<study…>``."""

    Options = RootOptions

    suffix: str = ""  # ".zip" for zipped roots
    # Scans kept between ``identity`` and ``instances`` of one study: a few are enough
    # (a worker handles one study at a time; the CLI reads a batch's identities first and
    # re-scans, from the header cache, past this many).
    max_scans = 32

    def __init__(self, key: str, root: Path, cache: HeaderCache | None = None) -> None:
        super().__init__(key)
        self.root = root
        self._cache = cache
        self._scans: OrderedDict[str, Scan] = OrderedDict()
        self.warn = WarnOnce()

    @property
    def cache(self) -> HeaderCache:
        return self._cache or shared_cache()

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        opts = parse(cls.Options, section, f"{cls.kind} place {key!r}")
        path = resolve_path(opts.path, base_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"{cls.kind} place {key!r}: Path {str(path)!r} exists but is not a folder"
            )
        return cls(key, path)

    def to_config(self) -> dict[str, Any]:
        return {"Kind": self.kind, "Path": str(self.root)}

    def _check_root(self) -> None:
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise NotFound(f"{self.kind} place {self.key!r}: root folder {self.root} {what}")

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
            if is_hidden(p.name) or not _is_dir(p):
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

    def _remember(self, key: str, scan: Scan) -> None:
        self._scans[key] = scan
        self._scans.move_to_end(key)
        while len(self._scans) > self.max_scans:
            self._scans.popitem(last=False)

    def identity(self, ref: StudyRef) -> StudyIdentity:
        scan = self.scan(ref)
        self._remember(ref.key, scan)
        return scan.identity

    def _scan_for(self, ref: StudyRef) -> Scan:
        scan = self._scans.pop(ref.key, None)  # used once: instances follow identity
        if scan is None:
            scan = self.scan(ref)
        return scan

    def dest_ref(self, key: str) -> StudyRef:
        """Where a study sent under ``key`` lives here: both parts made safe components.

        ``holds`` and ``receive`` both go through this, so the duplicate check reads
        exactly what a send wrote, and no key from a remote source escapes the root.
        ``safe_component`` is injective, so two keys never share a destination study.
        """
        patient, study = split_key(key)
        return StudyRef(self.key, safe_component(patient), safe_component(study))

    def check_same_study(self, key: str, scan: Scan, identity: StudyIdentity) -> None:
        """Refuse to add ``identity`` to a destination study that holds another study."""
        wanted = identity.all_study_uids
        others = scan.study_uids - wanted
        if wanted and others:
            raise RemoteRejected(
                f"{self.key}:{key} holds another study (StudyInstanceUID "
                f"{', '.join(sorted(others))}), not {identity.study_uid}; "
                "refusing to put two studies under one key"
            )

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        """The SOP UIDs of ``identity`` stored under ``key``; ``RemoteRejected`` if another
        study (another StudyInstanceUID) is stored there."""
        self._check_root()
        scan = self.scan(self.dest_ref(key))
        self.check_same_study(key, scan, identity)
        return scan.identity.sop_uids & identity.sop_uids


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
