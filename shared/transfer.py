"""``send``: move studies so the destination holds every instance, and nothing twice.

For each source study:
1. its identity (StudyInstanceUID + SOP UID set) is read from headers;
2. the destination says which of those SOP UIDs it already holds;
3. none missing: a duplicate, skipped. Otherwise only the missing instances are sent;
4. the destination is asked again: the study counts as sent only if it now holds
   every SOP UID, else it is failed (``TransferError``).

One study's failure never stops the batch. The destination keeps the source's
``<patient>/<study>`` key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from dicomsync.errors import DicomSyncError, TransferError
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Place, StudyRef

log = logging.getLogger(__name__)

Status = Literal["sent", "duplicate", "failed", "would_send", "empty"]


@dataclass
class StudyOutcome:
    ref: StudyRef
    status: Status
    sent: int = 0
    missing: int = 0
    error: str | None = None
    identity: StudyIdentity | None = None
    retryable: bool = False

    @property
    def fingerprint(self) -> str | None:
        return self.identity.fingerprint() if self.identity else None


@dataclass
class Summary:
    outcomes: list[StudyOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def sent(self) -> int:
        return self.count("sent")

    @property
    def duplicates(self) -> int:
        return self.count("duplicate")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def instances_sent(self) -> int:
        return sum(o.sent for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        parts = [f"{self.sent} sent", f"{self.duplicates} duplicate", f"{self.failed} failed"]
        if self.count("would_send"):
            parts.insert(0, f"{self.count('would_send')} would be sent")
        if self.count("empty"):
            parts.append(f"{self.count('empty')} empty")
        return f"{', '.join(parts)} ({self.instances_sent} instances in {self.seconds:.1f}s)"


def send_study(
    source: Place,
    ref: StudyRef,
    dest: Place,
    *,
    dry_run: bool = False,
    identity: StudyIdentity | None = None,
) -> StudyOutcome:
    """Send one study; never raises (every error becomes a failed outcome).

    Unexpected exceptions are logged with their traceback and marked retryable, so the
    plugin tries again and a CLI batch goes on with the next study.
    """
    try:
        identity = identity or source.identity(ref)
        if not identity.sop_uids:
            log.warning("%s: no readable DICOM instances; nothing to send", ref)
            return StudyOutcome(ref, "empty", identity=identity)
        held = dest.holds(ref.key, identity)
        missing = identity.missing_from(held)
        if not missing:
            log.info(
                "%s: duplicate, %s already holds all %d instances", ref, dest.key, len(identity)
            )
            return StudyOutcome(ref, "duplicate", identity=identity)
        if dry_run:
            return StudyOutcome(ref, "would_send", missing=len(missing), identity=identity)
        log.info("%s: sending %d of %d instances to %s", ref, len(missing), len(identity), dest.key)
        receipt = dest.receive(ref.key, source.instances(ref, only=missing), identity)
        still = identity.missing_from(dest.holds(ref.key, identity))
        if still:
            raise TransferError(
                f"{ref}: {dest.key} holds {len(identity) - len(still)} of {len(identity)} "
                "instances after the send"
            )
        return StudyOutcome(
            ref, "sent", sent=receipt.written, missing=len(missing), identity=identity
        )
    except DicomSyncError as exc:
        log.info("%s: failed: %s", ref, exc)
        return StudyOutcome(
            ref, "failed", error=str(exc), identity=identity, retryable=exc.retryable
        )
    except Exception as exc:  # a bug or an untranslated error: fail this study, not the batch
        log.warning("%s: unexpected error", ref, exc_info=True)
        error = f"unexpected error: {type(exc).__name__}: {exc}"
        return StudyOutcome(ref, "failed", error=error, identity=identity, retryable=True)


def send(
    items: Iterable[tuple[Place, StudyRef]],
    dest: Place,
    *,
    dry_run: bool = False,
    progress: Callable[[StudyOutcome], None] | None = None,
) -> Summary:
    """Send many studies to ``dest``; identities are read first so the destination can list once.

    A destination that refuses the batch outright (``prepare`` raising a non-retryable
    error such as a wrong password) raises; per-study failures become outcomes.
    """
    start = time.monotonic()
    summary = Summary()
    prepared: list[tuple[Place, StudyRef, StudyIdentity | None]] = []
    for source, ref in items:
        try:
            prepared.append((source, ref, source.identity(ref)))
        except DicomSyncError as exc:
            log.info("%s: failed: %s", ref, exc)
            outcome = StudyOutcome(ref, "failed", error=str(exc), retryable=exc.retryable)
            summary.outcomes.append(outcome)
            if progress:
                progress(outcome)
    try:
        dest.prepare((ref.key, ident) for _, ref, ident in prepared if ident is not None)
    except DicomSyncError as exc:
        if not exc.retryable:
            raise  # wrong password, unknown project, bad config: no study can succeed
        log.warning("%s: batch listing failed (%s); checking study by study", dest.key, exc)
    for source, ref, ident in prepared:
        outcome = send_study(source, ref, dest, dry_run=dry_run, identity=ident)
        summary.outcomes.append(outcome)
        if progress:
            progress(outcome)
    summary.seconds = time.monotonic() - start
    return summary
