"""The transitions of the queue's state machine as data (``RULES``), and the storage
primitives a backend implements to apply them (``Transaction``).

``dicomsync.queue.base`` describes the state machine (its module docstring holds the
transition table, which ``tests/test_queue.py`` checks against ``RULES``) and applies it:
which transition each queue operation takes. This module says what each transition
does, column by column, in a form every SQL backend compiles into one ``UPDATE``
(``dicomsync.queue.schema.update_one``/``update_where`` for SQLite), so no backend
writes a rule of its own. The rules are immutable data, safe to share between threads,
and raise nothing; a ``Transaction`` is one thread's, and raises ``QueueError`` when its
storage fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dicomsync.queue.records import Job, NewJob, State

EffectOp = Literal["const", "now", "arg", "arg_or_keep", "add", "after", "inc", "dec"]


@dataclass(frozen=True)
class Effect:
    """What a transition writes into one column. ``value``: the constant (``const``) or the
    name of the caller's argument (``arg``: that value; ``arg_or_keep``: that value unless
    it is empty; ``add``: column + value; ``after``: now + value). ``now``: the clock at the
    transition; ``inc``/``dec``: column + 1 / column - 1, never below 0."""

    op: EffectOp
    value: Any = None

    def describe(self) -> str:
        """The cell of the docstring's table."""
        if self.op == "const":
            return str(self.value)
        return {"now": "now", "after": f"now + {self.value}", "inc": "+1", "dec": "-1"}.get(
            self.op, str(self.value)
        )


NOW = Effect("now")
INC = Effect("inc")
DEC = Effect("dec")


def const(value: Any) -> Effect:
    return Effect("const", value)


def arg(name: str) -> Effect:
    return Effect("arg", name)


@dataclass(frozen=True)
class Rule:
    """One transition: legal from ``sources`` (and, when ``held``, only for the lease holder);
    ``sets`` column -> effect; ``on_rerun`` replaces some of them when the record's ``rerun``
    flag is set; ``touch``: also ``updated_at`` = now."""

    name: str
    sources: tuple[State, ...]
    held: bool
    sets: tuple[tuple[str, Effect], ...]
    on_rerun: tuple[tuple[str, Effect], ...] = ()
    touch: bool = True

    def target(self, rerun: bool = False) -> State:
        effects = dict(self.sets) | (dict(self.on_rerun) if rerun else {})
        state = effects.get("state")
        return state.value if state is not None else self.sources[0]

    def cells(self) -> tuple[str, ...]:
        """The rule's row of the docstring's table."""

        def cell(column: str, kept: str = "kept") -> str:
            effects, rerun = dict(self.sets), dict(self.on_rerun)
            plain = effects[column].describe() if column in effects else kept
            return f"{plain} / {rerun[column].describe()}" if column in rerun else plain

        sets = dict(self.sets)
        token = sets.get("lease_token")
        lease = (
            "taken"
            if token is not None and token.op == "arg"
            else "cleared"
            if token is not None
            else "extended"
            if "lease_expires_at" in sets
            else "kept"
        )
        return (
            self.name,
            ", ".join(self.sources),
            "held" if self.held else "-",
            cell("state", self.sources[0]),
            cell("attempts"),
            cell("next_attempt_at"),
            lease,
        )


def _rule(
    name: str,
    sources: tuple[State, ...],
    sets: Mapping[str, Effect],
    *,
    held: bool = False,
    on_rerun: Mapping[str, Effect] | None = None,
    touch: bool = True,
) -> Rule:
    return Rule(name, sources, held, tuple(sets.items()), tuple((on_rerun or {}).items()), touch)


_UNLEASE = {"lease_token": const(""), "lease_expires_at": const(None)}
_AGAIN = {"state": const("queued"), "attempts": const(0), "queued_at": NOW}  # a rerun's start

