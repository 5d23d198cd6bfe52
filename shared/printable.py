"""Text for a terminal or a log line: nothing in it can change how the output reads.

Names come from folders, zip members, DICOM values and remote servers, so they may hold
a newline (a forged log line), ``\\r`` or an ANSI escape (a rewritten terminal line),
U+202E (right-to-left override: ``abc\\u202egpj.exe`` displays as ``abcexe.jpg``), or a
lone surrogate (the ``os.fsdecode`` of bytes that are not UTF-8). ``shown`` escapes
every character that ``str.isprintable`` rejects: Unicode categories Cc, Cf, Cs, Co,
Cn, Zl, Zp and every Zs other than the plain space. They become ``\\xNN``, ``\\uNNNN``
or ``\\UNNNNNNNN``, as in a Python string literal; everything else (letters of any
script, accents, punctuation, backslashes) is kept as it is.

Every line the CLI prints goes through ``shown`` (``dicomsync.cli.common.echo``), and
the log handlers of the CLI and of the plugin format with ``PrintableFormatter``, so
one log record is one line (a traceback's lines follow it, indented).
"""

from __future__ import annotations

import logging

__all__ = ["PrintableFormatter", "escape_char", "json_printable", "shown"]


def escape_char(ch: str) -> str:
    """``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN`` for one character."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (see the module docstring)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # the common case: one C-level scan
        return s
    return "".join(ch if ch.isprintable() else escape_char(ch) for ch in s)


def json_printable(text: str) -> str:
    """JSON text (from ``json.dumps(..., ensure_ascii=False)``) with non-printable characters
    inside its strings written as JSON ``\\uNNNN`` escapes: still valid JSON, decoding to the
    same values. Newlines and spaces outside strings (the indentation) stay; inside strings
    ``json.dumps`` has already escaped every control character below U+0020.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == "\n":
            out.append(ch)
            continue
        code = ord(ch)
        if code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:  # a surrogate pair, as JSON spells characters beyond the BMP
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)


class PrintableFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose message part is escaped with ``shown``: a record is one line.

    A traceback or stack that follows (``exc_info``, ``stack_info``) keeps its lines, each
    escaped and indented by four spaces, so it can never pass for a log line of its own.
    The record itself is not modified (other handlers see it unchanged).
    """

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg = shown(record.getMessage())
        copy.args = None
        copy.exc_text = None  # another handler's formatter may have cached an unescaped one
        return super().format(copy)

    def formatException(self, ei: object) -> str:
        return _indented(super().formatException(ei))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + shown(line) for line in text.split("\n"))
