"""The console's HTML building blocks: escaping, tables, charts and the page layout.

Every value shown on a page is hostile until escaped (DICOM values, error texts and
place keys come from outside): ``esc`` escapes text for an element or a quoted
attribute, and the helpers here escape every cell, label and attribute they are given
unless it is already ``Html`` (markup a helper built). Pages build markup only through
these helpers or f-strings over ``esc(...)``.

Charts are drawn by Chart.js in the browser (``chart`` puts a ``<canvas>`` and its
Chart.js configuration, as JSON in a ``<script type="application/json">`` block that the
browser never runs; ``static/console.js`` turns each into a ``Chart``). The JSON is
written with ``<``, ``>`` and ``&`` as ``\\u`` escapes, so no value can close the block.

``document(...)`` is the layout shared by every page: the navigation, the stylesheet and
the scripts, served from ``static/`` (``assets.py``), or inlined (``standalone=True``) for
a file that opens offline without Orthanc (``dicomsync dose report``). No CDN, no inline
script or style in served pages: the console's Content-Security-Policy forbids them.

Pure functions, thread-safe; they raise nothing of their own.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dicomsync.console import assets


class Html(str):
    """Markup that is already safe: helpers return it and do not escape it again."""


def esc(value: Any) -> Html:
    """``value`` as text for an element or a double-quoted attribute (``None`` -> "")."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    """Pieces joined, each escaped unless it is ``Html``."""
    return Html(sep.join(esc(p) for p in parts))


def tag(name: str, content: Any = "", **attrs: Any) -> Html:
    """``<name attrs>content</name>``: content and attribute values escaped. An attribute
    ``class_`` is ``class``; ``data_x`` is ``data-x``; ``None``/``False`` leaves it out."""
    text = "".join(
        f" {k.rstrip('_').replace('_', '-')}" + ("" if v is True else f'="{esc(v)}"')
        for k, v in attrs.items()
        if v is not None and v is not False
    )
    return Html(f"<{name}{text}>{esc(content)}</{name}>")


def table(
    headers: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    class_: str = "grid",
    empty: str = "nothing to show",
    numeric: Iterable[int] = (),
) -> Html:
    """A table; ``numeric`` column indexes are right-aligned. Cells are escaped."""
    right = set(numeric)

    def cell(kind: str, i: int, value: Any) -> str:
        return tag(kind, value, class_="num" if i in right else None)

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows]
    if not body:
        body = [f'<tr><td class="empty" colspan="{len(headers)}">{esc(empty)}</td></tr>']
    return Html(
        f'<table class="{esc(class_)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def script_json(data: Any) -> str:
    """JSON safe inside a ``<script type="application/json">`` block."""
    text = json.dumps(data, default=str, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def chart(chart_id: str, config: Mapping[str, Any], *, caption: Any = "") -> Html:
    """A Chart.js chart: ``config`` is Chart.js' own ``{"type", "data", "options"}``
    (https://www.chartjs.org/docs/3.9.1/). Labels and values are data, never markup.
    The browser's ``window.dicomsyncCharts[chart_id]`` is the ``Chart`` once drawn."""
    figcaption = tag("figcaption", caption) if caption else ""
    return Html(
        f'<figure class="chart">{figcaption}<div class="chart-box">'
        f'<canvas id="{esc(chart_id)}" data-chart="{esc(chart_id)}-config"></canvas></div>'
        f'<script type="application/json" id="{esc(chart_id)}-config">'
        f"{script_json(dict(config))}</script></figure>"
    )


def notice(text: Any, kind: str = "error") -> Html:
    """A boxed message (``error``, ``warning`` or ``info``)."""
    return tag("div", text, class_=f"notice {kind}", role="alert" if kind == "error" else None)


NAV: tuple[tuple[str, str], ...] = (("", "Overview"), ("jobs", "Jobs"), ("dose", "Dose"))


def document(
    title: str,
    body: Any,
    *,
    root: str = "",
    active: str = "",
    standalone: bool = False,
    nav: Sequence[tuple[str, str]] = NAV,
) -> str:
    """A whole page. ``root`` is the prefix of links, ``/dicomsync/ui/`` (``pages.ROOT``)
    in the console; the stylesheet, the scripts and the navigation are under it. ``standalone`` inlines
    the stylesheet and the scripts and leaves the navigation out (a file, not a site)."""
    missing = assets.chart_js_problem()
    warn = notice(f"Charts cannot be drawn: {missing}", "warning") if missing else ""
    if standalone:
        head = f"<style>{assets.text('console.css')}</style>"
        scripts = "".join(
            f"<script>{assets.inline_script(name)}</script>"
            for name in (assets.CHART_JS_NAME, "console.js")
            if not (name == assets.CHART_JS_NAME and missing)
        )
        menu = ""
    else:
        head = f'<link rel="stylesheet" href="{esc(root)}static/console.css">'
        scripts = (
            f'<script src="{esc(root)}static/{assets.CHART_JS_NAME}"></script>'
            f'<script src="{esc(root)}static/console.js"></script>'
        )
        links = "".join(
            tag("a", label, href=root + path, class_="active" if path == active else None)
            for path, label in nav
        )
        menu = f'<nav><span class="brand">dicomsync</span>{links}</nav>'
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)} · dicomsync</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{head}</head>'
        f"<body>{menu}<main><h1>{esc(title)}</h1>{warn}{esc(body)}</main>{scripts}</body></html>"
    )
