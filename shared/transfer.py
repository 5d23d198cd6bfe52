"""``send``: move studies so the destination holds every instance, and nothing twice.

For each source study:
1. its identity (StudyInstanceUID + SOP UID set) is read from headers;
2. the destination says which of those SOP UIDs it already holds;
3. none missing: a duplicate, skipped. Otherwise only the missing instances are sent;
4. the destination is asked again: the study counts as sent only if it now holds
   every SOP UID, else it is failed (``TransferError``).

One study's failure never stops the batch, with two exceptions that no study can
overcome: a destination that refuses the batch in ``prepare`` (after its retries), and
a configuration error (say, a password variable that is not set). The destination keeps
the source's ``<patient>/<study>`` key.

Retries (``send(..., retry=policy)``): a retryable failure (``DicomSyncError.retryable``:
timeouts, connection errors, 408/429/5xx, a full disk) is tried again after
``policy.delay(attempt)`` seconds (``dicomsync.queue.base.RetryPolicy``, the plugin's
policy), up to ``policy.max_attempts`` attempts, with one warning line per retry. This
applies to reading a source identity, to ``prepare`` and to each study's send. A study
that still fails marks the destination (or, for an identity read, the source) as
failing: later studies get one attempt each until one of them succeeds, so a place that
stays down costs one study's waits, not one per study.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from dicomsync.errors import ConfigError, DicomSyncError, TransferError
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Place, StudyRef
from dicomsync.queue.base import RetryPolicy

log = logging.getLogger(__name__)

Status = Literal["sent", "duplicate", "failed", "would_send", "empty"]
T = TypeVar("T")
Sleep = Callable[[float], None]


@dataclass
class StudyOutcome:
    ref: StudyRef
    status: Status
    sent: int = 0
    missing: int = 0
    error: str | None = None
    identity: StudyIdentity | None = None
    retryable: bool = False
    exception: DicomSyncError | None = field(default=None, repr=False, compare=False)

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
        written = getattr(exc, "delivered", 0)  # instances a failed receive still wrote
        return StudyOutcome(
            ref,
            "failed",
            sent=written if isinstance(written, int) else 0,
            error=str(exc),
            identity=identity,
            retryable=exc.retryable,
            exception=exc,
        )
    except Exception as exc:  # a bug or an untranslated error: fail this study, not the batch
        log.warning("%s: unexpected error", ref, exc_info=True)
        error = f"unexpected error: {type(exc).__name__}: {exc}"
        return StudyOutcome(ref, "failed", error=error, identity=identity, retryable=True)


def retry_call(
    call: Callable[[], T],
    what: str,
    retry: RetryPolicy | None,
    sleep: Sleep = time.sleep,
    attempts: int | None = None,
) -> T:
    """``call()``, tried again on retryable errors per ``retry`` (at most ``attempts`` times,
    default ``retry.max_attempts``); the last error is raised. The CLI's one retry loop
    for calls that raise (``send``'s reads and ``prepare``, ``dicomsync index``'s sink
    calls); its waits are ``wait_to_retry``'s, the policy's ``RetryPolicy.delay``."""
    limit = 1 if retry is None else (attempts or retry.max_attempts)
    attempt = 1
    while True:
        try:
            return call()
        except DicomSyncError as exc:
            if not exc.retryable or retry is None or attempt >= limit:
                raise
            wait_to_retry(what, str(exc), attempt, retry, sleep)
            attempt += 1


def wait_to_retry(
    what: str, error: str | None, attempt: int, retry: RetryPolicy, sleep: Sleep
) -> None:
    """Log the one warning line of a failed ``attempt`` and sleep ``retry.delay(attempt)``."""
    seconds = retry.delay(attempt)
    log.warning(
        "%s: attempt %d of %d failed (%s); trying again in %.1fs",
        what,
        attempt,
        retry.max_attempts,
        error,
        seconds,
    )
    sleep(seconds)


def send(
    items: Iterable[tuple[Place, StudyRef]],
    dest: Place,
    *,
    dry_run: bool = False,
    progress: Callable[[StudyOutcome], None] | None = None,
    retry: RetryPolicy | None = None,
    sleep: Sleep = time.sleep,
) -> Summary:
    """Send many studies to ``dest``; identities are read first so the destination can list once.

    A destination whose ``prepare`` fails (after ``retry``'s attempts when the error is
    retryable) raises: a wrong password, an unknown project or an unreachable server
    stops the batch with one error, before any study. A study failing with a
    ``ConfigError`` raises too. Other per-study failures become outcomes; with ``retry``
    they are tried again first (see the module docstring). Without ``retry`` every step
    is tried once.
    """
    start = time.monotonic()
    summary = Summary()

    def record(outcome: StudyOutcome) -> None:
        summary.outcomes.append(outcome)
        if progress:
            progress(outcome)

    retrying = retry is not None and retry.max_attempts > 1
    # A step that failed after all its attempts marks its place as failing: later steps
    # get one attempt each until one succeeds (a place that stays down costs one wait).
    source_failing = False
    prepared: list[tuple[Place, StudyRef, StudyIdentity]] = []
    for source, ref in items:
        read = functools.partial(source.identity, ref)
        try:
            ident = retry_call(read, str(ref), retry, sleep, 1 if source_failing else None)
        except DicomSyncError as exc:
            if isinstance(exc, ConfigError):
                raise
            source_failing = source_failing or (exc.retryable and retrying)
            log.info("%s: failed: %s", ref, exc)
            record(StudyOutcome(ref, "failed", error=str(exc), retryable=exc.retryable))
            continue
        source_failing = False
        prepared.append((source, ref, ident))
    batch = [(ref.key, ident) for _, ref, ident in prepared]
    # Wrong password, unknown project, bad config, or unreachable after every attempt:
    # no study can succeed, so the batch stops here with one error.
    retry_call(functools.partial(dest.prepare, batch), dest.key, retry, sleep)
    failing = False  # the destination side, as source_failing above
    for source, ref, ident in prepared:
        attempts = 1 if retry is None or failing else retry.max_attempts
        attempt = 1
        while True:
            outcome = send_study(source, ref, dest, dry_run=dry_run, identity=ident)
            if isinstance(outcome.exception, ConfigError):
                raise outcome.exception
            if outcome.status != "failed" or not outcome.retryable or attempt >= attempts:
                break
            assert retry is not None
            wait_to_retry(str(ref), outcome.error, attempt, retry, sleep)
            ident = outcome.identity or ident
            attempt += 1
        if outcome.status != "failed":
            failing = False
        elif outcome.retryable and retrying:
            failing = True
        record(outcome)
    summary.seconds = time.monotonic() - start
    return summary
