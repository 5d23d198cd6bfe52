"""The retry policy of failed jobs (``RetryPolicy``, whose ``delay`` is the one backoff
formula of the project) and the options of its ``Retry`` section (``RetryOptions``).
Immutable, thread-safe; ``ConfigError`` for a bad section."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicomsync import options
from dicomsync.config import is_finite_number
from dicomsync.errors import ConfigError


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
