"""The pseudonym map in the plugin's PostgreSQL queue database (issue 13 with issue 11's
``DicomSync.Queue``): two nodes share one map, CSV import and export, a taken pseudonym,
a route's destination built with it, and ``dicomsync deid map`` against it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from dicomsync.deid.place import Deidentified
from dicomsync.deid.pseudonyms_pg import PgPseudonymMap
from dicomsync.errors import ConfigError
from dicomsync.pg import PgTarget

from conftest import Cli

ENV = "DICOMSYNC_TEST_DEID_PG_PASSWORD"


@pytest.fixture
def target(pg_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> PgTarget:
    monkeypatch.setenv(ENV, pg_cluster.password)
    return PgTarget.checked(pg_cluster.create_database(), ENV, PgTarget.schema)  # the default


def test_two_nodes_share_one_map(target: PgTarget) -> None:
    a, b = PgPseudonymMap(target, "pseudonyms"), PgPseudonymMap(target, "pseudonyms")
    try:
        assert a.put("P1", "DSAAA") == ("DSAAA", "DSAAA")
        assert b.get("P1") == ("DSAAA", "DSAAA")  # the other node sees it
        assert b.put("P1", "DSBBB") == ("DSAAA", "DSAAA")  # the first one stays
        with pytest.raises(ConfigError, match="already taken"):
            b.put("P2", "DSAAA")
        added = a.import_csv(io.StringIO("original_id,pseudonym_id\nP3,SUBJ-3\nP1,SUBJ-1\n"))
        assert added == 1 and b.get("P3") == ("SUBJ-3", "SUBJ-3")
        with pytest.raises(ConfigError, match="nothing imported"):
            a.import_csv(io.StringIO("P4,SUBJ-4\nP5,SUBJ-3\n"))
        assert a.get("P4") is None  # all or nothing
        out = io.StringIO()
        assert b.export_csv(out) == 2
        assert out.getvalue().splitlines() == [
            "original_id,pseudonym_id,pseudonym_name",
            "P1,DSAAA,DSAAA",
            "P3,SUBJ-3,SUBJ-3",
        ]
    finally:
        a.close()
        b.close()


def test_a_route_on_the_postgresql_queue_keeps_its_map_there(
    target: PgTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomsync import routing
    from dicomsync.identity import StudyIdentity

    monkeypatch.setenv("S", "secret")
    section = {
        "Places": {"b": {"Kind": "dicom_root", "Path": str(tmp_path)}},
        "Queue": {"Kind": "postgresql", "Url": target.url, "PasswordEnv": ENV},
        "Deidentify": {"research": {"SecretEnv": "S", "PatientIds": "pseudonyms"}},
        "Routes": [{"Destination": "b", "Deidentify": "research"}],
    }
    cfg = routing.load({"DicomSync": section}, tmp_path / "orthanc.json")
    assert cfg is not None
    place = cfg.build_place("b")
    assert isinstance(place, Deidentified)
    try:
        assert type(place.pseudonyms).__name__ == "PgPseudonymMap"
        key, _, _ = place.mapped(StudyIdentity("1.2.3", frozenset({"1.2.3.4"}), "PAT"))
        other = PgPseudonymMap(target, "pseudonyms")
        assert key.split("/")[0] == other.get("PAT")[0]  # type: ignore[index]
        other.close()
    finally:
        place.close()
    assert not (tmp_path / "queue.sqlite").exists()


def test_cli_map_commands_on_the_postgresql_queue(
    target: PgTarget, tmp_path: Path, cli: Cli
) -> None:
    cli("init")
    cfg = json.loads(cli.config.read_text())
    cfg["Deidentify"] = {"research": {"SecretEnv": "S", "PatientIds": "pseudonyms"}}
    cli.config.write_text(json.dumps(cfg))
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("P9,SUBJ-9,Subject^Nine\n")
    where = ("--database", target.url, "--password-env", ENV, "--schema", "deid_queue")
    imported = cli("deid", "map", "import", "research", str(csv_in), *where).output
    assert imported.splitlines()[-1].startswith("1 pseudonyms added")
    out = cli("deid", "map", "export", "research", *where).output
    assert out.splitlines()[-2:] == [
        "original_id,pseudonym_id,pseudonym_name",
        "P9,SUBJ-9,Subject^Nine",
    ]
