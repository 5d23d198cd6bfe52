"""jsonsafe: untrusted JSON is measured without recursion, then parsed; one short error."""

from __future__ import annotations

import json
import threading

import pytest

from dicomsync.jsonsafe import MAX_DEPTH, JsonRejected, check_depth, loads


@pytest.mark.parametrize(
    "text",
    [
        "[" * 600 + "]" * 600,
        '{"a":' * 100 + "1" + "}" * 100,
        "[" * 100_000,  # unbalanced: still refused, never parsed
        '["x", ' + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "]",
    ],
)
def test_deep_documents_are_refused_without_parsing(text: str) -> None:
    with pytest.raises(JsonRejected, match="nested deeper"):
        loads(text)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000, "b": '\\"[[[[' * 100, "c": ["]" * 50]})
    assert loads(text)["a"] == "[" * 1000
    check_depth(text)


def test_the_limit_itself_is_accepted() -> None:
    text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(text) is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff\xfe{", "not UTF-8"),
        ('{"a": x}', "malformed JSON"),
        ("[" + "9" * 5000 + "]", "number too long"),
    ],
)
def test_bad_text_is_one_short_line_that_never_echoes_it(text: str | bytes, message: str) -> None:
    with pytest.raises(JsonRejected, match=message) as info:
        loads(text)
    assert len(str(info.value)) < 100
    assert "\n" not in str(info.value)


def test_size_is_checked_first() -> None:
    with pytest.raises(JsonRejected, match="larger than 10 bytes"):
        loads(" " * 11 + "[]", max_bytes=10)


def test_runs_on_a_small_c_stack() -> None:
    """What Orthanc's web threads have: a deep body must be refused, not overflow the stack."""
    result: list[object] = []
    old = threading.stack_size(256 * 1024)
    try:

        def run() -> None:
            try:
                loads("[" * 50_000 + "]" * 50_000)
            except JsonRejected as exc:
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(30)
    finally:
        threading.stack_size(old)
    assert result and isinstance(result[0], JsonRejected)
