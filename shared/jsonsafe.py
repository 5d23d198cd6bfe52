"""JSON from untrusted sources, parsed with bounded size and nesting depth.

``json.loads`` recurses once per nesting level. On a thread with a small C stack
(Orthanc's web-server threads) a body of a few hundred nested ``[`` overflows the C
stack before Python's recursion limit is reached, and the whole process dies. So
every JSON we did not write ourselves (REST bodies, ``dicomsync.json``, answers of
remote servers) is first measured by ``check_depth``, which is a flat loop over the
text (no recursion at all), and only then handed to ``json.loads``.

``loads`` raises ``JsonRejected`` (a ``ValueError``) with one short line that never
quotes the input back.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting accepted; dicomsync's own documents need fewer than 10 levels."""


class JsonRejected(ValueError):
    """The text is too large, too deep, or not JSON. The message never echoes the input."""


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_KEEP = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets
_STEP = {0x5B: 1, 0x7B: 1, 0x5D: -1, 0x7D: -1}


def check_depth(text: str | bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JsonRejected`` when brackets outside strings nest deeper than ``max_depth``.

    No recursion: strings are cut out with one regular expression, every byte but
    the four brackets is dropped, and a running sum gives the depth. (The four
    brackets and the quote are ASCII, so they never occur inside a UTF-8 sequence.)
    Bytes must be UTF-8: ``json.loads`` would also read UTF-16 and UTF-32, where a
    ``"`` byte can be half of another character and hide brackets from this scan.
    """
    data = (_utf8(text) if isinstance(text, bytes) else text).encode("utf-8", "surrogatepass")
    brackets = _STRING.sub(b"", data).translate(None, _KEEP)
    if len(brackets) <= max_depth:
        return
    if max(itertools.accumulate(_STEP[b] for b in brackets)) > max_depth:
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels")


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRejected(f"not UTF-8 text (byte {exc.start})") from None


def loads(text: str | bytes, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` after checking size and depth; ``JsonRejected`` for anything bad."""
    if max_bytes is not None and len(text) > max_bytes:
        raise JsonRejected(f"JSON larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        text = _utf8(text)  # what is scanned is exactly what is parsed
    check_depth(text, max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen after check_depth; kept as a last guard
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonRejected(
            f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError:  # an integer of more digits than Python converts (4,300)
        raise JsonRejected("JSON holds a number too long to read") from None
