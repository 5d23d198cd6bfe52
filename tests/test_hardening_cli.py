"""Issue 9, the CLI's part: escaped output and logs, compare = send --dry-run, retries in the
CLI, a closed pipe, one-line errors, a password variable needed only at run time."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid
from test_send import make_study, places

from dicomsync.printable import PrintableFormatter, json_printable, shown

from conftest import Cli
from dicomdata import make_instance
from orthanc_server import OrthancProcess

# --- the class of characters ---------------------------------------------------------------

HOSTILE = [
    "new\nline",
    "carriage\rreturn",
    "esc\x1b[31mred",
    "tab\tx",
    "del\x7fx",
    "nel\u0085x",
    "ls\u2028x",
    "ps\u2029x",
    "rlo\u202egpj.exe",
    "zwsp\u200bx",
    "nbsp\u00a0x",
    "ideo\u3000x",
    "tag\U000e0041x",
]
UNDECODABLE = b"bad\xff\xfename"  # os.fsdecode gives lone surrogates: 'bad\udcff\udcfename'
KEPT = ["plain", "Müller 中文", "back\\slash", "emoji 😀", "a b"]


def printable_lines(text: str) -> list[str]:
    """The lines of ``text`` (split on "\\n" only), each asserted to hold no raw control char."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        assert line.isprintable(), f"raw non-printable character in {line!r}"
    return lines


@pytest.mark.parametrize("name", [*HOSTILE, os.fsdecode(UNDECODABLE)])
def test_shown_escapes_every_non_printable_character(name: str) -> None:
    out = shown(name)
    assert out.isprintable()
    assert out != name
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    # only the offending characters changed, each to a Python-style escape
    assert re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})", "", out) == "".join(
        c for c in name if c.isprintable()
    )


@pytest.mark.parametrize("name", KEPT)
def test_shown_keeps_printable_text(name: str) -> None:
    assert shown(name) == name


def test_json_output_stays_json_and_round_trips() -> None:
    data = {"names": [*HOSTILE, os.fsdecode(UNDECODABLE), *KEPT]}
    text = json_printable(json.dumps(data, indent=2, ensure_ascii=False))
    printable_lines(text)
    assert json.loads(text) == data


@pytest.fixture
def hostile_root(tmp_path: Path, cli: Cli) -> list[str]:
    """A dicom_root 'src' with one study under each hostile patient folder name."""
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "zips"), ("dicom_root", "dst"))
    names = [*HOSTILE, os.fsdecode(UNDECODABLE)]
    for name in names:
        make_study(tmp_path / "src" / name / "s", 1)
    return names


def test_hostile_names_print_one_line_each(tmp_path: Path, cli: Cli, hostile_root: list) -> None:
    n = len(hostile_root)
    found = cli("find", "src:*")
    assert len(printable_lines(found.stdout)) == 1 + n
    assert printable_lines(found.stderr) == []
    assert "src:rlo\\u202egpj.exe/s" in found.stdout
    assert "src:new\\x0aline/s" in found.stdout
    assert "src:bad\\udcff\\udcfename/s" in found.stdout
    # --json: every line printable, and the names come back exactly
    listed = json.loads(cli("find", "src:*", "--json").stdout)
    assert sorted(r["patient"] for r in listed) == sorted(hostile_root)
    printable_lines(cli("find", "src:*", "--json").stdout)

    ls = cli("place", "ls", "src")
    assert len(printable_lines(ls.stdout)) == 1 + n
    for dest in ("zips", "dst"):
        log = tmp_path / f"{dest}.log"
        sent = cli("-v", "--log-file", str(log), "send", "src:*", dest)
        assert len(printable_lines(sent.stdout)) == n + 1
        assert sent.stdout.splitlines()[-1].startswith(f"{n} sent, 0 duplicate, 0 failed")
        # console log lines (-v) and the log file: one record per line, nothing forged
        for line in printable_lines(sent.stderr):
            assert line.startswith("dicomsync"), line
        for line in printable_lines(log.read_text(encoding="utf-8")):
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} dicomsync", line), line
        compared = cli("compare", "src", dest)
        lines = printable_lines(compared.stdout)
        assert len(lines) == n + 3, compared.stdout
        assert lines[0] == "only in src: 0" and lines[1] == f"in both: {n}"
        assert lines[-1] == f"only in {dest}: 0"
        again = cli("send", "src:*", dest)
        assert printable_lines(again.stdout) == [again.stdout.splitlines()[-1]]
        assert again.stdout.startswith(f"0 sent, {n} duplicate, 0 failed")


