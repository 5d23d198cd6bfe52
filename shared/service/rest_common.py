"""What every ``/dicomsync/`` endpoint shares: the error, the reply, the request limits.

Request data is hostile until checked, and REST callbacks run on Orthanc's web-server
threads, whose C stack is far smaller than Python's recursion limit assumes:

- a body is refused above ``MAX_BODY`` bytes (413) or ``MAX_BODY_DEPTH`` levels of
  nesting (400) before it is parsed (``dicomsync.jsonsafe``, no recursion), and must be a
  JSON object (400); no code recurses over request data;
- values quoted back in an error are cut to ``QUOTE_LIMIT`` characters (``quote``), and
  every error message is cut to ``MAX_MESSAGE`` (``short_message``), so an error never
  echoes a large request;
- a job ID beyond SQLite's INTEGER (``MAX_JOB_ID``) is simply unknown (404).

``HttpError(status, message)`` is how a handler refuses a request; the API answers it
as ``{"Message": message}`` with that status. Everything here is pure (no state) and
thread-safe; the checks raise ``HttpError`` and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from dicomsync import jsonsafe

ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
PAGE = 1000  # studies per listing of this Orthanc
MAX_LIMIT = 10000  # jobs in one GET /dicomsync/jobs
MAX_BODY = 1 << 20  # bytes of a REST body; ours are a few hundred
MAX_BODY_DEPTH = 16  # nesting of a REST body; ours need 3
MAX_JOB_ID = (1 << 63) - 1  # SQLite's INTEGER
QUOTE_LIMIT = 64  # characters of a request value quoted back in an error
MAX_MESSAGE = 500  # characters of any error message we answer
MAX_RESOURCES = 10000  # studies in one POST /dicomsync/send
MAX_UID = 64  # characters of a DICOM UID
MAX_QUERY_KEYS = 64  # tags in a backfill "Query"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


JSON = "application/json"
CONSOLE_HEADER = "X-DicomSync-Console"  # sent only by the console's own page


@dataclass
class Reply:
    """An answer: ``status``, a JSON-able ``body``, and for 405 the ``Allow`` header. A
    body of another ``content_type`` (the console's HTML, scripts, CSV) is ``str`` or
    ``bytes``; ``headers`` are extra response headers (``Content-Type`` excluded)."""

    status: int
    body: Any
    allow: str = ""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        """The bytes to send: JSON bodies serialised, text encoded as UTF-8."""
        if self.content_type == JSON:
            return json.dumps(self.body, indent=2, default=str).encode()
        return self.body if isinstance(self.body, bytes) else str(self.body).encode()


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a request value for an error message, cut to ``limit`` characters."""
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit]) + f"… ({len(value)} characters)"
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "…"
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def short_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """The last guard on any error message: one bounded piece of text."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def camel(data: Mapping[str, Any]) -> dict[str, Any]:
    """``next_attempt_at`` -> ``NextAttemptAt``: answers look like Orthanc's own."""
    return {"".join(p.capitalize() for p in k.split("_")): v for k, v in data.items()}


def parse_body(body: bytes | None) -> dict[str, Any]:
    """The JSON object of a POST body: size and depth are checked before parsing, because
    ``json.loads`` recurses per level on a thread with a small C stack."""
    if not body or not body.strip():
        return {}
    if len(body) > MAX_BODY:
        raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
    try:
        data = jsonsafe.loads(body, max_bytes=MAX_BODY, max_depth=MAX_BODY_DEPTH)
    except ValueError as exc:  # JsonRejected; also an integer of more than 4300 digits
        reason = str(exc) if isinstance(exc, jsonsafe.JsonRejected) else "number too long"
        raise HttpError(400, f"bad JSON body: {reason}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the body must be a JSON object")
    return data


def job_id(text: str) -> int:
    """A job ID from the path; one SQLite cannot hold is simply unknown (404)."""
    number = int(text) if len(text) <= 19 else MAX_JOB_ID + 1
    if number > MAX_JOB_ID:
        raise HttpError(404, f"no job {quote(text)}")
    return number


def check_query(query: Any) -> dict[str, str | list[str]] | None:
    """A backfill ``Query``: an object of DICOM tag -> string (or list of strings), as
    Orthanc's ``/tools/find`` takes it; anything else is our 400, not Orthanc's 500."""
    if query is None:
        return None
    shape = '"Query" must be an object of DICOM tag -> string (as /tools/find)'
    if not isinstance(query, dict) or len(query) > MAX_QUERY_KEYS:
        raise HttpError(400, shape)
    for key, value in query.items():
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        if not key or not ok:
            raise HttpError(400, f"{shape}; {quote(key)} is {quote(value)}")
    return query


def parse_since(value: Any) -> str | None:
    """``2024-05-01``, ``20240501`` or ``2024-05-01T12:00:00`` -> Orthanc's ``20240501T120000``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise HttpError(400, '"Since" must be a date such as 2024-05-01 or 20240501T120000')
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y%m%dT%H%M%S"):
        try:
            return datetime.strptime(value, fmt).strftime("%Y%m%dT%H%M%S")
        except ValueError:
            continue
    raise HttpError(400, f'"Since": cannot read {quote(value)} as a date (e.g. 2024-05-01)')


def cross_site(method: str, headers: Mapping[str, str] | None) -> Reply | None:
    """403 for a request that changes something and that a browser says comes from
    another site. A saved Orthanc login would otherwise let any page its user visits
    POST a form to ``/dicomsync/retry-failed`` or ``send``.

    The browser's ``Sec-Fetch-Site`` decides when sent (anything but ``same-origin`` or
    ``none`` is refused; it names the real origins, so a proxy that rewrites ``Host``
    does not matter); older browsers send only ``Origin``, refused when its host is not
    the ``Host`` asked. A request with the console's header passed the browser's CORS
    preflight, which Orthanc never grants, so it is same-origin. Clients that are not
    browsers (curl, scripts) send none of these headers and are not affected."""
    if method in ("GET", "HEAD"):
        return None
    sent = {k.lower(): v.strip() for k, v in (headers or {}).items()}
    if sent.get(CONSOLE_HEADER.lower()) == "1":
        return None
    fetch_site = sent.get("sec-fetch-site", "").lower()
    origin = sent.get("origin", "").lower()
    if fetch_site:
        refused = fetch_site not in ("same-origin", "none")
    elif origin:
        refused = origin == "null" or urlsplit(origin).netloc != sent.get("host", "").lower()
    else:
        refused = False
    if refused:
        return Reply(403, {"Message": "cross-site request refused (it comes from another site)"})
    return None
