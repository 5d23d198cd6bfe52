"""``dicomsync tags / index / replicate / sink`` through click's runner, with real files,
a real SQLite index and the HEC stand-in."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from test_tags_flatten import dose_files

from dicomsync.identity import safe_component

from conftest import Cli
from dicomdata import data, pcir_study_files
from servers.hec import HecServer, Token

TOKEN = "11111111-2222-3333-4444-555555555555"


def build_tree(root: Path, files: list[Path]) -> dict[str, set[str]]:
    """See ``build_tree_uids``; study key -> SOP UIDs."""
    return {k: sops for k, (_, sops) in build_tree_uids(root, files).items()}


def build_tree_uids(root: Path, files: list[Path]) -> dict[str, tuple[str, set[str]]]:
    """A dicom_root: root/<PatientID>/<StudyInstanceUID>/<file>; returns study key -> SOP UIDs."""
    studies: dict[str, tuple[str, set[str]]] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        folder = root / safe_component(str(ds.PatientID)) / safe_component(str(ds.StudyInstanceUID))
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, folder / f"{f.name}.dcm")
        key = f"{folder.parent.name}/{folder.name}"
        studies.setdefault(key, (str(ds.StudyInstanceUID), set()))[1].add(str(ds.SOPInstanceUID))
    return studies


@pytest.fixture
def setup(cli: Cli, tmp_path: Path) -> tuple[Cli, dict[str, set[str]], set[str]]:
    """A config with place 'src' (dose reports + CT/MR studies) and an empty 'dest'."""
    cli("init")
    ct_mr = [f for files in list(pcir_study_files().values())[:2] for f in files]
    tree = build_tree_uids(tmp_path / "src", dose_files() + ct_mr)
    studies = {k: sops for k, (_, sops) in tree.items()}
    dose_studies = {
        str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        for f in dose_files()
        if str(pydicom.dcmread(f, stop_before_pixels=True).Modality) == "SR"
    }
    dose_keys = {k for k, (uid, _) in tree.items() if uid in dose_studies}
    (tmp_path / "dest").mkdir()
    (tmp_path / "dose_keys.json").write_text(json.dumps(sorted(dose_keys)))
    cli("place", "add", "dicom_root", "src", str(tmp_path / "src"))
    cli("place", "add", "dicom_root", "dest", str(tmp_path / "dest"))
    return cli, studies, dose_studies


@pytest.fixture(scope="module")
def hec_server() -> Iterator[HecServer]:
    server = HecServer(tokens=[Token(TOKEN)], users={"admin": "pw"}).start()
    yield server
    server.stop()


# --- tags ----------------------------------------------------------------------------------
def test_tags_prints_json_lines(cli: Cli) -> None:
    result = cli("tags", str(data("rdsr")))
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert {line["sourcetype"] for line in lines} == {
        "dicomsync:instance",
        "dicomsync:dose_report",
        "dicomsync:dose_event",
    }
    tap = cli(
        "tags", "--sourcetype", "dose_event", str(data("rdsr", "CT-RDSR-Siemens_Flash-TAP-SS.dcm"))
    )
    events = [json.loads(line) for line in tap.output.splitlines()]
    assert [e["event"]["CT Dose"]["DLP"] for e in events] == [11.51, 1.2, 3.61, 708.2]


def test_tags_errors(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"hello, not DICOM" * 20)
    result = cli("tags", str(junk), ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {junk}: not a DICOM file"
    result = cli("tags", str(tmp_path / "missing"), ok=False)
    assert result.output.strip() == f"Error: {tmp_path / 'missing'}: no such file or folder"
    # inside a folder, a non-DICOM file is skipped with a warning
    (tmp_path / "mixed").mkdir()
    shutil.copyfile(junk, tmp_path / "mixed" / "notes.txt")
    shutil.copyfile(data("images", "CT_small.dcm"), tmp_path / "mixed" / "ct.dcm")
    result = cli("tags", str(tmp_path / "mixed"))
    assert len([line for line in result.output.splitlines() if line.startswith("{")]) == 1


# --- sinks ---------------------------------------------------------------------------------
def test_sink_add_list_remove(cli: Cli, tmp_path: Path, hec_server: HecServer) -> None:
    cli("init")
    out = cli("sink", "add", "sqlite_index", "local", str(tmp_path / "idx.sqlite")).output
    assert out.strip() == f"added sqlite_index sink 'local': sqlite_index {tmp_path / 'idx.sqlite'}"
    out = cli(
        "sink", "add", "splunk_hec", "splunk", hec_server.url, "--index", "dicom", "--ack"
    ).output
    assert out.strip() == (
        f"added splunk_hec sink 'splunk': splunk_hec {hec_server.url} "
        "(index=dicom, token from $SPLUNK_HEC_TOKEN, ack)"
    )
    cfg = json.loads((tmp_path / "dicomsync.json").read_text())
    assert cfg["Sinks"]["splunk"] == {
        "Kind": "splunk_hec",
        "Url": hec_server.url,
        "TokenEnv": "SPLUNK_HEC_TOKEN",
        "Index": "dicom",
        "Ack": True,
    }
    assert TOKEN not in json.dumps(cfg)  # only the variable name is stored
    listing = cli("sink", "list").output.splitlines()
    assert listing[0].startswith("key ") and listing[1].startswith("------  ")
    assert listing[2].startswith("local ") and listing[3].startswith("splunk ")
    dup = cli("sink", "add", "sqlite_index", "local", str(tmp_path / "x.sqlite"), ok=False)
    assert dup.output.strip() == "Error: a sink called 'local' already exists"
    bad = cli("sink", "add", "sqlite_index", "a:b", str(tmp_path / "x.sqlite"), ok=False)
    assert bad.output.strip() == "Error: invalid sink key 'a:b': no ':', '/' or '*' allowed"
    assert cli("sink", "remove", "splunk").output.strip() == "removed sink 'splunk'"
    gone = cli("sink", "remove", "splunk", ok=False)
    assert gone.output.strip() == "Error: unknown sink 'splunk' (configured: local)"


def test_index_into_sqlite_then_repeat_sends_nothing(
    setup: tuple[Cli, dict[str, set[str]], set[str]], tmp_path: Path
) -> None:
    cli, studies, _ = setup
    cli("sink", "add", "sqlite_index", "local", str(tmp_path / "idx.sqlite"))
    instances = sum(len(s) for s in studies.values())
    first = cli("index", "src:*", "--sink", "local").output.strip().splitlines()[-1]
    assert first.startswith(f"{len(studies)} studies, {instances} instances indexed (")
    assert first.endswith(", 0 already in local")
    again = cli("index", "src:*", "--sink", "local").output.strip().splitlines()[-1]
    assert (
        again
        == f"{len(studies)} studies, 0 instances indexed (0 events sent), {instances} already in local"
    )


def test_index_into_hec_then_repeat_sends_nothing(
    setup: tuple[Cli, dict[str, set[str]], set[str]],
    hec_server: HecServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cli, studies, _ = setup
    hec_server.reset()
    monkeypatch.setenv("SPLUNK_HEC_TOKEN", TOKEN)
    cli("sink", "add", "splunk_hec", "splunk", hec_server.url)
    cli("index", "src:*", "--sink", "splunk")
    ids = hec_server.event_ids()
    assert len(ids) == len(set(ids)) > sum(len(s) for s in studies.values())
    requests_before = len(hec_server.state.requests)
    out = cli("index", "src:*", "--sink", "splunk").output
    assert "0 instances indexed (0 events sent)" in out
    assert len(hec_server.state.requests) == requests_before
    # the token is wrong: one clear line, exit 1
    monkeypatch.setenv("SPLUNK_HEC_TOKEN", "wrong")
    cli("sink", "add", "splunk_hec", "splunk2", hec_server.url)
    bad = cli("index", "src:*", "--sink", "splunk2", ok=False)
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1] == (
        f"Error: splunk_hec 'splunk2': HEC {hec_server.url}/services/collector/event (token "
        "from $SPLUNK_HEC_TOKEN): not authorised (403: code 4, Invalid token); check the "
        "credentials; sink stopped, events kept"
    )
    assert "attempt 1 of" not in bad.output  # a refused token is not tried again
    # the envelope's source is the instance's file path
    sources = {e["source"] for e in hec_server.state.events}
    assert all(src.startswith(str(tmp_path / "src")) for src in sources), sources


def _retry_fast(tmp_path: Path, attempts: int) -> None:
    cfg_path = tmp_path / "dicomsync.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["Retry"] = {"BaseDelay": 0.01, "MaxDelay": 0.02, "MaxAttempts": attempts}
    cfg_path.write_text(json.dumps(cfg))


def test_index_into_hec_retries_a_busy_hec_with_the_retry_policy(
    setup: tuple[Cli, dict[str, set[str]], set[str]],
    hec_server: HecServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Issue 9, point 13: a transient HEC failure is retried by the CLI (one layer, the
    plugin's RetryPolicy), not by the sink, and nothing reaches Splunk twice."""
    cli, studies, _ = setup
    hec_server.reset()
    monkeypatch.setenv("SPLUNK_HEC_TOKEN", TOKEN)
    cli("sink", "add", "splunk_hec", "splunk", hec_server.url)
    _retry_fast(tmp_path, attempts=4)
    hec_server.busy(3)
    out = cli("index", "src:*", "--sink", "splunk").output
    assert out.count("attempt ") == 3 and "attempt 3 of 4 failed" in out
    assert "server busy or failing (503: code 9, Server is busy)" in out
    ids = hec_server.event_ids()
    assert len(ids) == len(set(ids)) > sum(len(s) for s in studies.values())
    statuses = [s for p, s in hec_server.state.requests if p == "/services/collector/event"]
    assert statuses[:3] == [503] * 3  # one request per attempt: no retry inside the sink
    # a run longer than the policy: the command fails after MaxAttempts, one line each
    cli("sink", "add", "splunk_hec", "splunk3", hec_server.url)
    hec_server.busy(100)
    bad = cli("index", "src:*", "--sink", "splunk3", ok=False)
    assert bad.exit_code == 1
    assert bad.output.count("trying again in") == 3
    assert bad.output.strip().splitlines()[-1].startswith("Error: splunk_hec 'splunk3'")
    hec_server.busy(0)


