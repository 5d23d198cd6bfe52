"""The ``dicomweb`` place's configuration, auth rules and token command, without a server."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import requests

from dicomsync.errors import ConfigError
from dicomsync.places.base import PLACES
from dicomsync.places.dicomweb import Auth, DicomWebPlace, TokenCommandError, run_token_command
from dicomsync.places.dicomweb.connection import token_expired

from conftest import Cli

URL = "https://pacs.example.org/dicom-web"


def build(tmp_path: Path, **section: object) -> DicomWebPlace:
    place = PLACES.build("web", {"Kind": "dicomweb", "Url": URL, **section}, tmp_path)
    assert isinstance(place, DicomWebPlace)
    return place


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"User": "a", "TokenEnv": "T"},
            "use one way to log in, not User/PasswordEnv and TokenEnv",
        ),
        (
            {"TokenEnv": "T", "TokenCommand": ["x"]},
            "use one way to log in, not TokenEnv and TokenCommand",
        ),
        ({"PasswordEnv": "P"}, "PasswordEnv needs User"),
        (
            {"TokenCommand": "gcloud auth print-access-token"},
            "TokenCommand must be a non-empty list",
        ),
        ({"TokenCommand": []}, "TokenCommand must be a non-empty list"),
        ({"TokenCommand": ["gcloud", 3]}, "TokenCommand must be a non-empty list"),
        ({"Url": "https://u:p@pacs/dicom-web"}, "Url"),
        ({"InstancesPerRequest": 0}, "InstancesPerRequest must be an integer from 1 to 1000"),
    ],
)
def test_bad_sections_are_one_line(
    tmp_path: Path, section: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build(tmp_path, **section)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "p@" not in str(err.value)


def test_round_trip_and_describe(tmp_path: Path) -> None:
    section = {
        "Kind": "dicomweb",
        "Url": URL,
        "TokenCommand": ["gcloud", "auth", "print-access-token"],
        "CaBundle": str(tmp_path / "ca.pem"),
        "InstancesPerRequest": 5,
        "RequestsInFlight": 2,
        "PageSize": 100,
        "Timeout": 30.0,
    }
    place = build(tmp_path, **section)
    assert place.to_config() == section
    assert place.describe() == f"DICOMweb at '{URL}' (token from 'gcloud')"
    assert build(tmp_path).to_config() == {"Kind": "dicomweb", "Url": URL}
    basic = build(tmp_path, User="alice", PasswordEnv="WEB_PASS")
    assert basic.describe() == f"DICOMweb at '{URL}' (user alice)"
    assert build(tmp_path, TokenEnv="T").describe() == f"DICOMweb at '{URL}' (token from $T)"


def test_check_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_PASS", raising=False)
    with pytest.raises(ConfigError, match="environment variable WEB_PASS is not set"):
        build(tmp_path, User="alice", PasswordEnv="WEB_PASS").check_environment()
    monkeypatch.setenv("WEB_PASS", "x")
    build(tmp_path, User="alice", PasswordEnv="WEB_PASS").check_environment()
    with pytest.raises(ConfigError, match="token command 'no-such-cli-xyz' is not on the PATH"):
        build(tmp_path, TokenCommand=["no-such-cli-xyz"]).check_environment()
    build(tmp_path, TokenCommand=[sys.executable, "-c", "print(1)"]).check_environment()


def test_place_add_dicomweb_stores_an_argv_and_no_secret(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("init")
    monkeypatch.setenv("WEB_TOKEN", "tok-Secret-1")
    out = cli(
        "place",
        "add",
        "dicomweb",
        "gcp",
        URL,
        "--token-command",
        "gcloud auth 'print-access-token'",
    ).output
    assert out.strip() == f"added dicomweb place 'gcp': DICOMweb at '{URL}' (token from 'gcloud')"
    cli("place", "add", "dicomweb", "env", URL, "--token-env", "WEB_TOKEN")
    places = json.loads(cli.config.read_text())["Places"]
    assert places["gcp"]["TokenCommand"] == ["gcloud", "auth", "print-access-token"]
    assert places["env"] == {"Kind": "dicomweb", "Url": URL, "TokenEnv": "WEB_TOKEN"}
    assert "tok-Secret" not in cli.config.read_text()
    result = cli("place", "add", "dicomweb", "x", URL, "--token-command", "a 'b", ok=False)
    assert result.exit_code == 1 and "--token-command: No closing quotation" in result.output
    result = cli("place", "add", "dicomweb", "y", URL, "--user", "a", "--token-env", "T", ok=False)
    assert "use one way to log in" in result.output


# --- the token command ------------------------------------------------------------------------
def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_token_command_outcomes() -> None:
    assert run_token_command(py("print('  tok-1  ')"), 10, "w") == "tok-1"
    name = Path(sys.executable).name
    cases = {
        py("print('a'); print('b')"): f"w: token command {name!r} printed 2 lines, expected one",
        py("pass"): f"w: token command {name!r} printed 0 lines",
        py("import sys; sys.stderr.write('LEAK'); sys.exit(2)"): (
            f"w: token command {name!r} failed (exit status 2); run {name!r} yourself to see why"
        ),
        ("/no/such/cli",): "w: token command 'cli' not found",
    }
    for argv, message in cases.items():
        with pytest.raises(TokenCommandError) as err:
            run_token_command(argv, 10, "w")
        assert str(err.value).startswith(message) and "LEAK" not in str(err.value)
        assert not err.value.retryable
    with pytest.raises(TokenCommandError) as err:
        run_token_command(py("import time; time.sleep(5)"), 0.3, "w")
    assert str(err.value) == f"w: token command {name!r} did not finish within 0.3s"
    assert err.value.retryable


def test_token_command_runs_once_for_concurrent_expiries(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    code = (
        "import sys, pathlib; p = pathlib.Path(sys.argv[1]); "
        "n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); print(f't{n}')"
    )
    auth = Auth("w", token_command=(sys.executable, "-c", code, str(counter)))
    generation, header = auth.header()
    assert header == "Bearer t1"
    threads = [threading.Thread(target=auth.refresh, args=(generation,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "2" and auth.header()[1] == "Bearer t2"


@pytest.mark.parametrize(
    ("status", "challenge", "expired"),
    [
        (401, 'Bearer realm="x", error="invalid_token", error_description="expired"', True),
        (401, 'Bearer realm="x"', True),
        (401, "", True),
        (401, 'Bearer error="insufficient_scope"', False),
        (403, 'Bearer error="invalid_token"', False),
        (200, "", False),
    ],
)
def test_which_answers_ask_for_a_new_token(status: int, challenge: str, expired: bool) -> None:
    response = requests.Response()
    response.status_code = status
    if challenge:
        response.headers["WWW-Authenticate"] = challenge
    assert token_expired(response) is expired
