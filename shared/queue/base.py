"""The durable job queue: its rules, written once, and the retry policy.

One record per ``(kind, resource, destination)`` (``dicomsync.queue.records``):
``kind`` ``"study"`` routes an Orthanc study to a place; ``"tags"`` feeds a sink (one
record per instance, enqueued by the tags feed). A study job's success records the
``fingerprint`` of what was delivered; a tags job's records an ``outcome``
(``records.SinkDelivered``), never a fingerprint.

The state machine
-----------------
A record is created ``queued`` (attempts 0, due now). Every change after that is one of
the transitions below, applied in one transaction, to a record whose state is in
"from" (otherwise nothing changes and the caller hears ``False``). "held" means the
caller must still hold the record's lease: the same lease token, the record still
``sending``. So a slow worker whose lease expired cannot overwrite the work of the node
that took the job over. ``a / b``: ``b`` when the record's ``rerun`` flag is set (it
was enqueued again while it was being sent), ``a`` otherwise. Every transition but
``extend`` sets ``updated_at``.

==========  ===============  =====  ===============  ========  ===============  ========
transition  from             lease  to               attempts  next_attempt_at  lease
==========  ===============  =====  ===============  ========  ===============  ========
requeue     done, failed     -      queued           0         now              kept
rerun       sending          -      sending          kept      kept             kept
hurry       queued           -      queued           0         now              kept
lease       queued, sending  -      sending          +1        kept             taken
extend      sending          held   sending          kept      kept             extended
done        sending          held   done / queued    kept / 0  now              cleared
retry       sending          held   queued           kept      now + delay      cleared
fail        sending          held   failed / queued  kept / 0  kept / now       cleared
release     sending          held   queued           -1        now              cleared
recover     sending          -      queued           kept      now              cleared
==========  ===============  =====  ===============  ========  ===============  ========

``RULES`` (``dicomsync.queue.rules``) is this table as data; ``tests/test_queue.py`` checks the two
agree. What else each transition writes, and who calls it:

``requeue``: ``queued_at`` now, ``last_error`` and ``rerun`` cleared, ``study_uid``
    replaced when the caller knows one. ``enqueue`` of a ``failed`` record, or of a
    ``done`` one unless ``new.fingerprint`` equals the delivered fingerprint (an
    unknown fingerprint, ``None``, always requeues: "something changed, check again");
    ``requeue(ids)``; ``requeue_failed`` (failed records only).
``rerun``: sets ``rerun``: when the current send finishes (``done`` or ``fail``), the
    record goes back to ``queued`` with a fresh attempt count and ``queued_at`` now.
    ``enqueue`` or ``requeue(ids)`` of a ``sending`` record.
``hurry``: ``last_error`` cleared, ``queued_at`` kept. ``requeue(ids)`` of a queued record.
    (``enqueue`` of a queued record changes nothing: it is already waiting.)
``lease``: claims up to ``n`` *due* records of a destination (and kind) in one
    statement, oldest ``next_attempt_at`` first; sets ``lease_owner``, a fresh
    ``lease_token`` and ``lease_expires_at`` = now + lease seconds. Due: ``queued`` with
    ``next_attempt_at`` <= now, or ``sending`` with ``lease_expires_at`` < now (its node
    died). PostgreSQL adds ``FOR UPDATE SKIP LOCKED`` to the claim.
``extend``: ``lease_expires_at`` = now + lease seconds (the worker's heartbeat).
``done``: records ``fingerprint`` and ``outcome``, adds the attempt's instances to
    ``delivered_count``, clears ``last_error`` and ``rerun``.
``retry``: ``retry_later``: the delay is ``RetryPolicy.delay(attempts)`` unless the
    caller gives one; records ``last_error``, adds ``delivered``. A record that already
    had ``policy.max_attempts`` attempts takes ``fail`` instead ("gave up after n").
``fail``: records ``last_error``, adds ``delivered``; ``queued_at`` now on a rerun.
``release``: the destination is on hold (a sink whose token Splunk refuses), the job did
    nothing wrong: back to ``queued`` without counting the attempt (never below 0).
``recover(owner)``: after a restart, this node's ``sending`` records (every one when
    ``owner`` is empty) and any expired lease go back to ``queued``.

Not transitions: ``prune(kind, before)`` deletes ``done`` records last changed before
``before``, folding them into per-destination totals so ``stats()`` stays cumulative while
the table stays small. A ``tags`` record leaves nothing (the sink's ledger knows what it
holds); a ``study`` record leaves what duplicate avoidance needs (its id, fingerprint,
outcome, delivered count): ``enqueue`` and ``fingerprints`` still see it, and enqueuing it
with another fingerprint brings the same record back and requeues it. ``get``, ``jobs`` and
``requeue(ids)`` no longer see a pruned record. The service prunes done study jobs after
``STUDY_JOBS_KEPT``. ``enqueue_many(jobs, meta={...})`` sets the ``meta`` keys in the same
transaction as the jobs: a producer that reads a change log stores its cursor together
with the jobs the changes produced.

Backends implement storage, not rules: a ``Transaction`` (find, insert, apply a
``Rule`` to one record or to the records a ``Where`` selects, set a meta key) and the
readers. ``Queue`` here implements every producer, consumer and operator method on top
of them, so SQLite (``queue.sqlite``) and PostgreSQL (next) keep the same rules.
Several processes may share one queue: nothing relies on in-memory state. Thread-safe:
a backend's transactions serialise writers; listeners are called on the writer's thread
after its commit. Methods raise ``QueueError`` when the storage fails.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from dicomsync.queue.records import (
    KINDS,
    SINK_OUTCOMES,
    STATES,
    DestinationStats,
    Enqueued,
    Job,
    NewJob,
    State,
    Success,
    check_state,
)
from dicomsync.queue.retry import RetryOptions, RetryPolicy
from dicomsync.queue.rules import (
    DONE,
    EXTEND,
    FAIL,
    HURRY,
    LEASE,
    RECOVER,
    RELEASE,
    REQUEUE,
    RERUN,
    RETRY,
    RULES,
    Rule,
    Transaction,
    Where,
    enqueue_rule,
)

__all__ = ["KINDS", "SINK_OUTCOMES", "STATES", "DestinationStats", "Enqueued", "Job", "NewJob"]
__all__ += [
    "RULES",
    "Queue",
    "RetryOptions",
    "RetryPolicy",
    "Rule",
    "State",
    "Transaction",
    "Where",
    "check_state",
]

log = logging.getLogger(__name__)

STUDY_JOBS_KEPT = 86400.0  # seconds a done study job stays listed before it is pruned


Listener = Callable[[str], None]


class Queue(ABC):
    """The rules of the module docstring over a backend's ``Transaction`` and readers."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self._listeners: list[Listener] = []

    # --- storage (the backend) ------------------------------------------------------------
    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction (writers wait for each other)."""

    @abstractmethod
    def _peek(self, new: NewJob) -> tuple[int, State, str] | None:
        """``Transaction.find`` outside a transaction (the enqueue fast path)."""

    def _peek_many(self, jobs: Sequence[NewJob]) -> list[tuple[int, State, str] | None]:
        """``_peek`` of each job (a backend may look them up together)."""
        return [self._peek(new) for new in jobs]

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
    def enqueue(self, new: NewJob) -> Enqueued:
        return self.enqueue_many([new])[0]

    def enqueue_many(
        self,
        jobs: Sequence[NewJob],
        *,
        meta: Mapping[str, str] | None = None,
        meta_max: Mapping[str, int] | None = None,
    ) -> list[Enqueued]:
        """``meta`` is set in the jobs' transaction; each ``meta_max`` key is raised to its
        value, never lowered (a cursor several nodes move)."""
        if not jobs and not meta and not meta_max:
            return []
        results: list[Enqueued | None] = [None] * len(jobs)
        todo: list[int] = []
        for i, (new, row) in enumerate(zip(jobs, self._peek_many(jobs), strict=True)):
            # the fast path, without the write lock
            if row is not None and enqueue_rule(row[1], row[2], new) is None:
                results[i] = Enqueued(row[0], "unchanged")
            else:
                todo.append(i)
        woken: list[str] = []
        if todo or meta or meta_max:
            with self._transaction() as tx:
                created = tx.insert_many([jobs[i] for i in todo])
                for i, job_id in zip(todo, created, strict=True):
                    done = results[i] = (
                        Enqueued(job_id, "created")
                        if job_id is not None
                        else self._enqueue(tx, jobs[i])
                    )
                    if done.action in ("created", "requeued"):
                        woken.append(jobs[i].destination)
                for key, value in (meta or {}).items():
                    tx.set_meta(key, value)
                for key, number in (meta_max or {}).items():
                    tx.raise_meta(key, number)
        self._notify(woken)
        return [r for r in results if r is not None]

    @staticmethod
    def _enqueue(tx: Transaction, new: NewJob) -> Enqueued:
        row = tx.find(new.kind, new.resource, new.destination)
        if row is None:
            job_id = tx.insert(new)
            if job_id is not None:
                return Enqueued(job_id, "created")
            # another node inserted it since (PostgreSQL): the rules as for any record
            row = tx.find(new.kind, new.resource, new.destination)
            assert row is not None
        rule = enqueue_rule(row[1], row[2], new)
        if rule is None:
            return Enqueued(row[0], "unchanged")
        tx.apply(rule, row[0], {"study_uid": new.study_uid})
        return Enqueued(row[0], "rerun" if rule is RERUN else "requeued")

    # --- consumers ------------------------------------------------------------------
    def lease(
        self,
        destination: str,
        n: int = 1,
        lease_seconds: float = 300.0,
        *,
        owner: str = "",
        kind: str | None = None,
    ) -> list[Job]:
        where = Where(destination=destination, kind=kind or None, due=True, limit=max(1, n))
        with self._transaction() as tx:
            args = {"owner": owner, "token": uuid.uuid4().hex, "expires": tx.now + lease_seconds}
            jobs = tx.apply_where(LEASE, where, args)
        return sorted(jobs, key=lambda j: (j.next_attempt_at, j.id))

    def extend(self, jobs: Sequence[Job], lease_seconds: float) -> int:
        """Push the lease expiry of jobs still held; returns how many were extended."""
        if not jobs:
            return 0
        with self._transaction() as tx:
            expires = tx.now + lease_seconds
            count = sum(
                tx.apply(EXTEND, job.id, {"expires": expires}, job.lease_token) is not None
                for job in jobs
            )
        for job in jobs:
            job.lease_expires_at = expires
        return count

    def done(
        self, job: Job, fingerprint: str = "", delivered: int = 0, *, outcome: str = "delivered"
    ) -> bool:
        """A success: a study job records ``fingerprint``; other kinds an ``outcome``
        (``records.SINK_OUTCOMES``) and no fingerprint (``ValueError``)."""
        return self._done([(job, fingerprint, outcome, delivered)])[0]

    def done_many(self, results: Sequence[tuple[Job, Success]]) -> list[bool]:
        """``done`` for each ``(job, Delivered or SinkDelivered)``, in one transaction (a batch
        lane finishes many jobs at once); one answer per job."""
        return self._done([(job, r.fingerprint, r.outcome, r.sent) for job, r in results])

    def _done(self, results: Sequence[tuple[Job, str, str, int]]) -> list[bool]:
        for job, fingerprint, _, _ in results:
            if fingerprint and job.kind != "study":
                raise ValueError(f"a {job.kind} job records an outcome, not a fingerprint")
        answers: list[bool] = []
        rerun: dict[str, None] = {}
        with self._transaction() as tx:
            for job, fingerprint, outcome, sent in results:
                args = {"fingerprint": fingerprint, "outcome": outcome, "delivered": max(0, sent)}
                row = tx.apply(DONE, job.id, args, job.lease_token)
                answers.append(row is not None)
                if row is not None and row[0] == "queued":
                    rerun[job.destination] = None
        for (job, _, _, _), ok in zip(results, answers, strict=True):
            if not ok:
                _lease_lost(job, "done")
        if rerun:
            self._notify(rerun)
        return answers

    def retry_later(
        self, job: Job, error: str, *, delay: float | None = None, delivered: int = 0
    ) -> bool:
        """Back to ``queued`` after the policy's delay; ``failed`` after the last attempt.
        ``delivered``: instances this failed attempt still wrote (added to the job's count)."""
        if job.attempts >= self.policy.max_attempts:
            return self.fail(
                job, f"{error} (gave up after {job.attempts} attempts)", delivered=delivered
            )
        wait = self.policy.delay(job.attempts) if delay is None else max(0.0, delay)
        args = {"delay": wait, "error": error[:2000], "delivered": max(0, delivered)}
        return bool(self._finish(RETRY, job, args))

    def fail(self, job: Job, error: str, *, delivered: int = 0) -> bool:
        state = self._finish(FAIL, job, {"error": error[:2000], "delivered": max(0, delivered)})
        if state == "queued":  # enqueued again while this send ran: not forgotten
            self._notify([job.destination])
        return bool(state)

    def release(self, job: Job, error: str) -> bool:
        """Back to ``queued`` and due now, the attempt not counted (the destination is on hold)."""
        return bool(self._finish(RELEASE, job, {"error": error[:2000]}))

    def _finish(self, rule: Rule, job: Job, args: Mapping[str, Any]) -> str:
        """A held rule on ``job``: its new state, or '' when the lease was lost."""
        with self._transaction() as tx:
            row = tx.apply(rule, job.id, args, job.lease_token)
        if row is None:
            _lease_lost(job, rule.name)
            return ""
        return row[0]

    # --- operators ------------------------------------------------------------------
    def requeue(self, ids: Iterable[int]) -> int:
        """Make these jobs due now with a fresh attempt count; returns how many changed."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        changed = 0
        destinations: list[str] = []
        with self._transaction() as tx:
            for job_id in ids:
                row = tx.state_of(job_id)
                if row is None:
                    continue
                rule = {"sending": RERUN, "queued": HURRY}.get(row[0], REQUEUE)
                tx.apply(rule, job_id, {"study_uid": ""})
                if rule is not RERUN:
                    destinations.append(row[1])
                changed += 1
        self._notify(destinations)
        return changed

    def requeue_failed(self, destination: str | None = None) -> int:
        where = Where(destination=destination or None, states=("failed",))
        with self._transaction() as tx:
            jobs = tx.apply_where(REQUEUE, where, {"study_uid": ""})
        self._notify(j.destination for j in jobs)
        return len(jobs)

    def recover(self, owner: str = "") -> int:
        """Take back ``sending`` jobs of ``owner`` (all, if empty) and any expired lease."""
        with self._transaction() as tx:
            jobs = tx.apply_where(RECOVER, Where(owner=owner), {})
        if jobs:
            log.info("took back %d job(s) left 'sending' by a previous run", len(jobs))
        self._notify(j.destination for j in jobs)
        return len(jobs)

    def prune(self, kind: str, before: float) -> int:
        """Forget ``done`` jobs of ``kind`` last changed before ``before`` (epoch seconds),
        keeping their counts in ``stats()``. For kinds whose done records carry nothing the
        destination does not keep itself (``tags``: the sink's ledger), or whose memory the
        backend keeps apart (``study``: see the module docstring). Returns how many."""
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

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as tx:
            tx.set_meta(key, value)

    def close(self) -> None:  # noqa: B027
        pass


def _lease_lost(job: Job, what: str) -> None:
    log.warning(
        "job %d (%s -> %s): lease lost before %s", job.id, job.resource, job.destination, what
    )
