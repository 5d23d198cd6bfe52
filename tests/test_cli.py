"""CLI behaviour: exact one-line errors, JSON output, logs, config handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_send import make_study, places

from conftest import Cli
from orthanc_server import free_port


def error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return str(lines[0])


def test_init_refuses_to_overwrite(cli: Cli) -> None:
    assert cli("init").output == f"created {cli.config}\n"
    assert (
        error_line(cli("init", ok=False))
        == f"Error: {cli.config} already exists; not overwriting it"
    )


def test_missing_config(cli: Cli) -> None:
    assert error_line(cli("place", "list", ok=False)) == (
        f"Error: no configuration at {cli.config}; run 'dicomsync init' first"
    )


def test_corrupted_config(cli: Cli) -> None:
    cli.config.write_text('{"Places": {"a": ')
    assert error_line(cli("find", "a:*", ok=False)) == (
        f"Error: {cli.config} is not valid JSON (line 1, column 18: Expecting value)"
    )
    cli.config.write_text('{"Places": {"a": {"Path": "/x"}}}')
    assert (
        error_line(cli("find", "a:*", ok=False))
        == f"Error: {cli.config}: Places['a'] needs a \"Kind\""
    )
    cli.config.write_text('{"Places": {"a": {"Kind": "ftp"}}}')
    assert error_line(cli("find", "a:*", ok=False)) == (
        "Error: unknown place kind 'ftp'; known kinds: dicom, dicom_root, dicomweb, orthanc, xnat_pre_archive, zipped_root"
    )


def test_unknown_place_and_bad_query(cli: Cli) -> None:
    cli("init")
    assert error_line(cli("find", "nowhere:*", ok=False)) == (
        "Error: unknown place 'nowhere' (configured: none)"
    )
    assert error_line(cli("find", "patient1/study1", ok=False)) == (
        "Error: invalid query 'patient1/study1': expected <place>:<patient>/<study>, "
        "e.g. 'my_studies:patient1/*' ('*' matches anything)"
    )
    assert error_line(cli("send", "x:*", "nowhere", ok=False)) == (
        "Error: unknown place 'nowhere' (configured: none)"
    )


def test_missing_root_path(tmp_path: Path, cli: Cli) -> None:
    cli("init")
    assert error_line(cli("place", "add", "dicom_root", "r", str(tmp_path / "nope"), ok=False)) == (
        f"Error: folder {tmp_path / 'nope'} does not exist"
    )
    (tmp_path / "gone").mkdir()
    cli("place", "add", "dicom_root", "r", str(tmp_path / "gone"))
    (tmp_path / "gone").rmdir()
    assert error_line(cli("find", "r:*", ok=False)) == (
        f"Error: dicom_root place 'r': root folder {tmp_path / 'gone'} does not exist"
    )


def test_unreachable_orthanc(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"))
    make_study(tmp_path / "src" / "p" / "s", 1)
    port = free_port()
    cli("place", "add", "orthanc", "pacs", f"http://127.0.0.1:{port}")
    line = error_line(cli("find", "pacs:*", ok=False))
    assert line.startswith(f"Error: cannot reach Orthanc at http://127.0.0.1:{port}: ")
    result = cli("send", "src:*", "pacs", "--retries", "0", ok=False)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("0 sent, 0 duplicate, 1 failed")
    assert f"failed src:p/s: cannot reach Orthanc at http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output


def test_password_comes_from_environment_only(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("init")
    monkeypatch.setenv("PACS_SECRET", "s3cr3t-value")
    cli(
        "place",
        "add",
        "orthanc",
        "pacs",
        "http://127.0.0.1:1",
        "--user",
        "u",
        "--password-env",
        "PACS_SECRET",
    )
    text = cli.config.read_text()
    assert "s3cr3t-value" not in text
    assert json.loads(text)["Places"]["pacs"] == {
        "Kind": "orthanc",
        "Url": "http://127.0.0.1:1",
        "User": "u",
        "PasswordEnv": "PACS_SECRET",
    }
    monkeypatch.delenv("PACS_SECRET")
    assert error_line(cli("find", "pacs:*", ok=False)) == (
        "Error: orthanc place 'pacs': environment variable PACS_SECRET is not set"
    )


def test_place_commands_and_json(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    make_study(tmp_path / "src" / "p" / "s", 2)
    assert json.loads(cli("find", "src:*", "--json").output) == [
        {"place": "src", "patient": "p", "study": "s", "key": "p/s"}
    ]
    listing = json.loads(cli("place", "ls", "src", "--json").output)
    assert [(r["key"], r["instances"]) for r in listing] == [("p/s", 2)]
    assert [p["key"] for p in json.loads(cli("place", "list", "--json").output)] == ["src", "zips"]
    cmp = json.loads(cli("compare", "src", "zips", "--json").output)
    assert len(cmp["only_a"]) == 1 and cmp["both"] == [] and cmp["only_b"] == []
    status = json.loads(cli("status", "--json").output)
    assert [p["key"] for p in status["places"]] == ["src", "zips"]
    assert status["place_kinds"]["dicom_root"] is None
    assert cli("place", "remove", "zips").output == "removed place 'zips'\n"
    assert error_line(cli("place", "remove", "zips", ok=False)) == (
        "Error: unknown place 'zips' (configured: src)"
    )
    assert error_line(cli("place", "add", "dicom_root", "src", str(tmp_path), ok=False)) == (
        "Error: a place called 'src' already exists"
    )


def test_log_file_is_timestamped(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"))
    make_study(tmp_path / "src" / "p" / "s", 1)
    log = tmp_path / "send.log"
    cli("--log-file", str(log), "send", "src:*", "zips")
    text = log.read_text()
    assert "dicomsync.transfer INFO: src:p/s: sending 1 of 1 instances to zips" in text
    assert "dicomsync.cli.common INFO: finished: 1 sent, 0 duplicate, 0 failed" in text
    first = text.splitlines()[0]
    assert first[:4].isdigit() and first[4] == "-"  # 2026-11-22 12:00:00,000 ...


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dicomsync.cli.main import cli as group

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DICOMSYNC_CONFIG", str(tmp_path / "other.json"))
    result = CliRunner().invoke(group, ["init"])
    assert result.exit_code == 0 and (tmp_path / "other.json").is_file()
    assert list(cwd.iterdir()) == []  # no ./dicomsync.json beside it