def test_an_error_naming_a_hostile_path_is_one_line(tmp_path: Path, cli: Cli) -> None:
    cli("init")
    for name in HOSTILE:
        folder = tmp_path / f"root {name}"
        folder.mkdir()
        key = f"r{HOSTILE.index(name)}"
        cli("place", "add", "dicom_root", key, str(folder))
        folder.rmdir()
        result = cli("find", f"{key}:*", ok=False)
        assert result.exit_code == 1
        (line,) = printable_lines(result.stderr)
        assert line.startswith(f"Error: dicom_root place '{key}': root folder ")
        assert shown(name) in line
        assert printable_lines(result.stdout) == []


def test_plugin_log_handler_writes_one_line_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    fake = types.SimpleNamespace(LogInfo=said.append, LogWarning=said.append, LogError=said.append)
    if "orthanc" not in sys.modules:
        monkeypatch.setitem(sys.modules, "orthanc", fake)
    from dicomsync.plugin import log as plugin_log

    monkeypatch.setattr(plugin_log, "orthanc", fake)
    monkeypatch.setattr(logging.getLogger("dicomsync"), "level", logging.NOTSET)  # restored after
    logger = plugin_log.install()
    try:
        for name in HOSTILE:
            logging.getLogger("dicomsync.test").warning("%s: routing failed", name)
        try:
            raise ValueError("boom\nINFO forged line")
        except ValueError:
            logging.getLogger("dicomsync.test").error("x\ny", exc_info=True)
    finally:
        for h in [h for h in logger.handlers if isinstance(h, plugin_log.OrthancLogHandler)]:
            logger.removeHandler(h)
    assert len(said) == len(HOSTILE) + 1
    for text, name in zip(said, HOSTILE, strict=False):
        assert text == f"dicomsync: {shown(name)}: routing failed"
        assert "\n" not in text
    first, *rest = said[-1].split("\n")
    assert first == "dicomsync: x\\x0ay"
    assert rest and all(line.startswith("    ") and line.isprintable() for line in rest)
    # a traceback keeps its lines, all indented: none can pass for a record of its own
    assert rest[-2:] == ["    ValueError: boom", "    INFO forged line"]


def test_formatter_leaves_the_record_alone() -> None:
    record = logging.LogRecord("dicomsync.x", logging.INFO, __file__, 1, "a %s", ("b\nc",), None)
    assert PrintableFormatter("%(message)s").format(record) == "a b\\x0ac"
    assert record.getMessage() == "a b\nc" and record.msg == "a %s"


def test_queue_status_lines_escape_what_the_remote_says() -> None:
    from dicomsync.cli.queue import _line, _sink_line

    first, second = _line("b\nx", {"Done": 1, "LastError": "boom\r\x1b[2KINFO ok"}).split("\n")
    assert first.startswith("b\\x0ax: 1 done, ")
    assert second == "    last error: boom\\x0d\\x1b[2KINFO ok"
    first, second = _sink_line("s", {"Kind": "k\u202e", "Error": "x\ny"}).split("\n")
    assert first.startswith("sink s (k\\u202e): ") and second == "    last error: x\\x0ay"


# --- compare = send --dry-run ----------------------------------------------------------------

KINDS = ["dicom_root", "zipped_root", "orthanc"]
PAIRS = [(a, b) for a in KINDS for b in KINDS if not (a == b == "orthanc")]


def add_place(cli: Cli, tmp_path: Path, kind: str, key: str, orthanc_url: str) -> None:
    if kind == "orthanc":
        cli("place", "add", "orthanc", key, orthanc_url)
    else:
        (tmp_path / key).mkdir(exist_ok=True)
        cli("place", "add", kind, key, str(tmp_path / key))


def uid_keys(cli: Cli, place: str) -> dict[str, list[str]]:
    """StudyInstanceUID -> the keys of ``place`` holding it (through `place ls --json`)."""
    out: dict[str, list[str]] = {}
    for row in json.loads(cli("place", "ls", place, "--json").stdout):
        out.setdefault(row["study_uid"], []).append(row["key"])
    return out


