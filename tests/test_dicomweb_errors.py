"""Bad input for the ``dicomweb`` place: one clear line each, and nothing lost.

A real Orthanc with Debian's DICOMweb plugin is the server. Where it cannot be made to
answer something (an expired token, a 4xx from QIDO-RS, a retryable failure reason), the
protocol-faithful gate of ``tests/servers/dicomweb_gate.py`` stands in front of it.
"""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from dicomsync.errors import AuthenticationFailed, DicomSyncError, RemoteRejected, Unreachable
from dicomsync.identity import StudyIdentity
from dicomsync.places.base import Instance
from dicomsync.places.dicomweb import DicomWebPlace

from conftest import Cli
from dicomdata import study_bytes
from orthanc_server import OrthancProcess
from servers.dicomweb_gate import Gate

pytestmark = pytest.mark.orthanc

TOKEN_SCRIPT = """
import sys
from pathlib import Path
counter = Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
print(f"token-{n}")
"""


@pytest.fixture
def gate(web: OrthancProcess) -> Iterator[Gate]:
    g = Gate(web.dicomweb_url).start()
    yield g
    g.stop()


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def failed_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("failed ")]


# --- STOW-RS: a failed-SOP sequence ---------------------------------------------------------
def test_stow_409_failed_sop_sequence_from_orthanc_fails_those_instances(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], web: OrthancProcess
) -> None:
    """A study folder holding a stray instance of another study: STOW-RS to
    /studies/{uid} makes Orthanc's DICOMweb plugin answer a FailedSOPSequence with reason
    0x0110 for it. The study fails with one line naming it; the rest is stored."""
    folder = tmp_path / "dicom_root" / "patient1" / "study1"
    stray_file = seed["patient2/study1"][0]
    shutil.copyfile(stray_file, folder / "stray.dcm")
    cli("place", "add", "dicomweb", "web", web.dicomweb_url)
    result = cli("send", "my_studies:patient1/study1", "web", ok=False)
    assert result.exit_code == 1
    lines = failed_lines(result.output)
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("failed my_studies:patient1/study1: STOW-RS of ")
    assert f"refused 1 of {len(seed['patient1/study1']) + 1} instances: {sop(stray_file)}" in line
    assert "(0x0110 processing failure)" in line
    assert result.output.splitlines()[-1].startswith("0 sent, 0 duplicate, 1 failed")
    # nothing lost: what the server accepted is there, the stray instance is not
    held = web.study_sop_uids()
    assert held == {
        study_uid(seed["patient1/study1"][0]): {sop(p) for p in seed["patient1/study1"]}
    }
    # the stray instance goes where it belongs with its own study, later
    out = cli("send", "my_studies:patient2/study1", "web").output
    assert out.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed")


def _instances(n: int, pixel_bytes: int = 64) -> tuple[StudyIdentity, list[Instance]]:
    out = []
    for data in study_bytes("GATE", n, pixel_bytes):
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        out.append(Instance(str(ds.SOPInstanceUID), "x.dcm", functools.partial(bytes, data)))
    return StudyIdentity(str(ds.StudyInstanceUID), frozenset(i.sop_uid for i in out), "GATE"), out


def _failed_sop_body(items: list[tuple[str, int]], stored: list[str]) -> dict[str, object]:
    return {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
                    "00081155": {"vr": "UI", "Value": [uid]},
                    "00081197": {"vr": "US", "Value": [code]},
                }
                for uid, code in items
            ],
        },
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in stored],
        },
    }


def _place(url: str, tmp_path: Path, **extra: object) -> DicomWebPlace:
    place = DicomWebPlace.from_config("web", {"Url": url, **extra}, base_dir=tmp_path)
    assert isinstance(place, DicomWebPlace)
    return place


@pytest.mark.parametrize(
    ("code", "error", "retryable"),
    [
        (0xA700, Unreachable, True),  # out of resources: may pass
        (0xC000, RemoteRejected, False),  # cannot understand: final
        (0x0122, RemoteRejected, False),  # SOP class not supported: final
    ],
)
def test_failure_reasons_decide_retryable(
    tmp_path: Path, gate: Gate, code: int, error: type[DicomSyncError], retryable: bool
) -> None:
    identity, instances = _instances(3)
    uids = sorted(identity.sop_uids)
    gate.inject = [("POST", "/studies", 409, _failed_sop_body([(uids[1], code)], [uids[0]]))]
    with _place(gate.url, tmp_path, InstancesPerRequest=3) as place:
        with pytest.raises(error) as err:
            place.receive("GATE/x", instances, identity)
    assert err.value.retryable is retryable
    assert f"refused 1 of 3 instances: {uids[1]} (0x{code:04X} " in str(err.value)
    assert err.value.delivered == 1  # type: ignore[attr-defined]
    assert "\n" not in str(err.value)


