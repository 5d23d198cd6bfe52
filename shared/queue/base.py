"""The durable job queue: its interface, the job record and the retry policy.

One record per ``(kind, resource, destination)``:

- ``kind`` ``"study"`` routes an Orthanc study to a place; ``"tags"`` feeds a sink
  (one record per instance, enqueued by the tags code).
- ``state`` moves ``queued -> sending -> done``, or back to ``queued`` with a later
  ``next_attempt_at`` (``retry_later``), or to ``failed`` (non-retryable error, or
  the last attempt). ``failed`` and ``done`` records can be requeued.
- ``fingerprint`` is the digest of the SOP UID set that was delivered
  (``StudyIdentity.fingerprint()``).

The rules every implementation keeps (SQLite now, PostgreSQL next; several
processes may share one queue, so nothing here relies on in-memory state):

``enqueue(new)``
    Idempotent. A record that is queued stays as it is. A ``done`` record is
    requeued unless ``new.fingerprint`` equals the delivered fingerprint (an unknown
    fingerprint, ``None``, always requeues: "something changed, check again").
    A ``failed`` record is requeued. A ``sending`` record gets ``rerun`` set: when
    its current send finishes it goes back to ``queued`` instead of ``done``.
``lease(destination, n, lease_seconds, owner)``
    Claims up to ``n`` due records atomically (``UPDATE … WHERE state='queued' …
    RETURNING``; PostgreSQL adds ``FOR UPDATE SKIP LOCKED``), sets them ``sending``
    with a lease token and a lease expiry, and counts the attempt. A ``sending``
    record whose lease expired (its node died) is due again.
``done / retry_later / fail``
    Apply only while the caller still holds the lease (same token); otherwise they
    return ``False`` and change nothing, so a slow worker whose lease expired cannot
    overwrite the work of the node that took the job over.
``release(job, error)``
    Puts a leased record back to ``queued``, due at once, *without* counting the
    attempt: the destination is on hold (a sink whose token Splunk refuses), the
    job itself did nothing wrong. Lease rules as for ``done``.
``recover(owner)``
    After a restart: this node's ``sending`` records (and any expired lease) go
    back to ``queued``.
``prune(kind, before)``
    Deletes old ``done`` records of a kind that needs no memory of them (``tags``:
    the sink's ledger knows what it holds), folding them into per-destination totals
    so ``stats()`` stays cumulative while the table stays small.
``enqueue_many(jobs, meta={...})``
    Also sets the ``meta`` keys, in the same transaction where the implementation
    can (SQLite does): a producer that reads a change log stores its cursor together
    with the jobs the changes produced.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dicomsync import options
from dicomsync.config import is_finite_number
from dicomsync.errors import ConfigError

State = Literal["queued", "sending", "done", "failed"]
STATES: tuple[State, ...] = ("queued", "sending", "done", "failed")
KINDS = ("study", "tags")


@dataclass(frozen=True)
class RetryOptions:
    """The options of a ``Retry`` section (``RetryPolicy.from_config``); the ranges
    (``BaseDelay > 0``, ``MaxDelay >= BaseDelay``) are the policy's own check."""

    base_delay: float = options.option(
        "BaseDelay",
        "seconds",
        "backoff: attempt *k* waits between d/2 and d, d = min(`MaxDelay`, `BaseDelay`·2^(k-1))",
        default=5.0,
    )
    max_delay: float = options.option(
        "MaxDelay", "seconds", "the longest wait (at least `BaseDelay`)", default=600.0
    )
    max_attempts: int = options.option(
        "MaxAttempts", "int", "attempts before a job fails", default=10, low=1
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": attempt k waits between d/2 and d,
    where d = min(max_delay, base_delay * 2**(k-1)). Delays therefore never shrink
    from one attempt to the next. After ``max_attempts`` attempts a job fails."""

    base_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        # The plugin's Retry comes from Orthanc's JSON, which may pass an overflowed 1e999
        # through as infinity: refuse non-finite numbers (and booleans) here, whatever the
        # caller. NaN would pass every comparison below.
        for name, value in (("BaseDelay", self.base_delay), ("MaxDelay", self.max_delay)):
            if not is_finite_number(value):
                raise ConfigError(f"Retry: {name} must be a finite number of seconds")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError("Retry: MaxAttempts must be an integer")
        if self.base_delay <= 0 or self.max_delay < self.base_delay or self.max_attempts < 1:
            raise ConfigError(
                "Retry: need BaseDelay > 0, MaxDelay >= BaseDelay and MaxAttempts >= 1 "
                f"(got {self.base_delay}, {self.max_delay}, {self.max_attempts})"
            )

    @classmethod
    def from_config(cls, section: Any) -> RetryPolicy:
        """The ``Retry`` section (None: the defaults), checked with ``RetryOptions``."""
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ConfigError("Retry must be an object {BaseDelay, MaxDelay, MaxAttempts}")
        extra = options.unknown(section, options.names(RetryOptions))
        if extra:
            raise ConfigError(f"Retry: unknown option(s) {', '.join(extra)}")
        opts = options.parse(RetryOptions, section, "Retry")
        return cls(opts.base_delay, opts.max_delay, opts.max_attempts)

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        exponent = min(max(attempts, 1) - 1, 60)
        ceiling = min(self.max_delay, self.base_delay * (2.0**exponent))
        return ceiling / 2 + rng() * ceiling / 2


@dataclass(frozen=True)
class NewJob:
    """What a producer enqueues. ``fingerprint`` is the content's current digest if known."""

    kind: str
    resource: str
    destination: str
    study_uid: str = ""
    fingerprint: str | None = None


@dataclass
class Job:
    """One queue record."""

    id: int
    kind: str
    resource: str
    destination: str
    study_uid: str = ""
    state: State = "queued"
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    fingerprint: str = ""
    delivered_count: int = 0
    rerun: bool = False
    lease_owner: str = ""
    lease_token: str = ""
    lease_expires_at: float | None = None
    queued_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The JSON shape shown by ``/dicomsync/jobs``."""
        now = time.time() if now is None else now
        data = asdict(self)
        data.pop("lease_token")
        data["retry_delay"] = (
            round(self.next_attempt_at - self.updated_at, 3)
            if self.state == "queued" and self.attempts > 0
            else None
        )
        data["due_in"] = (
            round(max(0.0, self.next_attempt_at - now), 3) if self.state == "queued" else None
        )
        return data


EnqueueAction = Literal["created", "requeued", "unchanged", "rerun"]


@dataclass(frozen=True)
class Enqueued:
    job_id: int
    action: EnqueueAction


@dataclass
class DestinationStats:
    destination: str
    queued: int = 0
    sending: int = 0
    done: int = 0
    failed: int = 0
    delivered: int = 0
    oldest_queued_age: float | None = None
    last_error: str = ""
    last_error_at: float | None = None
    kinds: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """Jobs not yet delivered or failed."""
        return self.queued + self.sending

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["depth"] = self.depth
        return data


Listener = Callable[[str], None]


class Queue(ABC):
    """See the module docstring for the rules."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self._listeners: list[Listener] = []

    # --- notification (in-process wake-ups; other processes rely on polling) -------------
    def subscribe(self, listener: Listener) -> None:
        """``listener(destination)`` is called after a job of that destination becomes due."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, destinations: Iterable[str]) -> None:
        for destination in set(destinations):
            for listener in list(self._listeners):
                listener(destination)

    # --- producers ------------------------------------------------------------------
    @abstractmethod
    def enqueue(self, new: NewJob) -> Enqueued: ...

    def enqueue_many(
        self, jobs: Sequence[NewJob], *, meta: Mapping[str, str] | None = None
    ) -> list[Enqueued]:
        results = [self.enqueue(j) for j in jobs]
        for key, value in (meta or {}).items():
            self.set_meta(key, value)
        return results

    # --- consumers ------------------------------------------------------------------
    @abstractmethod
    def lease(
        self,
        destination: str,
        n: int = 1,
        lease_seconds: float = 300.0,
        *,
        owner: str = "",
        kind: str | None = None,
    ) -> list[Job]: ...

    @abstractmethod
    def extend(self, jobs: Sequence[Job], lease_seconds: float) -> int:
        """Push the lease expiry of jobs still held; returns how many were extended."""

    @abstractmethod
    def done(self, job: Job, fingerprint: str, delivered: int = 0) -> bool: ...

    def done_many(self, results: Sequence[tuple[Job, str, int]]) -> list[bool]:
        """``done(job, fingerprint, delivered)`` for each, in one transaction where the
        backend can (a batch lane finishes many jobs at once); one answer per job."""
        return [self.done(job, fingerprint, delivered) for job, fingerprint, delivered in results]

    @abstractmethod
    def retry_later(
        self, job: Job, error: str, *, delay: float | None = None, delivered: int = 0
    ) -> bool:
        """Back to ``queued`` after the policy's delay; ``failed`` after the last attempt.
        ``delivered``: instances this failed attempt still wrote (added to the job's count)."""

    @abstractmethod
    def fail(self, job: Job, error: str, *, delivered: int = 0) -> bool: ...

    @abstractmethod
    def release(self, job: Job, error: str) -> bool:
        """Back to ``queued`` and due now, the attempt not counted (the destination is on hold)."""

    # --- operators ------------------------------------------------------------------
    @abstractmethod
    def requeue(self, ids: Iterable[int]) -> int:
        """Make these jobs due now with a fresh attempt count; returns how many changed."""

    @abstractmethod
    def requeue_failed(self, destination: str | None = None) -> int: ...

    @abstractmethod
    def recover(self, owner: str = "") -> int:
        """Take back ``sending`` jobs of ``owner`` (all, if empty) and any expired lease."""

    def prune(self, kind: str, before: float) -> int:
        """Forget ``done`` jobs of ``kind`` last changed before ``before`` (epoch seconds),
        keeping their counts in ``stats()``. For kinds whose done records carry nothing the
        destination does not keep itself (``tags``: the sink's ledger). Returns how many."""
        return 0

    # --- readers --------------------------------------------------------------------
    @abstractmethod
    def get(self, job_id: int) -> Job | None: ...

    @abstractmethod
    def find(self, kind: str, resource: str, destination: str) -> Job | None: ...

    @abstractmethod
    def fingerprints(self, destination: str, kind: str = "study") -> dict[str, str]:
        """resource -> delivered fingerprint of the ``done`` jobs of a destination."""

    @abstractmethod
    def jobs(
        self,
        state: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        *,
        kind: str | None = None,
    ) -> list[Job]: ...

    @abstractmethod
    def stats(self, kind: str | None = None) -> dict[str, DestinationStats]:
        """Per destination; only jobs of ``kind`` when given."""

    @abstractmethod
    def next_due(self, destination: str, kind: str | None = None) -> float | None:
        """Epoch time at which the next queued job of the destination is due (None: none)."""

    # --- small key/value store (cursors) ------------------------------------------------
    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    def close(self) -> None:  # noqa: B027
        pass


def check_state(state: str | None) -> None:
    if state is not None and state not in STATES:
        from dicomsync.errors import QueueError

        raise QueueError(f"unknown state {state!r} (one of: {', '.join(STATES)})")