def dry_run_decisions(cli: Cli, a: str, b: str) -> dict[str, str]:
    """Per study of A, what `send A B --dry-run` says: only_a, partial or both."""
    totals = {
        f"{a}:{r['key']}": r["instances"]
        for r in json.loads(cli("place", "ls", a, "--json").stdout)
    }
    result = cli("send", f"{a}:*", b, "--dry-run")
    assert "failed" not in result.stderr
    decided = dict.fromkeys(totals, "both")  # a duplicate is not printed
    for line in result.stdout.splitlines():
        m = re.fullmatch(r"would send (\S+) \((\d+) instances\)", line)
        if m:
            decided[m[1]] = "only_a" if int(m[2]) == totals[m[1]] else "partial"
    return decided


def compare_decisions(cli: Cli, a: str, b: str) -> tuple[dict[str, str], dict[str, list]]:
    rows = json.loads(cli("compare", a, b, "--json").stdout)
    decided = {r["a"]: cat for cat in ("only_a", "both", "partial") for r in rows[cat]}
    assert rows.get("failed", []) == [] and rows.get("empty", []) == []
    return decided, rows


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_compare_agrees_with_send_dry_run(
    tmp_path: Path, cli: Cli, kind_a: str, kind_b: str, request: pytest.FixtureRequest
) -> None:
    url = ""
    if "orthanc" in (kind_a, kind_b):
        url = request.getfixturevalue("orthanc").url
    cli("init")
    # the seed: X twice (two keys, same files), Y, Z, W; and V, only ever in B
    seed = tmp_path / "seed"
    x = make_study(seed / "pa" / "s1", 3, patient="PA")
    shutil.copytree(seed / "pa" / "s1", seed / "pb" / "s1copy")
    make_study(seed / "pa" / "s2", 3, patient="PA")
    make_study(seed / "pa" / "s3", 2, patient="PA")
    make_study(seed / "pa" / "s4", 2, patient="PA")
    cli("place", "add", "dicom_root", "seed", str(seed))
    if kind_a == "dicom_root":
        cli("place", "add", "dicom_root", "a", str(seed))
    else:
        add_place(cli, tmp_path, kind_a, "a", url)
        cli("send", "seed:*", "a")
    add_place(cli, tmp_path, kind_b, "b", url)
    keys = {uid: sorted(k) for uid, k in uid_keys(cli, "a").items()}
    seed_uid = {k[0]: uid for uid, k in uid_keys(cli, "seed").items() for k in [sorted(k)]}
    x_uid, y_uid, z_uid = seed_uid["pa/s1"], seed_uid["pa/s2"], seed_uid["pa/s3"]
    # B: all of Z and X (at A's first key of X), 2 of Y's 3 instances at A's key, and V
    cli("send", f"a:{keys[z_uid][0]}", "b")
    cli("send", f"a:{keys[x_uid][0]}", "b")
    part = tmp_path / "part"
    y_files = sorted((seed / "pa" / "s2").glob("*.dcm"))
    for f in y_files[:2]:
        (part / keys[y_uid][0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, part / keys[y_uid][0] / f.name)
    make_instance(part / "pv" / "sv" / "v.dcm", patient_id="PV", study_uid=generate_uid())
    cli("place", "add", "dicom_root", "part", str(part))
    cli("send", "part:*", "b")

    compared, rows = compare_decisions(cli, "a", "b")
    assert compared == dry_run_decisions(cli, "a", "b")
    # every study of A is reported once; every class occurs
    assert sorted(compared) == sorted(f"a:{k}" for ks in keys.values() for k in ks)
    assert {"only_a", "both", "partial"} <= set(compared.values())
    assert [r["missing_in_b"] for r in rows["partial"]] == [1]
    assert len(rows["only_b"]) == 1  # V
    if kind_a != "orthanc":  # X under two keys of A: both reported
        assert len(keys[x_uid]) == 2 and len(x) == 3
        second = compared[f"a:{keys[x_uid][1]}"]
        assert second == ("both" if kind_b == "orthanc" else "only_a")

    # after the send, compare says B holds everything, as send then does
    cli("send", "a:*", "b")
    compared, rows = compare_decisions(cli, "a", "b")
    assert set(compared.values()) == {"both"}
    assert compared == dry_run_decisions(cli, "a", "b")


def test_compare_b_is_one_place(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"), ("zipped_root", "z1"), ("zipped_root", "z2"))
    result = cli("compare", "src", "z*:*", ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: 'z*:*' matches 2 places (z1, z2); B of compare is one place, "
        "as the destination of send is\n"
    )


# --- retries inside the CLI ------------------------------------------------------------------


class FaultyProxy:
    """An HTTP proxy to a real Orthanc that fails the first ``faults`` requests: a 503 answer,
    or (``mode="reset"``) a connection closed without an answer. Counts stored instances."""

    def __init__(self, target: str, faults: int, mode: str = "503") -> None:
        self.target, self.faults, self.mode = target, faults, mode
        self.lock = threading.Lock()
        self.failed = 0
        self.stored = 0  # POST /instances that Orthanc answered with 200
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    fail = proxy.failed < proxy.faults
                    proxy.failed += fail
                if fail and proxy.mode == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")
                }
                r = requests.request(
                    method, proxy.target + self.path, data=body, headers=headers, timeout=60
                )
                if method == "POST" and self.path == "/instances" and r.status_code == 200:
                    with proxy.lock:
                        proxy.stored += 1
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self) -> None:
                self.handle_one("GET")

            def do_POST(self) -> None:
                self.handle_one("POST")

            def do_DELETE(self) -> None:
                self.handle_one("DELETE")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty(orthanc: OrthancProcess) -> Iterator[list[FaultyProxy]]:
    made: list[FaultyProxy] = []
    yield made
    for p in made:
        p.close()


