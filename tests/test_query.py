from __future__ import annotations

import pytest

from dicomsync.errors import QueryError
from dicomsync.query import StudyQuery


@pytest.mark.parametrize(
    ("text", "patient", "study", "expected"),
    [
        ("p:*", "patient1", "study1", True),
        ("p:patient1*", "patient1", "study2", True),
        ("p:patient1*", "patient2", "study1", False),
        ("p:*study1", "patient2", "study1", True),
        ("p:*study1", "patient2", "study11", False),
        ("p:patient1/study2", "patient1", "study2", True),
        ("p:patient1/study2", "patient1", "study21", False),
        ("p:*/study [1]", "x", "study [1]", True),
        ("p:*/study [1]", "x", "study 1", False),
        ("p:*/study?", "x", "study1", False),
        ("p:*/study?", "x", "study?", True),
        ("p:a.b/*", "axb", "s", False),
        ("p:a.b/*", "a.b", "s", True),
        ("p:*/*", "p", "s", True),
    ],
)
def test_literal_globs(text: str, patient: str, study: str, expected: bool) -> None:
    assert StudyQuery.parse(text).matches(patient, study) is expected


def test_place_globs() -> None:
    q = StudyQuery.parse("*:*")
    assert q.matches_place("anything") and q.matches("a", "b")
    assert StudyQuery.parse("my_*:*").matches_place("my_studies")
    assert not StudyQuery.parse("my_studies:*").matches_place("my_studies2")


@pytest.mark.parametrize("text", ["nocolon", ":*", "p:", "p:a/b/c", "p:/s", "p:a/"])
def test_malformed(text: str) -> None:
    with pytest.raises(QueryError) as err:
        StudyQuery.parse(text)
    assert "expected <place>:<patient>/<study>" in str(err.value)
    assert "\n" not in str(err.value)
