"""The console's static files: our own (``static/``, shipped in the wheel) and Chart.js,
which is Debian's ``libjs-chart.js`` (``/usr/share/javascript/chart.js/``), installed by
``make setup``; never a CDN, so pages work without internet access.

``asset(name) -> (bytes, content type)`` serves ``/dicomsync/ui/static/<name>``; only the
names listed here exist (no path is ever built from a request). When Chart.js is not
installed, ``chart_js_problem()`` says why and what to install (every page shows it, like
pydicom's backend registry says why a handler is unavailable), and ``asset`` raises
``NotFound`` for it. ``DICOMSYNC_CHART_JS`` names another copy of ``chart.min.js``
(v3 UMD build) for systems without the Debian package.

Files are read once and kept (a few hundred KiB); thread-safe.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dicomsync.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
CHART_JS_DIR = Path("/usr/share/javascript/chart.js")
CHART_JS_NAME = "chart.min.js"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
OURS = ("console.js", "console.css")


def chart_js_path() -> Path:
    override = os.environ.get("DICOMSYNC_CHART_JS")
    return Path(override) if override else CHART_JS_DIR / CHART_JS_NAME


def chart_js_problem() -> str | None:
    """Why Chart.js cannot be served, or None when it can."""
    path = chart_js_path()
    if path.is_file():
        return None
    return (
        f"Chart.js is not installed ({path} is missing): install Debian's libjs-chart.js"
        " (apt-get install libjs-chart.js, part of make setup) or set DICOMSYNC_CHART_JS"
        " to a chart.min.js file"
    )


@functools.cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


def asset(name: str) -> tuple[bytes, str]:
    """The bytes and content type of a static file; ``NotFound`` for any other name."""
    if name == CHART_JS_NAME:
        problem = chart_js_problem()
        if problem:
            raise NotFound(problem)
        return _read(chart_js_path()), TYPES[".js"]
    if name not in OURS:
        raise NotFound(f"no static file {name[:64]!r} (files: {CHART_JS_NAME}, {', '.join(OURS)})")
    return _read(STATIC / name), TYPES[Path(name).suffix]


def text(name: str) -> str:
    return asset(name)[0].decode()


def inline_script(name: str) -> str:
    """A script's text safe inside an inline ``<script>`` (no ``</script`` can end it)."""
    return text(name).replace("</script", "<\\/script").replace("<!--", "<\\!--")
