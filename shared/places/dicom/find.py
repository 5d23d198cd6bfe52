"""C-FIND (Study Root) against one peer: listings, identities, the duplicate check.

``Finder.supported()`` decides once whether the peer answers C-FIND: an association
proposing the Study Root FIND context is accepted with that context, or not (dcmtk's
``storescp`` refuses it). The answer is cached for the place's life.

Queries reuse the place's associations (``Connections``, shared with C-STORE: thread-free
``link.Link`` objects, the answers read by the querying thread); an idle one the peer
has meanwhile closed is replaced once, transparently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset

from dicomsync.errors import DicomSyncError, Unreachable
from dicomsync.places.dicom import failures
from dicomsync.places.dicom.association import STUDY_FIND, accepted_sop, answer_code, refusal
from dicomsync.places.dicom.connections import Connections, Pooled
from dicomsync.places.dicom.link import Lost

PENDING = (0xFF00, 0xFF01)


class Finder:
    """C-FIND queries through the place's ``connections``."""

    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.peer = connections.peer
        self._supported: bool | None = None
        self._lock = threading.Lock()

    def supported(self) -> bool:
        """Whether the peer accepts the Study Root FIND context (probed once)."""
        with self._lock:
            if self._supported is None:
                pooled = self.connections.acquire()
                self._supported = accepted_sop(pooled.link, STUDY_FIND)
                self.connections.give(pooled)
            return self._supported

    def find(self, level: str, keys: Mapping[str, Any]) -> list[Dataset]:
        """Every match of a C-FIND at ``level`` (STUDY, SERIES, IMAGE) for ``keys``."""
        query = Dataset()
        query.QueryRetrieveLevel = level
        for name, value in keys.items():
            setattr(query, name, value)
        for _attempt in (1, 2):
            pooled = self.connections.acquire()
            fresh = pooled.uses == 0
            if not accepted_sop(pooled.link, STUDY_FIND):
                self.connections.give(pooled)
                raise failures.refused_context(
                    self.peer.label, "Study Root Q/R FIND", refusal(pooled.link, STUDY_FIND)
                )
            try:
                found = list(self._answers(pooled, query, level))
            except Unreachable:
                self.connections.discard(pooled)
                if fresh:
                    raise
                continue  # an idle association the peer had closed: once more
            except DicomSyncError:
                self.connections.give(pooled)
                raise
            except BaseException:  # a bug, or an interrupt: the link and its slot back
                self.connections.discard(pooled, abort=True)
                raise
            self.connections.give(pooled)
            return found
        raise AssertionError("not reached")

    def _answers(self, pooled: Pooled, query: Dataset, level: str) -> Iterator[Dataset]:
        what = f"C-FIND {level}"
        cx = pooled.link.context_id(STUDY_FIND)
        assert cx is not None
        answers = pooled.link.find(cx, STUDY_FIND, query)
        while True:
            try:
                status, identifier = next(answers)
            except StopIteration:
                raise failures.aborted(self.peer.label, what, "no final answer") from None
            except Lost as exc:
                raise failures.aborted(self.peer.label, what, exc.reason) from None
            code = answer_code(status, self.peer.label, what)
            if code in PENDING:
                if len(identifier):
                    yield identifier
            elif failures.status_ok(code):
                return
            else:
                comment = str(getattr(status, "ErrorComment", "") or "")
                raise failures.status_error(code, f"{self.peer.label}: {what}", comment)
