"""The console's pages under ``/dicomsync/ui/``: how a page plugs in, how it is answered.

A page is a function ``page(ctx: PageContext) -> View | Reply`` in a module named in
``PAGES`` (``name -> "module:function"``, imported on first use, so a page whose module
or dependency is missing answers why instead of breaking the others). ``/dicomsync/ui/``
is the page ``""``, ``/dicomsync/ui/<name>`` the page ``name``. A ``View`` is wrapped in
the layout (``html.document``); a ``Reply`` (a CSV export, a file) is answered as is.

``Console.page`` answers pages, ``Console.static`` the static files (``assets.py``);
``RestApi`` routes ``GET ui``, ``GET ui/<name>``, ``GET ui/static/<file>``,
``GET ui/api/overview`` here, and the console's POSTs (``ui/api/jobs/{id}/retry``,
``ui/api/retry-failed``) to its own retry endpoints after ``guard``.

Cross-site requests: Orthanc's authentication is a browser's saved credential, so any
site could make the browser POST. ``guard`` refuses (403) every non-GET request under
``ui/`` without the header ``X-DicomSync-Console: 1``: our page's script sends it, and a
cross-site form cannot (a cross-site ``fetch`` with it needs a CORS preflight, which
Orthanc does not grant). Every page is answered with a Content-Security-Policy that
allows only our own scripts and styles and no framing (no clickjacking of the buttons).

Pages read the service's units, which are thread-safe; Orthanc calls from several web
threads at once. A page raises ``HttpError`` (answered as JSON) or returns its own
error view; any other exception is the API's 500.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomsync.console import assets
from dicomsync.console.html import Html, document, esc, notice
from dicomsync.errors import NotFound
from dicomsync.service.rest_common import CONSOLE_HEADER, HttpError, Reply

if TYPE_CHECKING:
    from dicomsync.service.app import Service

# Links are absolute: Orthanc drops a trailing "/" before the plugin sees the path, so
# the plugin cannot tell /dicomsync/ui from /dicomsync/ui/, which a relative link needs.
ROOT = "/dicomsync/ui/"
HTML = "text/html; charset=utf-8"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
}
# page name -> "module:function"; the navigation is html.NAV
PAGES: dict[str, str] = {
    "": "dicomsync.console.overview:page",
    "jobs": "dicomsync.console.jobs:page",
    "dose": "dicomsync.console.dose:page",
}


@dataclass(frozen=True)
class PageContext:
    """What a page function gets: the service (its ``config``, ``queue``, ``sinks``,
    ``throughput``...; ``config``/``queue`` are None while not configured), the query
    string, the prefix of the console's links (``ROOT``) and the time."""

    service: Service
    get: Mapping[str, str]
    root: str = ROOT
    now: float = field(default_factory=time.time)


@dataclass
class View:
    """A page's answer: the ``<h1>`` title, the body markup (``Html``), the nav entry
    to highlight (the page's name) and the HTTP status."""

    title: str
    body: Html
    active: str = ""
    status: int = 200


PageFn = Callable[[PageContext], "View | Reply"]


def html_reply(status: int, text: str) -> Reply:
    return Reply(status, text, content_type=HTML, headers=dict(PAGE_HEADERS))


def guard(method: str, path: str, headers: Mapping[str, str] | None) -> Reply | None:
    """403 for a console request that changes something without our header."""
    if method == "GET" or not path.strip("/").startswith("ui"):
        return None
    sent = {k.lower(): v for k, v in (headers or {}).items()}
    if sent.get(CONSOLE_HEADER.lower()) == "1":
        return None
    return Reply(
        403,
        {"Message": f"console requests must carry the {CONSOLE_HEADER} header (cross-site?)"},
    )


class Console:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._pages: dict[str, PageFn | str] = {}

    def _load(self, name: str) -> PageFn | str:
        """The page function, or why it is unavailable (cached either way)."""
        if name not in self._pages:
            module, _, fn = PAGES[name].partition(":")
            try:
                self._pages[name] = getattr(importlib.import_module(module), fn)
            except (ImportError, AttributeError) as exc:
                self._pages[name] = f"this page is not available: {type(exc).__name__}: {exc}"
        return self._pages[name]

    def page(self, name: str | None, *, get: Mapping[str, str]) -> Reply:
        """``GET ui[/name]``."""
        name = name or ""
        if name not in PAGES:
            raise HttpError(404, f"no console page {name[:64]!r}")
        fn = self._load(name)
        if isinstance(fn, str):
            view: View | Reply = View("Unavailable", notice(fn), name, 503)
        else:
            view = fn(PageContext(self.service, get))
        if isinstance(view, Reply):
            return view
        text = document(view.title, view.body, root=ROOT, active=view.active or name)
        return html_reply(view.status, text)

    def static(self, name: str, get: Mapping[str, str]) -> Reply:
        try:
            data, mime = assets.asset(name)
        except NotFound as exc:
            raise HttpError(404, str(exc)) from None
        return Reply(200, data, content_type=mime, headers={"Cache-Control": "max-age=3600"})


def error_page(title: str, message: Any, status: int = 500) -> View:
    return View(title, notice(esc(message)), status=status)
