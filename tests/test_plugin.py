"""The plugin inside real Orthanc processes: A (plugin) routes to Orthanc B and to folders.

One A/B pair serves the module; the destination-down, crash and bad-config tests
start their own servers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from dicomdata import data, make_instance, pcir_study_files
from orthanc_server import OrthancProcess
from plugin_helpers import (
    all_files,
    counting_orthanc,
    jobs,
    metrics,
    plugin_orthanc,
    posted,
    settled,
    status,
    studies_by_id,
    study_keys,
    wait_for,
    zip_sop_uids,
)

pytestmark = pytest.mark.orthanc

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OrthancProcess, OrthancProcess, Path]]:
    root = tmp_path_factory.mktemp("plugin")
    b = counting_orthanc(root / "b", "b").start()
    for folder in ("zips", "ct", "scanner"):
        (root / folder).mkdir()
    places = {
        "b": {"Kind": "orthanc", "Url": b.url},
        "zips": {"Kind": "zipped_root", "Path": "../zips"},  # relative to A's config file
        "ct": {"Kind": "dicom_root", "Path": str(root / "ct")},
        "scanner": {"Kind": "dicom_root", "Path": str(root / "scanner")},
    }
    routes: list[dict[str, Any]] = [
        {"Destination": "b", "Concurrency": 4},
        {"Destination": "zips"},
        {"Destination": "ct", "Filter": {"Modality": ["CT", "PT"], "SOPClassUID": CT_IMAGE}},
        {"Destination": "scanner", "Filter": {"CallingAet": "SCANNER*"}},
    ]
    a = plugin_orthanc(root / "a", "a", places, routes).start()
    try:
        yield a, b, root
    finally:
        try:
            a.stop()
        finally:
            b.stop()


@pytest.fixture(scope="module")
def ingested(pair: tuple[OrthancProcess, OrthancProcess, Path]) -> dict[str, set[str]]:
    """study_tree_pcir and the PET/CT study, uploaded into A and routed everywhere."""
    a, _, _ = pair
    files = [f for fs in pcir_study_files().values() for f in fs]
    files += sorted(data("study_petct_siemens").glob("*.dcm"))
    a.upload_files(files)
    by_id = studies_by_id(a)
    assert len(by_id) == 8  # 6 pcir studies; the PET/CT UID is split over two PatientIDs
    wait_for(lambda: settled(a, {"b": 8, "zips": 8, "ct": 2}), what="every study routed")
    return by_id


def test_ingest_reaches_orthanc_b_and_one_complete_zip_per_study(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    a, b, root = pair
    assert studies_by_id(b) == ingested
    keys = study_keys(a)
    zips = all_files(root / "zips")
    assert sorted(zips) == sorted(root / "zips" / p / f"{s}.zip" for p, s in keys.values())
    for study_id, (patient, study) in keys.items():
        assert zip_sop_uids(root / "zips" / patient / f"{study}.zip") == ingested[study_id]

    st = status(a)
    assert st["Configured"] and st["ConfigError"] is None and st["Workers"]["running"]
    for dest in ("b", "zips", "ct"):
        d = st["Destinations"][dest]
        assert (d["Failed"], d["Queued"], d["Sending"]) == (0, 0, 0), (dest, d)
    assert st["Destinations"]["b"]["Delivered"] == sum(len(v) for v in ingested.values()) == 34
    assert st["Destinations"]["scanner"]["Done"] == 0  # nothing came from a SCANNER AET
    assert st["Workers"]["lanes"]["study:b"]["concurrency"] == 4
    assert all(j["State"] == "done" and j["Fingerprint"] for j in jobs(a, destination="b"))


def test_filters_route_by_modality_sop_class_and_calling_aet(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    a, _, root = pair
    routed = {j["StudyUid"] for j in jobs(a, destination="ct")}
    expected = {
        s["MainDicomTags"]["StudyInstanceUID"]
        for s in a.get("/studies?expand")
        if any(
            a.get(f"/series/{sid}")["MainDicomTags"].get("Modality") == "CT" for sid in s["Series"]
        )
    }
    assert routed == expected and len(routed) == 2
    assert len(all_files(root / "ct")) == 11  # 4 + 7 CT images

    # C-STORE from a SCANNER AET: only that study goes to the "scanner" route
    path = root / "scanner_study.dcm"
    make_instance(path, patient_id="AET-TEST", study_uid=generate_uid(), modality="OT")
    subprocess.run(
        ["storescu", "-aet", "SCANNER01", "-aec", "A", "127.0.0.1", str(a.dicom_port), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wait_for(lambda: settled(a, {"scanner": 1, "b": 9}), what="C-STORE study routed")
    assert len(all_files(root / "scanner")) == 1
    scanner_jobs = jobs(a, destination="scanner")
    assert [j["StudyUid"] for j in scanner_jobs] == [str(pydicom.dcmread(path).StudyInstanceUID)]


def test_metrics_per_destination(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    a, _, _ = pair
    total = sum(len(v) for v in ingested.values())
    depth_b = 'dicomsync_queue_depth{destination="b"}'
    m = wait_for(
        lambda: (
            (m := metrics(a)).get('dicomsync_delivered_instances{destination="b"}', 0) >= total
            and m.get(depth_b) == 0
            and m
        ),
        what="metrics published after the queue drained",
    )
    assert m["dicomsync_config_error"] == 0
    for dest in ("b", "zips", "ct", "scanner"):
        for name in (
            "queue_depth",
            "jobs_failed",
            "delivered_instances",
            "oldest_queued_age_seconds",
        ):
            assert f'dicomsync_{name}{{destination="{dest}"}}' in m
    assert m['dicomsync_queue_depth{destination="b"}'] == 0
    assert m['dicomsync_jobs_failed{destination="zips"}'] == 0
    assert m['dicomsync_delivered_instances{destination="zips"}'] >= total


def test_late_instances_only_the_new_ones_are_sent(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    a, b, root = pair
    study_uid, series_uid = generate_uid(), generate_uid()

    def upload(n: int) -> None:
        for _ in range(n):
            ds = make_instance(None, patient_id="LATE", study_uid=study_uid, series_uid=series_uid)
            a.upload(_bytes(ds))

    upload(3)
    job = wait_for(lambda: _done_job(a, "b", study_uid), what="first delivery")
    before = posted(b)
    first_fp = job["Fingerprint"]
    upload(2)
    job = wait_for(
        lambda: (j := _done_job(a, "b", study_uid)) and j["Fingerprint"] != first_fp and j,
        what="second delivery",
    )
    assert posted(b) - before == 2  # only the two new instances travelled
    assert job["DeliveredCount"] == 5
    zjob = wait_for(
        lambda: (j := _done_job(a, "zips", study_uid)) and j["DeliveredCount"] == 5 and j,
        what="zip completed",
    )
    assert zjob["Fingerprint"] == job["Fingerprint"]
    zips = list((root / "zips" / "LATE").glob("*.zip"))
    assert len(zips) == 1 and len(zip_sop_uids(zips[0])) == 5


def test_send_backfill_and_retry_endpoints(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    a, b, _ = pair
    wait_for(
        lambda: all(d["Sending"] == d["Queued"] == 0 for d in status(a)["Destinations"].values()),
        what="queue drained",
    )
    before = posted(b)
    r = requests.post(a.url + "/dicomsync/backfill", json={"Destination": "b"}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["Studies"] == len(a.get("/studies"))
    assert answer["AlreadyDelivered"] == answer["Studies"] and answer["Enqueued"] == 0

    # a backfill restricted by a query, and by a date in the future: nothing to do
    r = requests.post(
        a.url + "/dicomsync/backfill",
        json={"Destination": "scanner", "Query": {"PatientID": "77654033"}},
        timeout=60,
    )
    assert r.json()["Studies"] == 2 and r.json()["Enqueued"] == 2
    r = requests.post(
        a.url + "/dicomsync/backfill",
        json={"Destination": "zips", "Since": "2999-01-01"},
        timeout=60,
    )
    assert r.json()["Studies"] == 0

    # send by StudyInstanceUID: the job runs again, the duplicate check sends nothing
    uid = a.get("/studies?expand")[0]["MainDicomTags"]["StudyInstanceUID"]
    r = requests.post(
        a.url + "/dicomsync/send", json={"Resources": [uid], "Destination": "b"}, timeout=30
    )
    assert r.status_code == 200, r.text
    sent = r.json()["Jobs"]
    assert sent and all(j["Action"] == "requeued" for j in sent)
    wait_for(
        lambda: (
            requests.get(f"{a.url}/dicomsync/jobs/{sent[0]['JobId']}", timeout=10).json()["State"]
            == "done"
        ),
        what="re-sent job done",
    )
    wait_for(lambda: settled(a, {"scanner": 3}), what="backfilled studies")
    assert posted(b) == before

    r = requests.post(f"{a.url}/dicomsync/jobs/{sent[0]['JobId']}/retry", timeout=30)
    assert r.status_code == 200 and r.json()["Id"] == sent[0]["JobId"]
    r = requests.post(a.url + "/dicomsync/retry-failed", json={"Destination": "b"}, timeout=30)
    assert r.json() == {"Requeued": 0}

    places = a.get("/dicomsync/places")["Places"]
    assert places["b"]["Kind"] == "orthanc" and places["b"]["Routed"] and places["b"]["Destination"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status_code", "message"),
    [
        ("POST", "send", b"{not json", 400, "malformed JSON"),
        ("POST", "send", b"[1, 2]", 400, "JSON object"),
        (
            "POST",
            "send",
            json.dumps({"Resources": ["x"], "Destination": "nope"}),
            400,
            "unknown destination",
        ),
        ("POST", "send", json.dumps({"Destination": "b"}), 400, "Resources"),
        (
            "POST",
            "send",
            json.dumps({"Resources": ["1.2.3.999"], "Destination": "b"}),
            400,
            "unknown study",
        ),
        ("POST", "backfill", json.dumps({"Destination": "nope"}), 400, "unknown destination"),
        ("POST", "backfill", json.dumps({"Destination": "b", "Since": "yesterday"}), 400, "Since"),
        ("POST", "backfill", json.dumps({"Destination": "b", "Query": "x"}), 400, "Query"),
        ("POST", "retry-failed", json.dumps({"Destination": "nope"}), 400, "unknown destination"),
        ("GET", "jobs?state=bogus", None, 400, "unknown state"),
        ("GET", "jobs?limit=abc", None, 400, "limit"),
        ("GET", "jobs?limit=0", None, 400, "limit"),
        ("GET", "jobs/999999", None, 404, "no job"),
        ("POST", "jobs/999999/retry", b"", 404, "no job"),
        ("GET", "nothing-here", None, 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_json_errors(
    pair: tuple[OrthancProcess, OrthancProcess, Path],
    method: str,
    path: str,
    body: bytes | str | None,
    status_code: int,
    message: str,
) -> None:
    a, _, _ = pair
    r = requests.request(method, f"{a.url}/dicomsync/{path}", data=body, timeout=30)
    assert r.status_code == status_code, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert message in r.json()["Message"]


def test_wrong_method_is_405(pair: tuple[OrthancProcess, OrthancProcess, Path]) -> None:
    a, _, _ = pair
    assert requests.get(a.url + "/dicomsync/send", timeout=30).status_code == 405
    assert requests.post(a.url + "/dicomsync/status", timeout=30).status_code == 405


def test_bad_config_is_one_log_line_and_orthanc_keeps_serving(tmp_path: Path) -> None:
    a = plugin_orthanc(
        tmp_path,
        "badconf",
        {"x": {"Kind": "no_such_kind", "Path": "/tmp"}, "z": {"Kind": "zipped_root", "Path": "z"}},
        [{"Destination": "missing"}, {"Destination": "z", "Filter": {"Colour": "red"}}],
    ).start()
    try:
        assert a.get("/system")["Name"] == "badconf"
        a.upload(_bytes(make_instance(None, patient_id="P", study_uid=generate_uid())))
        st = status(a)
        assert st["Configured"] is False
        for part in (
            "unknown place kind 'no_such_kind'",
            "route to a missing destination 'missing'",
            "unknown key 'Colour'",
        ):
            assert part in st["ConfigError"]
        lines = [line for line in a.log_text().splitlines() if "configuration error" in line]
        assert len(lines) == 1 and "missing destination" in lines[0]
        r = requests.post(
            a.url + "/dicomsync/send", json={"Resources": ["x"], "Destination": "z"}, timeout=30
        )
        assert r.status_code == 503 and "not configured" in r.json()["Message"]
        assert (
            "dicomsync_config_error 1"
            in requests.get(a.url + "/tools/metrics-prometheus", timeout=30).text
        )
    finally:
        a.stop()


def _bytes(ds: object) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def _done_job(a: OrthancProcess, dest: str, study_uid: str) -> dict | None:
    for j in jobs(a, destination=dest):
        if j["StudyUid"] == study_uid and j["State"] == "done":
            return j
    return None


def test_cli_backfill_and_queue_commands(
    pair: tuple[OrthancProcess, OrthancProcess, Path], ingested: dict[str, set[str]]
) -> None:
    from click.testing import CliRunner

    from dicomsync.cli.main import cli

    a, _, _ = pair
    wait_for(
        lambda: all(d["Sending"] == d["Queued"] == 0 for d in status(a)["Destinations"].values()),
        what="queue drained",
    )
    run = CliRunner()
    n = len(a.get("/studies"))
    r = run.invoke(cli, ["backfill", a.url, "zips"])
    assert r.exit_code == 0, r.output
    assert f"{n} studies: 0 enqueued" in r.output and f"{n} already delivered" in r.output
    assert "zips:" in r.output and "0 queued, 0 sending, 0 failed" in r.output

    r = run.invoke(cli, ["backfill", a.url, "ct", "--query", "PatientID=77654033", "--no-wait"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("2 studies: ")

    r = run.invoke(cli, ["backfill", a.url, "nowhere"])
    assert r.exit_code == 1 and "unknown destination 'nowhere'" in r.output

    r = run.invoke(cli, ["queue", "status", a.url, "--wait"])
    assert r.exit_code == 0, r.output
    assert "workers: running" in r.output and "b: " in r.output and "zips: " in r.output

    r = run.invoke(
        cli, ["queue", "jobs", a.url, "--state", "done", "--destination", "b", "--limit", "2"]
    )
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 2
    job_id = r.output.split()[0]
    r = run.invoke(cli, ["queue", "retry", a.url, job_id, "--failed"])
    assert r.exit_code == 0, r.output
    # requeued; a woken worker may already have leased it again when the answer is read
    assert f"job {job_id}: queued" in r.output or f"job {job_id}: sending" in r.output
    assert "0 failed job(s) requeued" in r.output

    # the retried job may be this study's: once it is done again, a send requeues it
    wait_for(
        lambda: (
            requests.get(f"{a.url}/dicomsync/jobs/{job_id}", timeout=10).json()["State"] == "done"
        ),
        what="the retried job done",
    )
    uid = a.get("/studies?expand")[0]["MainDicomTags"]["StudyInstanceUID"]
    r = run.invoke(cli, ["queue", "send", a.url, "b", uid])
    assert r.exit_code == 0 and "requeued" in r.output, r.output

    r = run.invoke(
        cli, ["queue", "status", a.url, "--user", "u", "--password-env", "NO_SUCH_VAR_X"]
    )
    assert r.exit_code == 1 and "NO_SUCH_VAR_X is not set" in r.output