def test_duplicate_reason_and_warnings_count_as_stored(tmp_path: Path, gate: Gate) -> None:
    identity, instances = _instances(2)
    a, b = sorted(identity.sop_uids)
    body = _failed_sop_body([(a, 0x0111)], [b])
    body["00081199"]["Value"][0]["00081196"] = {"vr": "US", "Value": [0xB000]}  # type: ignore[index]
    gate.inject = [("POST", "/studies", 202, body)]
    with _place(gate.url, tmp_path) as place:
        assert place.receive("GATE/x", instances, identity).written == 2


@pytest.mark.parametrize(
    ("status", "error", "retryable", "text"),
    [
        (409, RemoteRejected, False, "rejected (409)"),
        (413, RemoteRejected, False, "rejected (413)"),
        (503, Unreachable, True, "server busy or failing (503)"),
        (401, AuthenticationFailed, False, "not authorised (401)"),
    ],
)
def test_error_status_without_failed_sop_sequence(
    tmp_path: Path,
    gate: Gate,
    status: int,
    error: type[DicomSyncError],
    retryable: bool,
    text: str,
) -> None:
    identity, instances = _instances(2)
    gate.inject = [("POST", "/studies", status, "")]
    with _place(gate.url, tmp_path) as place:
        with pytest.raises(error) as err:
            place.receive("GATE/x", instances, identity)
    assert err.value.retryable is retryable and text in str(err.value)


def test_big_stow_bodies_are_sent_with_a_content_length_not_chunked(
    tmp_path: Path, gate: Gate, web: OrthancProcess
) -> None:
    """dicomweb-client chunks bodies above 1 MB, which Orthanc cannot read; the gate
    answers 411 to any chunked upload. 4 instances of 600 kB in one request."""
    identity, instances = _instances(4, pixel_bytes=600_000)
    with _place(gate.url, tmp_path, InstancesPerRequest=4) as place:
        assert place.receive("GATE/x", instances, identity).written == 4
        assert place.holds("GATE/x", identity) == identity.sop_uids
    posts = [s for s in gate.seen if s[0] == "POST"]
    assert len(posts) == 1 and posts[0][3] > 2_000_000


# --- tokens ---------------------------------------------------------------------------------
def test_expired_token_runs_the_token_command_again_once(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], gate: Gate, web: OrthancProcess
) -> None:
    script = tmp_path / "token.py"
    script.write_text(TOKEN_SCRIPT)
    counter = tmp_path / "counter"
    gate.tokens = {"token-2"}
    gate.expired = {"token-1"}
    command = f"{sys.executable} {script} {counter}"
    cli("place", "add", "dicomweb", "web", gate.url, "--token-command", command)
    out = cli("send", "my_studies:*", "web").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed")
    assert counter.read_text() == "2"  # the first token expired: run once more, not per request
    assert gate.seen_tokens[0] == "token-1" and set(gate.seen_tokens[1:]) == {"token-2"}
    assert "token-" not in out and "token-" not in cli.config.read_text()
    assert len(web.sop_uids()) == 16


def test_a_token_that_stays_refused_is_one_line(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], gate: Gate, web: OrthancProcess
) -> None:
    """Every token the command makes is expired: one re-run per request, then 401."""
    script = tmp_path / "token.py"
    script.write_text(TOKEN_SCRIPT)
    gate.tokens = set()
    gate.expired = {f"token-{n}" for n in range(1, 100)}
    cli(
        "place",
        "add",
        "dicomweb",
        "web",
        gate.url,
        "--token-command",
        f"{sys.executable} {script} {tmp_path / 'c'}",
    )
    result = cli("send", "my_studies:patient1/study1", "web", ok=False)
    assert result.exit_code == 1
    lines = failed_lines(result.output)
    assert len(lines) == 1 and "not authorised (401)" in lines[0], result.output
    assert "token-" not in result.output
    assert web.sop_uids() == set()


def test_failing_token_command_is_one_line_without_its_stderr(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], gate: Gate
) -> None:
    script = tmp_path / "bad.py"
    script.write_text("import sys\nprint('SECRET-abc123', file=sys.stderr)\nsys.exit(3)\n")
    gate.tokens = {"x"}
    cli(
        "place", "add", "dicomweb", "web", gate.url, "--token-command", f"{sys.executable} {script}"
    )
    result = cli("send", "my_studies:patient1/study1", "web", ok=False)
    assert result.exit_code == 1
    lines = failed_lines(result.output)
    name = Path(sys.executable).name
    assert len(lines) == 1, result.output
    assert f"token command {name!r} failed (exit status 3); run {name!r} yourself" in lines[0]
    assert "SECRET" not in result.output
    assert not [s for s in gate.seen if s[0] == "POST"]