def test_index_into_hec_with_ack_keeps_batches_in_flight(
    setup: tuple[Cli, dict[str, set[str]], set[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With Ack, the studies' batches wait for their acks together, not one by one."""
    cli, studies, _ = setup
    server = HecServer(tokens=[Token(TOKEN, use_ack=True)]).start()
    try:
        server.state.ack_delay = 0.25
        monkeypatch.setenv("SPLUNK_HEC_TOKEN", TOKEN)
        cli("sink", "add", "splunk_hec", "acked", server.url, "--ack")
        out = cli("index", "src:*", "--sink", "acked").output
        ids = server.event_ids()
        assert len(ids) == len(set(ids)) and f"{len(studies)} studies" in out
        assert f"({len(ids)} events sent)" in out
        posts = [p for p, _ in server.state.requests if p == "/services/collector/event"]
        polls = [p for p, _ in server.state.requests if p == "/services/collector/ack"]
        assert len(posts) >= len(studies) > 1
        # waiting for each batch in turn would poll at least once per batch
        assert len(polls) < len(posts), (len(polls), len(posts))
    finally:
        server.stop()


def _dest_studies(tmp_path: Path) -> set[str]:
    out = set()
    for f in (tmp_path / "dest").rglob("*"):
        if f.is_file():
            out.add(str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID))
    return out


def test_replicate_where_modality_sr_copies_only_dose_studies(
    setup: tuple[Cli, dict[str, set[str]], set[str]], tmp_path: Path
) -> None:
    cli, studies, dose_studies = setup
    cli("sink", "add", "sqlite_index", "local", str(tmp_path / "idx.sqlite"))
    cli("index", "src:*", "--sink", "local")
    dose_keys = json.loads((tmp_path / "dose_keys.json").read_text())  # study folders with an SR
    dry = cli("replicate", "src", "dest", "--where", "Modality=SR", "--dry-run").output
    assert (
        sorted(line.split(" ")[2][4:] for line in dry.splitlines() if line.startswith("would send"))
        == dose_keys
    )
    out = cli("replicate", "src", "dest", "--where", "Modality=SR").output
    assert len([line for line in out.splitlines() if line.startswith("sent ")]) == len(dose_keys)
    assert _dest_studies(tmp_path) == dose_studies
    assert len(dose_studies) < len(studies)  # the CT/MR studies stayed behind
    again = cli("replicate", "src", "dest", "--where", "Modality=SR").output
    assert f"0 sent, {len(dose_keys)} duplicate" in again


def test_replicate_through_splunk_search(
    setup: tuple[Cli, dict[str, set[str]], set[str]],
    tmp_path: Path,
    hec_server: HecServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli, _, _ = setup
    hec_server.reset()
    monkeypatch.setenv("SPLUNK_HEC_TOKEN", TOKEN)
    monkeypatch.setenv("SPLUNK_USER", "admin")
    monkeypatch.setenv("SPLUNK_PASSWORD", "pw")
    cli("sink", "add", "splunk_hec", "splunk", hec_server.url)
    cfg_path = tmp_path / "dicomsync.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["Sinks"]["splunk"].update(
        SearchUrl=hec_server.url, SearchUserEnv="SPLUNK_USER", SearchPasswordEnv="SPLUNK_PASSWORD"
    )
    cfg_path.write_text(json.dumps(cfg))
    cli("index", "src:*", "--sink", "splunk")
    out = cli("replicate", "src", "dest", "--where", '"CT Dose.Mean CTDIvol">5').output
    tap = "1.3.6.1.4.1.5962.99.1.2662687737.2058515598.1471541535737.3.0"  # TAP-SS: 9.91 mGy
    assert tap in _dest_studies(tmp_path)
    assert "sent " in out
    assert "'CT Dose.Mean CTDIvol'>5" in hec_server.state.searches[-1]


def test_replicate_errors(setup: tuple[Cli, dict[str, set[str]], set[str]], tmp_path: Path) -> None:
    cli, _, _ = setup
    none = cli("replicate", "src", "dest", "--where", "Modality=SR", ok=False)
    assert none.output.strip() == "Error: no sink is configured; add one with 'dicomsync sink add'"
    cli("sink", "add", "sqlite_index", "a", str(tmp_path / "a.sqlite"))
    cli("sink", "add", "sqlite_index", "b", str(tmp_path / "b.sqlite"))
    several = cli("replicate", "src", "dest", "--where", "Modality=SR", ok=False)
    assert (
        several.output.strip()
        == "Error: several sinks are configured (a, b); choose one with --sink"
    )
    bad = cli("replicate", "src", "dest", "--where", "Modality", "--sink", "a", ok=False)
    assert bad.output.strip() == (
        "Error: invalid index query 'Modality': expected an operator (=, !=, <, >, <=, >=) "
        "after 'Modality' at column 9"
    )
    nothing = cli("replicate", "src", "dest", "--where", "Modality=XX", "--sink", "a")
    assert nothing.output.strip() == "no studies of src:* match Modality=XX"
