"""StudyQuery: ``<place-glob>:<patient-glob>/<study-glob>``.

``*`` matches any run of characters (including none). Every other character is
literal: brackets, spaces, ``?`` and dots mean themselves, so a study called
``study [1]`` matches only itself.

Without a ``/`` the pattern is matched against the whole key ``patient/study``
(``*`` then also spans the ``/``), as in the original dicomsync:
- ``place:*`` is every study of the place;
- ``place:patient1*`` is every study of patient1;
- ``place:*study1`` is every study called study1, of any patient;
- ``*:*`` is every study of every place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from dicomsync.errors import QueryError

USAGE = "expected <place>:<patient>/<study>, e.g. 'my_studies:patient1/*' ('*' matches anything)"


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob where only ``*`` is special."""
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile("^" + ".*".join(parts) + "$", re.DOTALL)


def glob_match(pattern: str, value: str) -> bool:
    return glob_to_regex(pattern).match(value) is not None


@dataclass(frozen=True)
class StudyQuery:
    """``patient``/``study`` globs; with ``study`` None, ``patient`` globs the whole key."""

    place: str
    patient: str = "*"
    study: str | None = "*"

    @classmethod
    def parse(cls, text: str) -> StudyQuery:
        if not isinstance(text, str) or ":" not in text:
            raise QueryError(f"invalid query {text!r}: {USAGE}")
        place, _, rest = text.partition(":")
        if not place or not rest:
            raise QueryError(f"invalid query {text!r}: {USAGE}")
        if "/" in rest:
            patient, _, study = rest.partition("/")
            if "/" in study:
                raise QueryError(f"invalid query {text!r}: too many '/'; {USAGE}")
            if not patient or not study:
                raise QueryError(f"invalid query {text!r}: {USAGE}")
            return cls(place=place, patient=patient, study=study)
        return cls(place=place, patient=rest, study=None)

    @cached_property
    def _patient_re(self) -> re.Pattern[str]:
        return glob_to_regex(self.patient)

    @cached_property
    def _study_re(self) -> re.Pattern[str]:
        return glob_to_regex(self.study or "*")

    @cached_property
    def _place_re(self) -> re.Pattern[str]:
        return glob_to_regex(self.place)

    def matches_place(self, key: str) -> bool:
        return self._place_re.match(key) is not None

    def matches(self, patient: str, study: str) -> bool:
        if self.study is None:
            return self._patient_re.match(f"{patient}/{study}") is not None
        return (
            self._patient_re.match(patient) is not None and self._study_re.match(study) is not None
        )

    def __str__(self) -> str:
        if self.study is None:
            return f"{self.place}:{self.patient}"
        return f"{self.place}:{self.patient}/{self.study}"