def fast_retries(cli: Cli, attempts: int = 5) -> None:
    data = json.loads(cli.config.read_text())
    data["Retry"] = {"BaseDelay": 0.01, "MaxDelay": 0.05, "MaxAttempts": attempts}
    cli.config.write_text(json.dumps(data))


@pytest.mark.parametrize("mode", ["503", "reset"])
@pytest.mark.parametrize("faults", [1, 3])
def test_transient_failures_are_retried_and_sent_once(
    tmp_path: Path,
    cli: Cli,
    orthanc: OrthancProcess,
    faulty: list[FaultyProxy],
    mode: str,
    faults: int,
) -> None:
    proxy = FaultyProxy(orthanc.url, faults, mode)
    faulty.append(proxy)
    places(tmp_path, cli, ("dicom_root", "src"))
    uids = make_study(tmp_path / "src" / "p" / "s", 3)
    cli("place", "add", "orthanc", "pacs", proxy.url)
    fast_retries(cli)
    result = cli("send", "src:*", "pacs")
    assert result.stdout.splitlines()[-1].startswith("1 sent, 0 duplicate, 0 failed (3 instances")
    retries = [line for line in result.stderr.splitlines() if "trying again in" in line]
    assert len(retries) == faults, result.stderr
    assert all(line.startswith("dicomsync.transfer WARNING: ") for line in retries)
    assert proxy.stored == 3  # each instance stored once: no duplicate uploads
    assert orthanc.sop_uids() == uids
    again = cli("send", "src:*", "pacs")
    assert again.stdout.startswith("0 sent, 1 duplicate, 0 failed")


def test_retries_are_bounded_and_a_down_destination_costs_one_studys_waits(
    tmp_path: Path, cli: Cli, orthanc: OrthancProcess, faulty: list[FaultyProxy]
) -> None:
    proxy = FaultyProxy(orthanc.url, 10**6)  # always 503
    faulty.append(proxy)
    places(tmp_path, cli, ("dicom_root", "src"))
    for i in range(3):
        make_study(tmp_path / "src" / f"p{i}" / "s", 1)
    cli("place", "add", "orthanc", "pacs", proxy.url)
    fast_retries(cli, attempts=4)
    result = cli("send", "src:*", "pacs", ok=False)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith("0 sent, 0 duplicate, 3 failed")
    retries = [line for line in result.stderr.splitlines() if "trying again in" in line]
    assert len(retries) == 3  # attempts 1-3 of the first study; the others get one each
    assert "src:p0/s: attempt 3 of 4 failed (" in retries[-1]
    assert proxy.failed == 4 + 1 + 1
    # --retries overrides the config's attempts
    proxy.failed = 0
    result = cli("send", "src:p0/s", "pacs", "--retries", "1", ok=False)
    assert [ln for ln in result.stderr.splitlines() if "trying again in" in ln] != []
    assert proxy.failed == 2


