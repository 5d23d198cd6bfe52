"""Every error dicomsync raises, in one tree.

Third-party exceptions (requests, pydicom, sqlite3, xnat, OSError) are translated
into these where they enter our code, so callers only ever catch ``DicomSyncError``.
The CLI prints ``str(error)`` as one line and exits non-zero; the plugin logs it
through Orthanc's log. Messages never contain secrets.

::

    DicomSyncError                  base; ``retryable`` says whether trying later may help
    ├── ConfigError                 dicomsync.json / the DicomSync section is invalid
    ├── QueryError                  a malformed StudyQuery or index query
    ├── DicomFileError              a file that is not readable DICOM
    ├── PlaceError                  a place failed to list, read or receive
    │   ├── UnknownPlaceError       no place with that key
    │   ├── PlaceKindUnavailable    the place kind exists but cannot be used here (missing dependency)
    │   ├── NotFound                the study or path does not exist
    │   ├── Unreachable             network error, timeout, 5xx           (retryable)
    │   ├── StorageError            a local write that may pass later:    (retryable)
    │   │                           disk full, quota, read-only, I/O error, permission
    │   ├── AuthenticationFailed    401/403, wrong password
    │   └── RemoteRejected          the remote refused the data (4xx other than auth)
    ├── TransferError               the destination does not hold what was sent
    ├── DeidentificationRefused     an instance de-identification cannot make safe
    │                               (burned-in identity): its study fails, not retried
    ├── SinkError                   a tag sink failed, or cannot be had
    │   ├── UnknownSinkError        no sink with that key (or none configured)
    │   ├── SinkKindUnavailable     the sink kind exists but cannot be used here (missing dependency)
    │   ├── SinkRetryable           busy, 5xx, network                   (retryable)
    │   └── SinkFatal               bad token, bad config: stop the sink, keep the events
    └── QueueError                  the durable queue failed
"""

from __future__ import annotations


class DicomSyncError(Exception):
    """Base of every dicomsync error."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(DicomSyncError):
    """The configuration (dicomsync.json or the Orthanc DicomSync section) is invalid."""


class QueryError(DicomSyncError):
    """A query could not be parsed."""


class DicomFileError(DicomSyncError):
    """A file is not readable DICOM."""


class PlaceError(DicomSyncError):
    """A place could not list, read or receive."""


class UnknownPlaceError(PlaceError):
    """No place is configured under that key (sinks: ``UnknownSinkError``)."""


class PlaceKindUnavailable(PlaceError):
    """The place kind is known but cannot be used (a dependency is missing); sinks:
    ``SinkKindUnavailable``."""


class NotFound(PlaceError):
    """A study, path or remote resource does not exist."""


class Unreachable(PlaceError):
    """The remote did not answer, or answered with a server error."""

    retryable = True


class StorageError(PlaceError):
    """A folder place could not write, for a reason that may pass: ENOSPC, EDQUOT, EROFS,
    EIO, EACCES/EPERM (an operator fixes those without changing the configuration).
    Errors that retrying cannot fix (a name too long, a file where a folder must be)
    are ``RemoteRejected``."""

    retryable = True


class AuthenticationFailed(PlaceError):
    """The remote refused our credentials."""


class RemoteRejected(PlaceError):
    """The remote refused the request or the data."""


class TransferError(DicomSyncError):
    """After a send, the destination does not hold every instance."""

    retryable = True


class DeidentificationRefused(DicomSyncError):
    """An instance that de-identification refuses to send (``dicomsync.deid``):
    ``BurnedInAnnotation`` YES, or a SOP class that carries burned-in identity."""


class SinkError(DicomSyncError):
    """A tag sink failed to deliver. ``delivered`` holds the event ids it did deliver first;
    ``rejected`` (id -> reason) the events it saw refused for good first."""

    delivered: set[str]
    rejected: dict[str, str]

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.delivered = set()
        self.rejected = {}


class UnknownSinkError(SinkError):
    """No sink is configured under that key, or none at all."""


class SinkKindUnavailable(SinkError):
    """The sink kind is known but cannot be used (a dependency is missing)."""


class SinkRetryable(SinkError):
    """The sink is busy or unreachable; the events stay queued and are tried again."""

    retryable = True


class SinkFatal(SinkError):
    """The sink refuses us (token, config); it stops, and its events stay queued."""


class QueueError(DicomSyncError):
    """The durable queue could not be read or written."""
