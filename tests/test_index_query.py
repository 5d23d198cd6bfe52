"""The index query language: parsing, errors, and the same answers from SQL and in memory."""

from __future__ import annotations

import pytest

from dicomsync.errors import QueryError
from dicomsync.index_query import IndexQuery


def test_parse_examples() -> None:
    q = IndexQuery.parse('SeriesDescription="Dose Record" AND "CT Dose.Mean CTDIvol">50')
    assert [(c.field, c.op, c.value, c.kind) for c in q.conditions] == [
        ("SeriesDescription", "=", "Dose Record", "text"),
        ("CT Dose.Mean CTDIvol", ">", 50.0, "number"),
    ]
    q = IndexQuery.parse("Manufacturer=SIEM* Modality!=CT StudyDate<=20240101")
    assert [c.kind for c in q.conditions] == ["glob", "text", "number"]
    assert IndexQuery.parse('"a \\"b\\""=x').conditions[0].field == 'a "b"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "Modality",
            "invalid index query 'Modality': expected an operator (=, !=, <, >, <=, >=) after 'Modality' at column 9",
        ),
        (
            "Modality=",
            "invalid index query 'Modality=': expected a value after 'Modality'= at column 10",
        ),
        (
            '"CT Dose.Mean CTDIvol>50',
            "invalid index query '\"CT Dose.Mean CTDIvol>50': unterminated quote at column 1",
        ),
        (
            "A=1 OR B=2",
            "invalid index query 'A=1 OR B=2': OR is not supported (only AND) at column 5",
        ),
        (
            "A>x*",
            "invalid index query 'A>x*': '*' globs work only with = and !=, not > at column 5",
        ),
        ("A=1 AND", "invalid index query 'A=1 AND': expected a condition after AND at column 8"),
        (
            "  ",
            'empty index query; expected FIELD OP VALUE [AND ...], e.g. Modality=SR AND "CT Dose.Mean CTDIvol">50',
        ),
    ],
)
def test_errors_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(QueryError) as info:
        IndexQuery.parse(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


EVENT = {
    "Modality": "SR",
    "StudyDate": "20240105",
    "Manufacturer": "SIEMENS",
    "SeriesDescription": "Dose [Record]?",
    "CT Dose": {"Mean CTDIvol": 55.5, "DLP": 0},
    "Sources": [{"KVP": 100.0}, {"KVP": 140.0}],
    "Empty": None,
}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Modality=SR", True),
        ("Modality=sr", False),  # case-sensitive
        ("Modality!=CT", True),
        ("Modality!=SR", False),
        ("Missing!=x", False),  # != needs the field
        ('"CT Dose.Mean CTDIvol">50', True),
        ('"CT Dose.Mean CTDIvol"<50', False),
        ('"CT Dose.DLP"=0', True),
        ("StudyDate>=20240101 AND StudyDate<20240201", True),
        ("Sources{}.KVP=140", True),
        ("Sources{}.KVP>150", False),
        ("Manufacturer=SIEM*", True),
        ("Manufacturer=*EMEN*", True),
        ('SeriesDescription="Dose [Record]?"', True),
        ('SeriesDescription="Dose [R*"', True),  # only * is special
        ('SeriesDescription="Dose ?Record*"', False),
        ("Empty=*", False),  # nulls are not indexed
    ],
)
def test_in_memory_semantics(query: str, expected: bool) -> None:
    assert IndexQuery.parse(query).matches(EVENT) is expected


def test_spl_translation() -> None:
    q = IndexQuery.parse('Manufacturer=SIEM* AND "CT Dose.Mean CTDIvol">50 AND Modality!="S\\"R"')
    assert q.to_spl("dose") == (
        'search index="dose" sourcetype="dicomsync:*"'
        " | where match('Manufacturer', \"^SIEM.*$\") AND 'CT Dose.Mean CTDIvol'>50"
        " AND (isnotnull('Modality') AND NOT ('Modality'=\"S\\\"R\"))"
        " | stats count by StudyInstanceUID"
    )