def test_unreachable_prepare_stops_the_batch_with_one_line(tmp_path: Path) -> None:
    from dicomsync.errors import Unreachable
    from dicomsync.places.dicom_root import DicomRoot
    from dicomsync.queue.base import RetryPolicy
    from dicomsync.transfer import send

    for i in range(4):
        make_study(tmp_path / "src" / f"p{i}" / "s", 1)
    (tmp_path / "dst").mkdir()
    calls: list[str] = []

    class Down(DicomRoot):
        def prepare(self, identities: object) -> None:
            calls.append("prepare")
            raise Unreachable("XNAT https://x is unreachable (no answer) during login")

        def holds(self, key: str, identity: object) -> frozenset[str]:
            calls.append("holds")
            raise AssertionError("no study may be tried")

    src = DicomRoot("src", tmp_path / "src")
    dest = Down("dst", tmp_path / "dst")
    waits: list[float] = []
    with pytest.raises(Unreachable):
        send(
            [(src, r) for r in src.studies()],
            dest,
            retry=RetryPolicy(2.0, 60.0, 3),
            sleep=waits.append,
        )
    assert calls == ["prepare"] * 3
    assert len(waits) == 2 and 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 4.0


def test_a_source_that_stays_down_costs_one_studys_waits(tmp_path: Path) -> None:
    from dicomsync.errors import Unreachable
    from dicomsync.places.dicom_root import DicomRoot
    from dicomsync.queue.base import RetryPolicy
    from dicomsync.transfer import send

    for i in range(4):
        make_study(tmp_path / "src" / f"p{i}" / "s", 1)
    (tmp_path / "dst").mkdir()
    down = {"p0/s", "p1/s", "p2/s"}  # p3/s reads again

    class Flaky(DicomRoot):
        def identity(self, ref):  # type: ignore[no-untyped-def]
            if ref.key in down:
                raise Unreachable(f"{ref}: no answer")
            return super().identity(ref)

    src = Flaky("src", tmp_path / "src")
    waits: list[float] = []
    summary = send(
        [(src, r) for r in src.studies()],
        DicomRoot("dst", tmp_path / "dst"),
        retry=RetryPolicy(1.0, 60.0, 3),
        sleep=waits.append,
    )
    assert [o.status for o in summary.outcomes] == ["failed"] * 3 + ["sent"]
    assert len(waits) == 2  # p0/s: attempts 1 and 2; p1/s and p2/s: one attempt each


# --- a closed pipe, and the password variable ---------------------------------------------------


def dicomsync_cmd(cli: Cli, *args: str) -> list[str]:
    return [sys.executable, "-m", "dicomsync.cli.main", "--config", str(cli.config), *args]


