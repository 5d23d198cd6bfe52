"""The DicomSync section: parsing and validation, route filters, study facts, the route job
handler, the shipped configurations (orthanc.json, docker-compose.yml), and the glue under a
stand-in ``orthanc`` module."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid

from dicomsync import routing
from dicomsync.errors import ConfigError, NotFound
from dicomsync.identity import orthanc_study_id
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.places.orthanc import OrthancPlace
from dicomsync.places.zipped_root import ZippedRoot
from dicomsync.queue import Job

from dicomdata import data, make_instance
from orthanc_server import OrthancProcess

REPO = Path(__file__).resolve().parent.parent


def section(**sync: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Places": {
            "b": {"Kind": "orthanc", "Url": "http://b:8042"},
            "zips": {"Kind": "zipped_root", "Path": "zips"},
        },
        "Routes": [{"Destination": "b"}],
    }
    base.update(sync)
    return {"StorageDirectory": "/data/orthanc/db", routing.SECTION: base}


def test_valid_section_parses_with_defaults(tmp_path: Path) -> None:
    cfg = routing.load(
        section(
            Routes=[
                {
                    "Destination": "b",
                    "Filter": {"Modality": "CT", "CallingAet": ["SCAN*", "CT1"]},
                    "Concurrency": 6,
                },
                {"Destination": "zips"},
            ]
        ),
        tmp_path / "orthanc.json",
    )
    assert cfg is not None
    assert cfg.state_dir == Path("/data/orthanc/dicomsync")  # beside StorageDirectory
    assert cfg.routes[0].filter == {"Modality": ("CT",), "CallingAet": ("SCAN*", "CT1")}
    assert cfg.places_base == tmp_path
    assert [(lane.destination, lane.concurrency) for lane in cfg.lanes()] == [("b", 6), ("zips", 2)]
    assert cfg.retry.max_attempts == 10 and cfg.warnings == []
    assert routing.load({"HttpPort": 1}) is None  # no section: nothing to route


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Places": {"x": {"Kind": "nope"}}, "Routes": []}, "unknown place kind 'nope'"),
        ({"Routes": [{"Destination": "missing"}]}, "route to a missing destination 'missing'"),
        ({"Routes": [{}]}, "option 'Destination' is required"),
        ({"Routes": {"Destination": "b"}}, "Routes must be a list"),
        ({"Routes": [{"Destination": "b", "Filter": {"Colour": "red"}}]}, "unknown key 'Colour'"),
        ({"Routes": [{"Destination": "b", "Filter": {"Modality": []}}]}, "non-empty list of globs"),
        ({"Routes": [{"Destination": "b", "Filter": "CT"}]}, "Filter must be an object"),
        ({"Routes": [{"Destination": "b", "Concurrency": 0}]}, "Concurrency must be an integer"),
        ({"Routes": [{"Destination": "b", "Concurency": 2}]}, "unknown option(s) Concurency"),
        ({"Retry": {"BaseDelay": -1}}, "BaseDelay > 0"),
        ({"StateDirectory": 5}, "StateDirectory must be a non-empty string"),
        ({"PollInterval": "fast"}, "PollInterval must be a positive number"),
        ({"Places": "missing.json"}, "no configuration at"),
        ({"Places": {"b": {"Url": "x"}}}, 'needs a "Kind"'),
    ],
)
def test_validate_reports_clear_errors(
    change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    cfg = section(**change)
    problems = routing.validate(cfg, tmp_path / "orthanc.json")
    assert any(message in p for p in problems), problems
    with pytest.raises(ConfigError, match=re.escape(message)):
        routing.load(cfg, tmp_path / "orthanc.json")


def test_section_must_be_an_object_and_unknown_options_warn() -> None:
    assert routing.validate({routing.SECTION: []}) == ["DicomSync must be a JSON object"]
    cfg = routing.load(section(Rutes=[]))
    assert cfg is not None and "unknown option 'Rutes'" in cfg.warnings[0]


def test_places_from_a_file_relative_to_the_orthanc_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "dicomsync.json").write_text(
        json.dumps({"Places": {"zips": {"Kind": "zipped_root", "Path": "zips"}}})
    )
    cfg = routing.load(
        {
            routing.SECTION: {
                "Places": "dicomsync.json",
                "Routes": [{"Destination": "zips"}],
                "StateDirectory": "state",
            }
        },
        tmp_path / "conf" / "orthanc.json",
    )
    assert cfg is not None
    assert cfg.places_base == tmp_path / "conf" and cfg.state_dir == tmp_path / "conf" / "state"


def test_route_matching_any_value_any_glob_every_key() -> None:
    route = routing.Route("b", {"Modality": ("CT", "P*"), "CallingAet": ("SCAN*",)})
    assert route.matches({"Modality": {"SR", "PT"}, "CallingAet": {"SCANNER1"}})
    assert not route.matches({"Modality": {"SR"}, "CallingAet": {"SCANNER1"}})
    assert not route.matches({"Modality": {"CT"}, "CallingAet": set()})
    assert not routing.Route("b", {"StudyDescription": ("[x]*",)}).matches(
        {"StudyDescription": {"xray"}}
    )  # brackets are literal
    assert routing.Route("b").matches({})


# --- against a real Orthanc ------------------------------------------------------------------


@pytest.fixture
def petct(orthanc: OrthancProcess) -> Iterator[tuple[OrthancProcess, str]]:
    for f in sorted(data("study_petct_siemens").glob("*.dcm")):
        orthanc.upload(f.read_bytes())
    pet = next(
        s
        for s in orthanc.get("/studies?expand")
        if s["PatientMainDicomTags"]["PatientID"] == "REMOVED"
    )
    yield orthanc, pet["ID"]


def test_study_facts_read_the_index_level_by_level(petct: tuple[OrthancProcess, str]) -> None:
    server, study_id = petct
    client = OrthancClient(HttpTransport(server.url))
    facts = routing.study_facts(
        client,
        study_id,
        ["Modality", "SOPClassUID", "CallingAet", "Origin", "PatientID", "StudyDescription"],
    )
    assert facts["Modality"] == {"PT", "SR"}
    assert "1.2.840.10008.5.1.4.1.1.128" in facts["SOPClassUID"]  # PET image storage
    assert facts["Origin"] == {"RestApi"} and facts["CallingAet"] == {""}
    assert facts["PatientID"] == {"REMOVED"}
    assert routing.study_facts(client, study_id, []) == {}
    with pytest.raises(NotFound):
        routing.study_facts(client, "00000000-00000000-00000000-00000000-00000000", ["PatientID"])


def test_route_handler_sends_then_finds_duplicates(
    petct: tuple[OrthancProcess, str], tmp_path: Path
) -> None:
    server, study_id = petct
    (tmp_path / "zips").mkdir()
    handler = routing.RouteHandler(
        lambda: OrthancPlace("local", OrthancClient(HttpTransport(server.url))),
        lambda key: ZippedRoot(key, tmp_path / "zips"),
    )
    job = Job(1, "study", study_id, "zips")
    first = handler(job)
    assert first.sent == 2 and len(list((tmp_path / "zips").rglob("*.zip"))) == 1
    again = handler(job)
    assert again.sent == 0 and again.fingerprint == first.fingerprint
    with pytest.raises(NotFound):
        handler(Job(2, "study", "00000000-00000000-00000000-00000000-00000000", "zips"))
    handler.close()


# --- the configurations the project ships ---------------------------------------------------


def test_repo_orthanc_json_is_valid_and_points_at_the_plugin() -> None:
    cfg = json.loads((REPO / "orthanc.json").read_text())
    assert routing.validate(cfg, REPO / "orthanc.json") == []
    assert (REPO / cfg["PythonScript"]).is_file()
    assert cfg["HttpPort"] == 8042 and cfg["DicomPort"] == 4242
    sync = routing.load(cfg, REPO / "orthanc.json")
    assert sync is not None and sync.state_dir == REPO / "var" / "dicomsync"
    assert sync.places["zips"]["Kind"] == "zipped_root"
    assert (REPO / sync.places["zips"]["Path"]).parent == REPO / "var"
    # scripts/run.sh with this file: tests/test_newcomer.py runs `make run` in a copy.


def test_docker_compose_mounts_exist_and_its_config_validates() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"orthanc-a", "orthanc-b", "postgres", "node-1", "node-2"}
    assert services["postgres"]["image"].startswith("postgres:")  # the cluster's database
    checked = 0
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        dockerfile = REPO / build["context"] / build["dockerfile"]
        assert "FROM ${ORTHANC_IMAGE}" in dockerfile.read_text()
        assert "orthancteam/orthanc" in dockerfile.read_text()
        mounts: dict[str, Path] = {}
        for volume in service["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                host = (REPO / source).resolve()
                assert host.exists(), f"{name}: mounted {source} does not exist"
                mounts[target] = host
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for target, host in mounts.items():
            if not target.startswith("/etc/orthanc/"):
                continue
            cfg = json.loads(host.read_text())
            assert routing.validate(cfg, target) == [], f"{name}: {host}"
            if routing.SECTION not in cfg:
                continue
            checked += 1
            script = cfg["PythonScript"]
            base = next(t for t in mounts if script.startswith(t + "/"))
            assert (mounts[base] / script[len(base) + 1 :]).is_file()
            assert (mounts["/dicomsync/shared"] / "__init__.py").is_file()
            for place in cfg[routing.SECTION]["Places"].values():
                if "PasswordEnv" in place:
                    assert place["PasswordEnv"] in service["environment"]
            queue = cfg[routing.SECTION].get("Queue", {})
            if "PasswordEnv" in queue:  # the two cluster nodes: one database, its user
                assert queue["PasswordEnv"] in service["environment"]
                assert cfg["PostgreSQL"]["Username"] != queue.get("Schema", "dicomsync")
    assert checked == 3


# --- the glue, under a stand-in orthanc module -------------------------------------------------


def test_glue_under_a_fake_orthanc(orthanc: OrthancProcess, tmp_path: Path) -> None:
    import fake_orthanc

    (tmp_path / "zips").mkdir()
    config = {
        "StorageDirectory": str(tmp_path / "db"),
        "StableAge": 1,
        routing.SECTION: {
            "Places": {"zips": {"Kind": "zipped_root", "Path": "zips"}},
            "Routes": [{"Destination": "zips", "Filter": {"Modality": "OT"}}],
            "PollInterval": 0.2,
            "MetricsInterval": 0.2,
        },
    }
    fake = fake_orthanc.install(orthanc.url, config, str(tmp_path / "orthanc.json"))
    try:
        from dicomsync.plugin import glue

        glue.register()
        assert fake.rest and fake.on_change
        assert not fake.on_stored  # nothing per instance: no OnStoredInstance callback at all
        study_uid = generate_uid()
        buf = BytesIO()
        make_instance(None, patient_id="FAKE", study_uid=study_uid, modality="OT").save_as(
            buf, enforce_file_format=True
        )
        orthanc.upload(buf.getvalue())
        study_id = orthanc_study_id("FAKE", study_uid)

        fake.change(fake.ChangeType.ORTHANC_STARTED)
        fake.change(fake.ChangeType.STABLE_STUDY, study_id)
        from plugin_helpers import wait_for

        def done() -> bool:
            out = fake.request("GET", "/dicomsync/status")
            return out.json()["Destinations"]["zips"]["Done"] == 1

        wait_for(done, timeout=30, what="the fake-driven job")
        assert len(list((tmp_path / "zips").rglob("*.zip"))) == 1
        wait_for(
            lambda: fake.metrics.get('dicomsync_delivered_instances{destination="zips"}') == 1,
            timeout=30,
            what="metrics",
        )

        bad = fake.request("POST", "/dicomsync/send", b"{oops")
        assert bad.status == 400 and "malformed JSON" in bad.json()["Message"]
        assert bad.headers["Content-Type"] == "application/json"
        assert fake.request("GET", "/dicomsync/backfill").status == 405
        fake.change(fake.ChangeType.STABLE_STUDY, "00000000-00000000-00000000-00000000-00000000")
        # the callback only hands the study to the intake thread, which logs it as vanished
        wait_for(
            lambda: any(level == "info" and "vanished" in text for level, text in fake.logs),
            timeout=10,
            what="the intake to log the vanished study",
        )
        fake.change(fake.ChangeType.ORTHANC_STOPPED)
        assert glue.APP is not None and glue.APP.pool is not None and not glue.APP.pool.running
    finally:
        fake_orthanc.uninstall()
