"""Every state-changing REST endpoint refuses what a browser marks as cross-site.

A browser that holds a saved Orthanc login sends it with any form another site's page
submits; ``rest_common.cross_site`` refuses those requests before any endpoint runs,
while curl and scripts (which send neither ``Sec-Fetch-Site`` nor ``Origin``) keep working.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_console import HOSTILE, hostile_service

from dicomsync.service.rest_common import cross_site

POSTS = ["retry-failed", "jobs/1/retry", "send", "backfill", "sinks/nope/restart"]

CROSS = [
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},  # another host of the same site is another origin
    {"Sec-Fetch-Site": "Cross-Site"},
    {"origin": "https://evil.example", "host": "127.0.0.1:8042"},
    {"origin": "null", "host": "127.0.0.1:8042"},  # a file:// page or a sandboxed frame
    {"origin": "http://127.0.0.1:8043", "host": "127.0.0.1:8042"},  # another port
    {"sec-fetch-site": "cross-site", "origin": "http://127.0.0.1:8042", "host": "127.0.0.1:8042"},
]

SAME = [
    None,  # curl, scripts
    {},
    {"sec-fetch-site": "same-origin"},
    {"sec-fetch-site": "none"},  # typed by the user
    {"origin": "http://127.0.0.1:8042", "host": "127.0.0.1:8042"},
    {"Origin": "HTTP://PACS:8042", "Host": "pacs:8042"},
    # behind a proxy that rewrites Host, the browser's own judgement decides
    {"sec-fetch-site": "same-origin", "origin": "https://pacs.example", "host": "orthanc:8042"},
]


@pytest.mark.parametrize("headers", CROSS)
@pytest.mark.parametrize("path", POSTS)
def test_a_cross_site_post_changes_nothing(
    tmp_path: Path, path: str, headers: dict[str, str]
) -> None:
    service = hostile_service(tmp_path)
    assert service.queue is not None
    reply = service.handle("POST", path, {}, b"{}", headers)
    assert reply.status == 403, reply.body
    assert reply.body == {"Message": "cross-site request refused (it comes from another site)"}
    assert service.queue.stats()[HOSTILE].failed == 1  # nothing requeued


@pytest.mark.parametrize("headers", SAME)
def test_a_same_origin_or_non_browser_post_is_served(
    tmp_path: Path, headers: dict[str, str] | None
) -> None:
    service = hostile_service(tmp_path)
    assert service.queue is not None
    reply = service.handle("POST", "retry-failed", {}, b"{}", headers)
    assert reply.status == 200 and reply.body == {"Requeued": 1}


@pytest.mark.parametrize("headers", CROSS)
def test_reads_are_never_refused(headers: dict[str, str]) -> None:
    assert cross_site("GET", headers) is None


def test_the_console_s_header_passed_the_browser_s_preflight() -> None:
    headers = {"x-dicomsync-console": "1", "origin": "https://pacs.example", "host": "o:8042"}
    assert cross_site("POST", headers) is None