def test_bearer_token_from_env_and_basic_auth(
    tmp_path: Path,
    cli: Cli,
    seed: dict[str, list[Path]],
    gate: Gate,
    web: OrthancProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate.tokens = {"env-token-1"}
    monkeypatch.setenv("WEB_TOKEN", "env-token-1")
    cli("place", "add", "dicomweb", "web", gate.url, "--token-env", "WEB_TOKEN")
    out = cli("send", "my_studies:patient1/*", "web").output
    assert out.splitlines()[-1].startswith("3 sent, 0 duplicate, 0 failed")
    monkeypatch.setenv("WEB_TOKEN", "wrong-token-2")
    result = cli("send", "my_studies:*", "web", ok=False)
    lines = failed_lines(result.output)
    assert len(lines) == 4 and all("not authorised (401)" in line for line in lines)
    assert "token-2" not in result.output

    gate.tokens = None
    gate.basic = ("alice", "pw-Secret-9")
    monkeypatch.setenv("WEB_PASS", "pw-Secret-9")
    cli(
        "place",
        "add",
        "dicomweb",
        "web2",
        gate.url,
        "--user",
        "alice",
        "--password-env",
        "WEB_PASS",
    )
    out = cli("send", "my_studies:*", "web2").output
    assert out.splitlines()[-1].startswith("1 sent, 3 duplicate, 0 failed")
    monkeypatch.delenv("WEB_PASS")
    result = cli("send", "my_studies:*", "web2", ok=False)
    assert "environment variable WEB_PASS is not set" in result.output
    assert "pw-Secret" not in result.output + cli.config.read_text()


# --- QIDO-RS --------------------------------------------------------------------------------
def test_qido_4xx_is_one_line_and_sends_nothing(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], gate: Gate, web: OrthancProcess
) -> None:
    gate.inject = [("GET", "/studies", 400, {"Message": "Bad file format"})]
    cli("place", "add", "dicomweb", "web", gate.url)
    result = cli("find", "web:*", ok=False)
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: QIDO-RS {gate.url}/studies: rejected (400: Bad file format)"
    ]
    # as a destination: the duplicate check fails each study with one line, nothing is sent
    result = cli("send", "my_studies:*", "web", ok=False)
    lines = failed_lines(result.output)
    assert len(lines) == 4, result.output
    assert all("/instances: rejected (400: Bad file format)" in line for line in lines)
    assert not [s for s in gate.seen if s[0] == "POST"]
    assert web.sop_uids() == set()


def test_wrong_base_url_and_unreachable_server(
    tmp_path: Path, cli: Cli, seed: dict[str, list[Path]], web: OrthancProcess
) -> None:
    cli("place", "add", "dicomweb", "nope", web.url + "/no-such-root")
    result = cli("send", "my_studies:patient1/study1", "nope", ok=False)
    lines = failed_lines(result.output)
    assert len(lines) == 1 and "not found (404" in lines[0], result.output
    cli("place", "add", "dicomweb", "down", "http://127.0.0.1:9/dicom-web")
    result = cli("find", "down:*", ok=False)
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("Error: QIDO-RS http://127.0.0.1:9/dicom-web/studies: no answer (")
    )


def test_host_header_keeps_the_port_and_probe_answers(tmp_path: Path, gate: Gate) -> None:
    """dicomweb-client sends ``Host: 127.0.0.1`` without the port; a name-based virtual
    host on another port would route that elsewhere."""
    identity, instances = _instances(1)
    port = gate.url.split(":")[2].split("/")[0]
    with _place(gate.url, tmp_path) as place:
        assert place.probe() == f"DICOMweb at '{gate.url}' answers QIDO-RS"
        place.receive("GATE/x", instances, identity)
        assert place.holds("GATE/x", identity) == identity.sop_uids
        assert list(place.studies())
    assert gate.hosts == {f"127.0.0.1:{port}"}
    gate.inject = [("GET", "/studies", 403, "")]
    with _place(gate.url, tmp_path) as place, pytest.raises(AuthenticationFailed) as err:
        place.probe()
    assert (
        str(err.value) == f"QIDO-RS {gate.url}/studies: not authorised (403); check the credentials"
    )


def test_no_secret_in_debug_logs(
    tmp_path: Path, gate: Gate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG (ours, dicomweb-client's, urllib3's) over a full round trip."""
    import logging

    gate.tokens = {"tok-Secret-77"}
    monkeypatch.setenv("WEB_TOKEN", "tok-Secret-77")
    identity, instances = _instances(2)
    caplog.set_level(logging.DEBUG)
    with _place(gate.url, tmp_path, TokenEnv="WEB_TOKEN") as place:
        place.receive("GATE/x", instances, identity)
        assert place.holds("GATE/x", identity) == identity.sop_uids
        (ref,) = [r for r in place.studies() if r.handle == identity.study_uid]
        assert {i.sop_uid for i in place.instances(ref)} == identity.sop_uids
        assert all(i.read()[128:132] == b"DICM" for i in place.instances(ref))
    assert caplog.records and "Secret" not in caplog.text


def test_wado_answer_sent_bare_as_application_dicom(tmp_path: Path, gate: Gate) -> None:
    """A server may answer a one-instance WADO-RS request with the file itself."""
    identity, instances = _instances(1)
    data = instances[0].read()
    with _place(gate.url, tmp_path) as place:
        place.receive("GATE/x", instances, identity)
        (ref,) = [r for r in place.studies() if r.handle == identity.study_uid]
        gate.inject = [("GET", f"/studies/{identity.study_uid}/series/", 200, data)]
        (inst,) = place.instances(ref)
        assert inst.read() == data
