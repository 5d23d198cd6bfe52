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


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16", "utf-32-le", "utf-32"])
def test_bytes_in_other_encodings_are_refused_before_the_scan(encoding: str) -> None:
    """In UTF-16, U+0122 is the bytes 22 01: a byte scan would take it for a quote and
    hide every bracket after it, while json.loads (which reads UTF-16 and UTF-32 bytes)
    would recurse through them."""
    body = ('["\u0122",' + "[" * 100_000).encode(encoding)
    # refused as not UTF-8, or (where the bytes happen to be valid UTF-8, with NULs) read
    # as UTF-8 text and refused as deep or malformed: never parsed as UTF-16/32
    with pytest.raises(JsonRejected):
        loads(body)
    with pytest.raises(JsonRejected):
        loads(body, max_depth=16)


def test_a_utf8_body_with_a_quote_like_character_is_still_measured() -> None:
    body = ('["\u0122",' + "[" * 100 + "]" * 100 + "]").encode()
    with pytest.raises(JsonRejected, match="nested deeper"):
        loads(body)


def test_a_utf16_body_on_a_small_stack_does_not_crash_the_process() -> None:
    """What the scan once missed: a UTF-16 body whose fake quote hid 100,000 brackets made
    json.loads recurse past a 128 KB C stack (a segfault, as on Orthanc's web threads)."""
    import subprocess
    import sys

    script = (
        "import threading\n"
        "from dicomsync.jsonsafe import JsonRejected, loads\n"
        "body = ('[\"\\u0122\",' + '[' * 100000).encode('utf-16-le')\n"
        "threading.stack_size(128 * 1024)\n"
        "out = []\n"
        "def run():\n"
        "    try:\n"
        "        loads(body, max_depth=16)\n"
        "    except JsonRejected as exc:\n"
        "        out.append(str(exc))\n"
        "t = threading.Thread(target=run); t.start(); t.join()\n"
        "print(out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.startswith(b"['")  # refused with one JsonRejected line
