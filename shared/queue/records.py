"""The queue's records: what a producer enqueues, what the queue stores, what a job's
success records, and the per-destination statistics.

Plain data, no I/O: every class here is safe to share between threads once built
(``Job`` is mutable, but the queue only ever hands out fresh copies) and raises
nothing but ``QueueError`` from ``check_state``.

What a finished job records depends on its kind:

- a ``study`` job ends with ``Delivered(fingerprint, sent)``: the digest of the SOP UID
  set the destination now holds (``StudyIdentity.fingerprint()``). Enqueuing the same
  study again with the same fingerprint leaves it done: this is the queue's duplicate
  avoidance, and the only use of ``Job.fingerprint``;
- a ``tags`` job (one instance, one sink) ends with ``SinkDelivered(outcome, sent)``,
  ``outcome`` one of ``SINK_OUTCOMES``: ``delivered`` (the sink holds every event of the
  instance), ``rejected`` (it holds the rest and refused at least one event for good)
  or ``gone`` (the instance was deleted before its events were computed). Its
  fingerprint stays empty.

``Job.outcome`` is what the last ``done`` recorded (``delivered`` for a study); it is
kept, like the fingerprint, when the job is queued again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

State = Literal["queued", "sending", "done", "failed"]
STATES: tuple[State, ...] = ("queued", "sending", "done", "failed")
KINDS = ("study", "tags")
SinkOutcome = Literal["delivered", "rejected", "gone"]
SINK_OUTCOMES: tuple[SinkOutcome, ...] = ("delivered", "rejected", "gone")


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
    """One queue record (a column per field in the SQL backends)."""

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
    outcome: str = ""
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


@dataclass(frozen=True)
class Delivered:
    """A study job's success: the fingerprint of what the destination now holds, and how
    many instances this attempt sent."""

    fingerprint: str
    sent: int = 0
    outcome: ClassVar[str] = "delivered"


@dataclass(frozen=True)
class SinkDelivered:
    """A sink (``tags``) job's success: what became of its instance's events (one of
    ``SINK_OUTCOMES``) and how many events the sink holds now. No fingerprint."""

    outcome: SinkOutcome
    sent: int = 0
    fingerprint: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.outcome not in SINK_OUTCOMES:
            raise ValueError(f"unknown sink outcome {self.outcome!r}")


Success = Delivered | SinkDelivered

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


def check_state(state: str | None) -> None:
    if state is not None and state not in STATES:
        from dicomsync.errors import QueueError

        raise QueueError(f"unknown state {state!r} (one of: {', '.join(STATES)})")