def test_output_into_head_ends_quietly(tmp_path: Path, cli: Cli) -> None:
    places(tmp_path, cli, ("dicom_root", "src"))
    for i in range(1500):  # ~330 KB of output: far more than a pipe holds
        (tmp_path / "src" / "p" / f"{i:04d}{'s' * 200}").mkdir(parents=True)
    script = f"{' '.join(map(repr, dicomsync_cmd(cli, 'find', 'src:*')))} | head -1"
    done = subprocess.run(
        ["bash", "-c", script + '; echo "status=${PIPESTATUS[0]}" >&2'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "found 1500:\n"
    assert done.stderr == "status=141\n"


def test_reader_gone_before_the_first_write(tmp_path: Path, cli: Cli) -> None:
    """The whole output is buffered and only written at exit: still quiet."""
    places(tmp_path, cli, ("dicom_root", "src"))
    make_study(tmp_path / "src" / "p" / "s", 1)
    r, w = os.pipe()
    os.close(r)
    done = subprocess.run(
        dicomsync_cmd(cli, "find", "src:*"), stdout=w, stderr=subprocess.PIPE, timeout=120
    )
    os.close(w)
    assert done.stderr == b""
    assert done.returncode == 141


def test_unexpected_errors_are_one_line(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("init")
    import dicomsync.cli.init as init_module

    def broken(*_: object, **__: object) -> dict[str, str]:
        raise KeyError("Places")

    monkeypatch.setattr(init_module.PLACES, "availability", broken)
    result = cli("status", ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: unexpected error: KeyError: 'Places' (-vv shows the traceback)\n"
    )
    assert "Traceback" in cli("-vv", "status", ok=False).stderr


def test_password_variable_is_needed_at_run_time_only(
    tmp_path: Path, cli: Cli, orthanc: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PACS_SECRET_UNSET", raising=False)
    places(tmp_path, cli, ("dicom_root", "src"))
    for i in range(3):
        make_study(tmp_path / "src" / f"p{i}" / "s", 1)
    added = cli(
        "place",
        "add",
        "orthanc",
        "pacs",
        orthanc.url,
        "--user",
        "u",
        "--password-env",
        "PACS_SECRET_UNSET",
    )
    assert added.stdout == f"added orthanc place 'pacs': Orthanc at '{orthanc.url}'\n"
    assert json.loads(cli.config.read_text())["Places"]["pacs"]["PasswordEnv"] == (
        "PACS_SECRET_UNSET"
    )
    # the run needs it: one line, before any study, for find and for send
    message = "Error: orthanc place 'pacs': environment variable PACS_SECRET_UNSET is not set\n"
    assert cli("find", "pacs:*", ok=False).stderr == message
    result = cli("send", "src:*", "pacs", ok=False)
    assert result.exit_code == 1 and result.stderr == message and result.stdout == ""


# --- CI runs what `make check` runs -----------------------------------------------------------


def run_ci(tmp_path: Path, make_fails: str | None, have_make: bool = True) -> tuple[int, list]:
    """.ci/run in a copy of the repository's layout, with stub make (and apt-get) on PATH."""
    from orthanc_server import REPO_ROOT

    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO_ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    make = f'#!/bin/bash\necho "make $*" >> {calls}\n[ "$1" != "{make_fails}" ]\n'
    for tool in ("dirname", "cat", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)  # type: ignore[arg-type]
    if have_make:
        (bin_dir / "make").write_text(make)
        (bin_dir / "make").chmod(0o755)
    (bin_dir / "apt-get").write_text(
        f'#!/bin/bash\necho "apt-get $*" >> {calls}\n'
        f'if [ "$1" = install ]; then cat > {bin_dir}/make <<"X"\n{make}X\n'
        f"chmod +x {bin_dir}/make; fi\n"
    )
    (bin_dir / "apt-get").chmod(0o755)
    done = subprocess.run(
        ["/bin/bash", str(tmp_path / ".ci" / "run")],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_ci_runs_lint_typecheck_and_the_readme_test_command(tmp_path: Path) -> None:
    assert run_ci(tmp_path, None) == (0, ["make lint", "make typecheck", "make test"])


@pytest.mark.parametrize("failing", ["lint", "typecheck", "test"])
def test_ci_fails_when_any_check_fails(tmp_path: Path, failing: str) -> None:
    code, calls = run_ci(tmp_path, failing)
    assert code == 1
    assert calls == ["make lint", "make typecheck", "make test"]  # every check still runs


def test_ci_installs_make_on_a_bare_machine(tmp_path: Path) -> None:
    code, calls = run_ci(tmp_path, None, have_make=False)
    assert code == 0
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install -y -qq --no-install-recommends make")
    assert calls[2:] == ["make lint", "make typecheck", "make test"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "0", "-5", "abc", ""])
@pytest.mark.parametrize(
    "command",
    [
        ["backfill", "http://127.0.0.1:9", "dest", "--timeout"],
        ["place", "add", "xnat_pre_archive", "x", "https://x.org", "P", "u", "--timeout"],
    ],
)
def test_seconds_options_refuse_non_finite_numbers(
    cli: Cli, command: list[str], value: str
) -> None:
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""
    result = cli(*command, value, ok=False)
    assert result.exit_code == 2
    assert "Invalid value for '--timeout'" in result.output
    assert not (cli.config.exists() and "Timeout" in cli.config.read_text())


def test_tags_output_is_json_lines_with_no_raw_display_characters(tmp_path: Path, cli: Cli) -> None:
    """A DICOM value can hold U+2028 (a line break to many readers) or U+202E; ``tags``
    prints one JSON object per line, each character that changes display escaped."""
    name = "Evil\u2028Line^\u202egpj.exe\u0085"
    path = tmp_path / "one.dcm"
    make_instance(
        path,
        patient_id="P\u2029",
        study_uid=generate_uid(),
        patient_name=name,
        SpecificCharacterSet="ISO_IR 192",
    )
    result = cli("tags", str(path))
    lines = result.output.splitlines()
    assert len(lines) == 1
    assert not any(ch in result.output for ch in "\u2028\u2029\u202e\u0085")
    event = json.loads(lines[0])
    assert name in json.dumps(event, ensure_ascii=False)


@pytest.mark.parametrize("command", [["queue", "status"], ["backfill", "--no-wait"]])
def test_queue_commands_refuse_credentials_in_the_orthanc_url(cli: Cli, command: list[str]) -> None:
    url = "http://alice:Zebra-Secret-99@127.0.0.1:9"
    args = [*command[:1], url, *(["dest"] if command[0] == "backfill" else []), *command[1:]]
    if command[0] == "queue":
        args = ["queue", command[1], url]
    result = cli(*args, ok=False)
    assert result.exit_code == 1
    assert "Zebra-Secret-99" not in result.output
    assert "may not hold a user or password" in result.output
