"""Hostile requests against a REAL Orthanc with the plugin: nothing crashes Orthanc, every bad
request gets a short 4xx ``{"Message"}``.

REST callbacks run on Orthanc's web-server threads, whose C stack is smaller than Python's
recursion limit assumes: a 1.2 KB body nesting arrays 600 deep killed Orthanc with a
segfault in ``json.loads``. The table below goes over classes of bad input for every
endpoint (bad bodies for the POST ones, bad paths and parameters for all), and each case
checks the status, the JSON ``Message`` and that the answer stays short (an error never
echoes the request back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO
from types import ModuleType

import pytest
import requests
from pydicom.uid import generate_uid

from dicomdata import make_instance
from orthanc_server import OrthancProcess
from plugin_helpers import plugin_orthanc, settled, wait_for

pytestmark = pytest.mark.orthanc

POST_ENDPOINTS = ["send", "retry-failed", "backfill", "jobs/1/retry", "sinks/idx/restart"]
GET_ENDPOINTS = ["status", "jobs", "jobs/1", "places", "sinks", "sinks/idx"]
SHORT = 2000  # bytes: no error answer is longer (it would be quoting the request)


def deep(n: int, left: str = "[", right: str = "]") -> bytes:
    return (left * n + right * n).encode()


BAD_BODIES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "600 nested arrays": (deep(600), (400,)),
    "5,000 nested arrays": (deep(5000), (400,)),
    "600 nested objects": (b'{"a":' * 600 + b"1" + b"}" * 600, (400,)),
    "nested in a valid key": (b'{"Destination": "zips", "Resources": ' + deep(600) + b"}", (400,)),
    "not UTF-8": (b"\xff\xfe\xfa" * 10, (400,)),
    "latin-1 text": ('{"Destination": "zürich"}'.encode("latin-1"), (400,)),
    "malformed": (b"{not json", (400,)),
    "a JSON array": (b"[1, 2]", (400,)),
    "a JSON string": (b'"send"', (400,)),
    "a JSON number": (b"42", (400,)),
    "null": (b"null", (400,)),
    "a 5,000-digit number": (b'{"Destination": ' + b"9" * 5000 + b"}", (400,)),
    "larger than 1 MB": (b'{"Destination": "' + b"x" * (2 << 20) + b'"}', (413,)),
    # a valid object: the endpoints that read "Destination" refuse it, the others ignore it
    "a 900 KB string value": (
        json.dumps({"Destination": "x" * 900_000, "Resources": ["y" * 900]}).encode(),
        (400, 200),
    ),
}


def check_error(r: requests.Response, statuses: tuple[int, ...]) -> None:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json")
    assert len(r.content) < SHORT, r.text[:300]
    if r.status_code == 200:  # an endpoint that reads no body
        return
    message = r.json()["Message"]
    assert isinstance(message, str) and message


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    root = tmp_path_factory.mktemp("hardening")
    (root / "zips").mkdir()
    (root / "idx").mkdir()
    server = plugin_orthanc(
        root / "a",
        "a",
        {"zips": {"Kind": "zipped_root", "Path": str(root / "zips")}},
        [{"Destination": "zips"}],
        sync={"Sinks": {"idx": {"Kind": "sqlite_index", "Path": str(root / "idx" / "i.sqlite")}}},
    ).start()
    try:
        buf = BytesIO()
        make_instance(None, patient_id="HARD1", study_uid=generate_uid(), modality="CT").save_as(
            buf, enforce_file_format=True
        )
        server.upload(buf.getvalue())
        wait_for(lambda: settled(server, {"zips": 1}), what="the study routed")
        yield server
    finally:
        server.stop()


def alive(server: OrthancProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None, server.log_tail()
    assert requests.get(server.url + "/system", timeout=10).ok
    assert requests.get(server.url + "/dicomsync/status", timeout=10).json()["Configured"]


@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_a_short_4xx_on_every_post_endpoint(
    a: OrthancProcess, endpoint: str, case: str
) -> None:
    body, statuses = BAD_BODIES[case]
    r = requests.post(f"{a.url}/dicomsync/{endpoint}", data=body, timeout=60)
    check_error(r, statuses)
    alive(a)


def test_a_deeply_nested_body_is_refused_before_parsing(a: OrthancProcess) -> None:
    """The crash of the issue: 1.2 KB, 600 levels, to send, retry-failed and backfill."""
    for endpoint in ("send", "retry-failed", "backfill"):
        r = requests.post(f"{a.url}/dicomsync/{endpoint}", data=deep(600), timeout=60)
        check_error(r, (400,))
        assert "nested deeper" in r.json()["Message"]
    alive(a)


BAD_REQUESTS: list[tuple[str, str, bytes | None, int, str]] = [
    # (method, path, body, status, words of the message)
    ("GET", "jobs/99999999999999999999999", None, 404, "no job"),
    ("POST", "jobs/99999999999999999999999/retry", b"", 404, "no job"),
    ("GET", "jobs/9223372036854775808", None, 404, "no job"),
    ("GET", "jobs/" + "9" * 3000, None, 404, "no job"),
    ("GET", "jobs?state=" + "x" * 3000, None, 400, "unknown state"),
    ("GET", "jobs?limit=" + "9" * 5000, None, 400, "limit"),
    ("GET", "jobs?limit=99999999999999999999999", None, 400, "limit"),
    ("GET", "sinks/" + "k" * 3000, None, 404, "no sink"),
    ("POST", "sinks/" + "k" * 3000 + "/restart", b"", 404, "no sink"),
    ("GET", "x" * 3000, None, 404, "no such endpoint"),
    ("POST", "send", json.dumps({"Destination": "x" * 100_000}).encode(), 400, "destination"),
    (
        "POST",
        "send",
        json.dumps({"Destination": "zips", "Resources": ["1.2." + "3" * 500_000]}).encode(),
        400,
        "unknown study",
    ),
    (
        "POST",
        "send",
        json.dumps({"Destination": "zips", "Resources": ["1.2.3"] * 20_000}).encode(),
        400,
        "Resources",
    ),
    ("POST", "send", json.dumps({"Destination": "zips", "Resources": [1]}).encode(), 400, "list"),
    ("POST", "backfill", json.dumps({"Destination": "zips", "Query": 5}).encode(), 400, "Query"),
    (
        "POST",
        "backfill",
        json.dumps({"Destination": "zips", "Query": {"PatientID": 5}}).encode(),
        400,
        "Query",
    ),
    (
        "POST",
        "backfill",
        json.dumps({"Destination": "zips", "Query": {"PatientID": ["A", 5]}}).encode(),
        400,
        "Query",
    ),
    (
        "POST",
        "backfill",
        json.dumps({"Destination": "zips", "Query": {"PatientID": {"x": "y"}}}).encode(),
        400,
        "Query",
    ),
    (
        "POST",
        "backfill",
        json.dumps({"Destination": "zips", "Query": {"NoSuchTagAtAll": "x"}}).encode(),
        400,
        "Query",
    ),
    (
        "POST",
        "backfill",
        json.dumps({"Destination": "zips", "Since": "y" * 100_000}).encode(),
        400,
        "Since",
    ),
    ("POST", "backfill", json.dumps({"Destination": "zips", "Since": 5}).encode(), 400, "Since"),
    ("POST", "retry-failed", json.dumps({"Destination": ["zips"]}).encode(), 400, "Destination"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status_code", "words"),
    BAD_REQUESTS,
    ids=[f"{m} {p[:40]} {(b or b'')[:40]!r}" for m, p, b, _, _ in BAD_REQUESTS],
)
def test_bad_requests_get_a_short_4xx(
    a: OrthancProcess, method: str, path: str, body: bytes | None, status_code: int, words: str
) -> None:
    r = requests.request(method, f"{a.url}/dicomsync/{path}", data=body, timeout=60)
    check_error(r, (status_code,))
    assert words in r.json()["Message"], r.json()["Message"]
    alive(a)


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
def test_unknown_parameters_and_bodies_on_get_endpoints_are_ignored(
    a: OrthancProcess, endpoint: str
) -> None:
    """Parameters we do not know, with large values, and a body on a GET (never parsed)."""
    r = requests.get(
        f"{a.url}/dicomsync/{endpoint}",
        params={"bogus": "z" * 4000, "another": "\u202e" * 100},
        data=deep(600),
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]  # job 1 is the routed study, idx a sink
    assert "z" * 100 not in r.text
    alive(a)


def test_wrong_method_is_405_with_allow(a: OrthancProcess) -> None:
    """Orthanc's SDK refuses a body for 405 (SendHttpStatus raises), so the answer is the
    status and its Allow header; docs/plugin.md says so."""
    for method, path, allow in (
        ("GET", "send", "POST"),
        ("POST", "status", "GET"),
        ("DELETE", "jobs/1", "GET"),
        ("PUT", "backfill", "POST"),
    ):
        r = requests.request(method, f"{a.url}/dicomsync/{path}", timeout=30)
        assert r.status_code == 405 and r.headers["Allow"] == allow, (method, path)
    alive(a)


def test_backfill_with_a_valid_query_still_works(a: OrthancProcess) -> None:
    for query in ({"PatientID": "HARD*"}, {"PatientID": ["HARD1"]}):
        r = requests.post(
            a.url + "/dicomsync/backfill",
            json={"Destination": "zips", "Query": query},
            timeout=60,
        )
        if isinstance(query["PatientID"], list) and r.status_code == 400:
            # Orthanc versions before lists in /tools/find refuse them: our 400, not a 500
            check_error(r, (400,))
            continue
        assert r.status_code == 200, r.text
        assert r.json()["Studies"] == 1 and r.json()["AlreadyDelivered"] == 1


@pytest.fixture
def glue() -> ModuleType:
    """The REST API's pure helpers (``dicomsync.service.rest_common``: no server, no orthanc)."""
    from dicomsync.service import rest_common

    return rest_common


def test_quote_cuts_request_values(glue: ModuleType) -> None:
    assert glue.quote("x" * 10) == repr("x" * 10)
    quoted = glue.quote("x" * 1_000_000)
    assert len(quoted) < 100 and "1000000 characters" in quoted
    assert glue.quote(10**100).endswith("…") and len(glue.quote(10**100)) <= 65
    assert glue.quote([[[]]]) == "a JSON array" and glue.quote({}) == "a JSON object"
    assert len(glue.short_message("m" * 10_000)) == glue.MAX_MESSAGE


def test_job_ids_beyond_int64_are_unknown(glue: ModuleType) -> None:
    with pytest.raises(glue.HttpError) as info:
        glue.job_id("99999999999999999999999")
    assert info.value.status == 404
    assert glue.job_id(str(glue.MAX_JOB_ID)) == glue.MAX_JOB_ID