REQUEUE = _rule(
    "requeue",
    ("done", "failed"),
    {
        "state": const("queued"),
        "attempts": const(0),
        "next_attempt_at": NOW,
        "queued_at": NOW,
        "last_error": const(""),
        "rerun": const(0),
        "study_uid": Effect("arg_or_keep", "study_uid"),
    },
)
RERUN = _rule("rerun", ("sending",), {"rerun": const(1)})
HURRY = _rule(
    "hurry", ("queued",), {"attempts": const(0), "next_attempt_at": NOW, "last_error": const("")}
)
LEASE = _rule(
    "lease",
    ("queued", "sending"),
    {
        "state": const("sending"),
        "attempts": INC,
        "lease_owner": arg("owner"),
        "lease_token": arg("token"),
        "lease_expires_at": arg("expires"),
    },
)
EXTEND = _rule("extend", ("sending",), {"lease_expires_at": arg("expires")}, held=True, touch=False)
DONE = _rule(
    "done",
    ("sending",),
    {
        "state": const("done"),
        "next_attempt_at": NOW,
        "rerun": const(0),
        "fingerprint": arg("fingerprint"),
        "outcome": arg("outcome"),
        "delivered_count": Effect("add", "delivered"),
        "last_error": const(""),
        **_UNLEASE,
    },
    held=True,
    on_rerun=_AGAIN,
)
RETRY = _rule(
    "retry",
    ("sending",),
    {
        "state": const("queued"),
        "next_attempt_at": Effect("after", "delay"),
        "last_error": arg("error"),
        "rerun": const(0),
        "delivered_count": Effect("add", "delivered"),
        **_UNLEASE,
    },
    held=True,
)
FAIL = _rule(
    "fail",
    ("sending",),
    {
        "state": const("failed"),
        "last_error": arg("error"),
        "rerun": const(0),
        "delivered_count": Effect("add", "delivered"),
        **_UNLEASE,
    },
    held=True,
    on_rerun={**_AGAIN, "next_attempt_at": NOW},
)
RELEASE = _rule(
    "release",
    ("sending",),
    {
        "state": const("queued"),
        "attempts": DEC,
        "next_attempt_at": NOW,
        "last_error": arg("error"),
        "rerun": const(0),
        **_UNLEASE,
    },
    held=True,
)
RECOVER = _rule(
    "recover", ("sending",), {"state": const("queued"), "next_attempt_at": NOW, **_UNLEASE}
)
RULES: tuple[Rule, ...] = (
    REQUEUE,
    RERUN,
    HURRY,
    LEASE,
    EXTEND,
    DONE,
    RETRY,
    FAIL,
    RELEASE,
    RECOVER,
)


def enqueue_rule(state: State, fingerprint: str, new: NewJob) -> Rule | None:
    """The transition ``enqueue(new)`` takes on an existing record (None: it stays as it is)."""
    if state == "queued":
        return None
    if state == "done" and new.fingerprint is not None and new.fingerprint == fingerprint:
        return None
    return RERUN if state == "sending" else REQUEUE


@dataclass(frozen=True)
class Where:
    """Which records a set-wide transition touches, besides its ``sources``: of one
    ``destination``/``kind``; only ``states`` (a subset of the sources); ``due`` (see
    ``lease``); ``owner``: ``sending`` records of this lease owner (all, if empty) or with
    an expired lease; ``limit``: the first ones by ``(next_attempt_at, id)``."""

    destination: str | None = None
    kind: str | None = None
    states: tuple[State, ...] | None = None
    due: bool = False
    owner: str | None = None
    limit: int | None = None


class Transaction(ABC):
    """One write transaction of a backend: what is done through it commits together or not
    at all (an exception rolls it back; a storage failure raises ``QueueError``). Storage
    primitives only; the rules come from ``RULES``. ``now`` is the backend's clock, read once
    at the start. Used by one thread, inside ``Queue._transaction()``."""

    now: float

    @abstractmethod
    def find(self, kind: str, resource: str, destination: str) -> tuple[int, State, str] | None:
        """``(id, state, fingerprint)`` of the record, if there is one."""

    @abstractmethod
    def state_of(self, job_id: int) -> tuple[State, str] | None:
        """``(state, destination)`` of the record, if there is one."""

    @abstractmethod
    def insert(self, new: NewJob) -> int | None:
        """Create the record ``queued``, due now; its id (None: another transaction has
        created it since ``find``)."""

    def insert_many(self, news: Sequence[NewJob]) -> list[int | None]:
        """Create those records that have no record yet, none pruned either (a backend that
        can do it in one statement does): each one's id, or None (not created here; the
        caller applies the rules to it). By default none: each goes through ``find``."""
        return [None] * len(news)

    @abstractmethod
    def apply(
        self, rule: Rule, job_id: int, args: Mapping[str, Any], token: str = ""
    ) -> tuple[State, str] | None:
        """Apply ``rule`` to the record if its state is one of ``rule.sources`` (and, for a
        held rule, its lease token is ``token``): ``(new state, destination)``, or None
        when nothing changed. ``args``: the values the rule's effects name."""

    @abstractmethod
    def apply_where(self, rule: Rule, where: Where, args: Mapping[str, Any]) -> list[Job]:
        """Apply ``rule`` to every record ``where`` selects among its sources, in one
        statement; the records as they are now."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    @abstractmethod
    def raise_meta(self, key: str, value: int) -> None:
        """Set ``key`` to ``value`` unless it holds a greater number already."""
