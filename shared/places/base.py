"""The Place contract, and the registry of place kinds.

A place stores studies under keys ``<patient>/<study>``. Every kind implements:

``studies(query)``
    Iterate the studies whose key matches ``query`` (a ``StudyQuery``; its place
    part is ignored), as ``StudyRef``. Cheap: listing never reads pixel data.
``identity(ref)``
    The study's ``StudyIdentity`` (StudyInstanceUID + SOP UID set), from headers only.
    Unreadable files are skipped with one warning naming them. May be cached.
``instances(ref, only=None)``
    The study's instances as ``Instance`` objects whose bytes load lazily; with
    ``only``, just those SOP UIDs.
``holds(key, identity)``  (destinations)
    Which of ``identity.sop_uids`` this place already holds for that study. The
    duplicate check: reads headers or listings only.
``receive(key, instances, identity)``  (destinations)
    Store the given instances under ``key``. Atomic: an interrupted receive never
    leaves anything that ``holds`` counts. Returns a ``Receipt``.
``prepare(identities)``  (optional)
    Called once per batch before ``holds``, so a place can list once, not per study.
``check_environment()``  (optional)
    Offline check of what the config does not hold (an unset password variable).
``probe()``  (optional)
    Online check that the remote answers (C-ECHO for ``dicom``): one line, or the
    mapped error; None when a kind has nothing to probe.

``is_source`` / ``is_destination`` say what a kind can do. Errors are
``dicomsync.errors`` types only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dicomsync.errors import ConfigError, RemoteRejected
from dicomsync.identity import StudyIdentity
from dicomsync.query import StudyQuery
from dicomsync.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class StudyRef:
    """A study at a place: ``place:patient/study``. ``handle`` is the place's own locator."""

    place: str
    patient: str
    study: str
    handle: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.patient}/{self.study}"

    def __str__(self) -> str:
        return f"{self.place}:{self.key}"


@dataclass
class Instance:
    """One DICOM instance whose bytes are read on demand."""

    sop_uid: str
    name: str
    loader: Callable[[], bytes] = field(repr=False)
    path: Path | None = None

    def read(self) -> bytes:
        return self.loader()


@dataclass(frozen=True)
class Receipt:
    written: int
    location: str


class Place(ABC):
    """A store of studies; see the module docstring for the contract."""

    kind: ClassVar[str]
    label: ClassVar[str]
    Options: ClassVar[type]  # the dataclass declaring its section's options (dicomsync.options)
    is_source: ClassVar[bool] = True
    is_destination: ClassVar[bool] = True

    def __init__(self, key: str) -> None:
        self.key = key

    # --- configuration ----------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        """Build from a config section (``{"Kind": …, …}``); ConfigError when invalid.

        Checks and reads the section with ``dicomsync.options.parse(cls.Options, …)``."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The config section that rebuilds this place (never a secret)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for ``place list``."""

    # --- source ----------------------------------------------------------------------
    @abstractmethod
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]: ...

    @abstractmethod
    def identity(self, ref: StudyRef) -> StudyIdentity: ...

    @abstractmethod
    def instances(
        self, ref: StudyRef, only: Collection[str] | None = None
    ) -> Iterator[Instance]: ...

    # --- destination -----------------------------------------------------------------
    def prepare(self, identities: Iterable[tuple[str, StudyIdentity]]) -> None:  # noqa: B027
        """Optional batch hook, called with (key, identity) pairs before ``holds``."""

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        raise RemoteRejected(f"{self.kind} place {self.key!r} cannot be a destination")

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        raise RemoteRejected(f"{self.kind} place {self.key!r} cannot be a destination")

    def check_environment(self) -> None:  # noqa: B027
        """Check what a run needs that the config does not hold (a password variable that
        is not set); ``ConfigError`` if missing. Cheap and offline: the plugin calls it at
        startup, so ``place add`` need not have the secret but a misconfigured route is
        reported before its first job."""

    def probe(self) -> str | None:
        """One line saying the remote answers (``place ls``, ``status``, the plugin's
        startup check), or None when there is nothing to probe; raises the mapped error."""
        return None

    def close(self) -> None:  # noqa: B027
        """Release sessions and files."""

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key!r}: {self.describe()}>"


def split_key(key: str) -> tuple[str, str]:
    patient, sep, study = key.partition("/")
    if not sep or not patient or not study:
        raise ConfigError(f"invalid study key {key!r}: expected <patient>/<study>")
    return patient, study


PLACES: Registry[Place] = Registry("place")
PLACES.register("dicom_root", "dicomsync.places.dicom_root:DicomRoot")
PLACES.register("zipped_root", "dicomsync.places.zipped_root:ZippedRoot")
PLACES.register("orthanc", "dicomsync.places.orthanc:OrthancPlace")
PLACES.register("xnat_pre_archive", "dicomsync.places.xnat:XnatPreArchive")
PLACES.register("dicom", "dicomsync.places.dicom:DicomPlace")
PLACES.register("dicomweb", "dicomsync.places.dicomweb:DicomWebPlace")
