"""Issue 9, points 1 and 10 (config): a hostile ``dicomsync.json`` is one line, and no
numeric option takes a number that is not finite.

- A file nested deeper than ``jsonsafe.MAX_DEPTH`` (100,000 ``[``, or deep inside a
  place) gives one ``ConfigError`` line through the CLI, exit code 1, no traceback.
- ``NaN``, ``Infinity``, ``-Infinity`` (Python's json accepts them) and ``1e999`` (which
  becomes infinity) are refused anywhere in the file, with where they are.
- Every numeric option of every place kind, sink kind, ``Retry`` and the plugin's
  ``DicomSync`` section refuses NaN, infinities, overflowing integers, strings and
  booleans (``True`` is an ``int`` in Python). A new kind must be added to the table, and
  the tables must list every numeric option the kinds declare (``dicomsync.options``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dicomsync import jsonsafe, options, routing
from dicomsync.config import Config, finite_number, is_finite_number, non_finite_path
from dicomsync.errors import ConfigError
from dicomsync.places.base import PLACES
from dicomsync.queue import RetryPolicy
from dicomsync.queue.base import RetryOptions
from dicomsync.sinks.base import SINKS, build_sink

from conftest import Cli

BAD_NUMBERS: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    json.loads("1e999"),
    -json.loads("1e999"),
    "nan",
    "inf",
    "5",
    True,
    False,
    [5],
    {"5": 5},
]
BAD_IDS = [repr(v)[:12] for v in BAD_NUMBERS]
HUGE = 10**400  # an int: finite, but not as a float; refused where seconds are expected
FLOAT_OPTIONS = frozenset(
    {
        "Timeout",
        "AckTimeoutSeconds",
        "AckPollSeconds",
        "TimeoutSeconds",
        "BaseDelay",
        "MaxDelay",
        "LeaseSeconds",
        "PollInterval",
        "MetricsInterval",
    }
)


def error_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


# --- the file --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"Places": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",
        '{"Places": {}, "x": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
    ],
    ids=["arrays", "in-a-place", "objects"],
)
def test_deep_config_is_one_line(cli: Cli, text: str) -> None:
    cli.config.write_text(text)
    for args in (("place", "list"), ("find", "a:*"), ("sink", "list")):
        assert error_line(cli(*args, ok=False)) == (
            f"Error: {cli.config} is not valid JSON "
            f"(JSON nested deeper than {jsonsafe.MAX_DEPTH} levels)"
        )


@pytest.mark.parametrize(
    ("literal", "where"),
    [
        ('{"Retry": {"BaseDelay": NaN}}', "Retry.BaseDelay"),
        (
            '{"Places": {"p": {"Kind": "orthanc", "Url": "http://h", "Timeout": Infinity}}}',
            "Places.p.Timeout",
        ),
        ('{"Places": {}, "Routes": [{"Concurrency": -Infinity}]}', "Routes[0].Concurrency"),
        ('{"Sinks": {"s": {"Kind": "sqlite_index", "Path": "i", "X": 1e999}}}', "Sinks.s.X"),
        ('{"Extra": [1, 2, -1e999]}', "Extra[2]"),
        ('{"Big": ' + "9" * 400 + "}", "Big"),
    ],
)
def test_non_finite_numbers_in_the_file_are_refused(cli: Cli, literal: str, where: str) -> None:
    cli.config.write_text(literal)
    assert error_line(cli("place", "list", ok=False)) == (
        f"Error: {cli.config}: {where} must be a finite number (NaN, Infinity and numbers "
        "that overflow, like 1e999, are refused)"
    )


def test_other_unreadable_files_are_one_line(cli: Cli) -> None:
    cli.config.write_bytes(b'{"Places": {"\xff": 1}}')
    assert error_line(cli("place", "list", ok=False)) == (
        f"Error: {cli.config} is not UTF-8 text (byte 13)"
    )
    cli.config.write_text('{"a": ' + "1" * 5000 + "}")  # beyond int_max_str_digits
    assert error_line(cli("place", "list", ok=False)) == (
        f"Error: {cli.config} is not valid JSON (a number is too long)"
    )


def test_a_non_finite_number_is_never_written(tmp_path: Path) -> None:
    cfg = Config(path=tmp_path / "dicomsync.json", extra={"Retry": {"BaseDelay": math.nan}})
    with pytest.raises(ConfigError, match=r"Retry.BaseDelay must be a finite number"):
        cfg.save()
    assert not cfg.path.exists()


def test_plain_configs_still_load(tmp_path: Path) -> None:
    path = tmp_path / "dicomsync.json"
    path.write_text(
        '{"Places": {"z": {"Kind": "zipped_root", "Path": "z"}}, "Retry": {"BaseDelay": 1.5e1}}'
    )
    cfg = Config.load(path)
    assert cfg.places == {"z": {"Kind": "zipped_root", "Path": "z"}}
    assert cfg.extra == {"Retry": {"BaseDelay": 15.0}}


# --- the helpers ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=BAD_IDS)
def test_finite_number_refuses(value: Any) -> None:
    assert not is_finite_number(value)
    with pytest.raises(ConfigError, match=r"^Retry: X must be a finite number$"):
        finite_number(value, "Retry: X")


def test_finite_number_accepts() -> None:
    assert [finite_number(v, "x") for v in (0, 5, -2.5, 1e308, 10**300)] == [
        0.0,
        5.0,
        -2.5,
        1e308,
        1e300,
    ]
    deep: Any = 1.0
    for _ in range(100_000):  # the walk is flat
        deep = [deep]
    assert non_finite_path(deep) is None
    assert non_finite_path({"a": [0, {"b": math.inf}]}) == "a[1].b"


# --- every numeric option of every kind --------------------------------------------------------
def place_table(tmp: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """kind -> (a valid section, its numeric options); the sections need ``tmp/root``."""
    return {
        "dicom_root": ({"Path": str(tmp / "root")}, []),
        "zipped_root": ({"Path": str(tmp / "root")}, []),
        "orthanc": ({"Url": "http://127.0.0.1:9"}, ["Timeout", "UploadThreads"]),
        "xnat_pre_archive": (
            {"Server": "http://127.0.0.1:9", "Project": "P", "User": "u"},
            ["Timeout"],
        ),
        "dicomweb": (
            {"Url": "http://127.0.0.1:9/dicom-web"},
            [
                "TokenCommandTimeout",
                "Timeout",
                "InstancesPerRequest",
                "RequestsInFlight",
                "PageSize",
            ],
        ),
        "dicom": (
            {"Host": "127.0.0.1", "Port": 9, "CalledAet": "PACS"},
            ["Port", "Associations", "Timeout", "MaxPduSize", "ListenPort"],
        ),
    }


def sink_table(tmp: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    return {
        "sqlite_index": ({"Path": str(tmp / "index.sqlite")}, []),
        "postgresql_index": ({"Url": "postgresql://dicomsync@127.0.0.1:9/x"}, []),
        "splunk_hec": (
            {"Url": "http://127.0.0.1:9"},
            [
                "BatchEvents",
                "BatchBytes",
                "AckTimeoutSeconds",
                "AckPollSeconds",
                "AckInFlight",
                "TimeoutSeconds",
            ],
        ),
    }


def test_the_tables_cover_every_registered_kind(tmp_path: Path) -> None:
    assert set(place_table(tmp_path)) == set(PLACES.kinds())
    assert set(sink_table(tmp_path)) == set(SINKS.kinds())
    # ... and every numeric option each kind declares (dicomsync.options)
    for table, registry in ((place_table, PLACES), (sink_table, SINKS)):
        for kind, (_, numeric) in table(tmp_path).items():
            declared = options.declared(registry.get(kind).Options)
            assert numeric == [o.name for o in declared if o.type in ("int", "seconds")], kind
    sync = [o.name for o in options.declared(routing.SyncOptions) if o.type == "seconds"]
    sync += [o.name for o in options.declared(routing.RouteOptions) if o.type == "int"]
    sync += [o.name for o in options.declared(RetryOptions)]
    assert sorted(sync) == sorted(name for name, _ in SYNC_OPTIONS)


def _cases(table: Any) -> list[tuple[str, str]]:
    return [
        (kind, name) for kind, (_, names) in table(Path("/nonexistent")).items() for name in names
    ]


@pytest.mark.parametrize("value", [*BAD_NUMBERS, HUGE], ids=[*BAD_IDS, "10**400"])
@pytest.mark.parametrize(("kind", "name"), _cases(place_table))
def test_place_numeric_options(
    kind: str, name: str, value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is HUGE and name not in FLOAT_OPTIONS:
        return
    monkeypatch.setenv("XNAT_PASS", "secret")
    (tmp_path / "root").mkdir()
    section, _ = place_table(tmp_path)[kind]
    PLACES.build("p", {"Kind": kind, **section, name: 7}, tmp_path).close()  # the option exists
    with pytest.raises(ConfigError, match=name):
        PLACES.build("p", {"Kind": kind, **section, name: value}, tmp_path)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, HUGE], ids=[*BAD_IDS, "10**400"])
@pytest.mark.parametrize(("kind", "name"), _cases(sink_table))
def test_sink_numeric_options(kind: str, name: str, value: Any, tmp_path: Path) -> None:
    if value is HUGE and name not in FLOAT_OPTIONS:
        return
    section, _ = sink_table(tmp_path)[kind]
    build_sink("s", {"Kind": kind, **section, name: 2048}, tmp_path).close()
    with pytest.raises(ConfigError, match=name):
        build_sink("s", {"Kind": kind, **section, name: value}, tmp_path)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, HUGE], ids=[*BAD_IDS, "10**400"])
@pytest.mark.parametrize("name", ["BaseDelay", "MaxDelay", "MaxAttempts"])
def test_retry_options(name: str, value: Any) -> None:
    if value is HUGE and name not in FLOAT_OPTIONS:
        return
    with pytest.raises(ConfigError, match=f"Retry: {name} must be"):
        RetryPolicy.from_config({name: value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "5"], ids=repr)
def test_retry_policy_itself_refuses_non_finite_delays(value: Any) -> None:
    """The plugin's Retry comes from Orthanc's JSON: the policy checks, whoever builds it."""
    with pytest.raises(ConfigError, match="must be a finite number"):
        RetryPolicy(base_delay=value)
    with pytest.raises(ConfigError, match="must be a finite number"):
        RetryPolicy(base_delay=1, max_delay=value)
    with pytest.raises(ConfigError, match="MaxAttempts must be an integer"):
        RetryPolicy(max_attempts=value)


def test_retry_whole_numbers_written_as_floats() -> None:
    assert RetryPolicy.from_config({"MaxAttempts": 3.0}).max_attempts == 3
    with pytest.raises(ConfigError, match="MaxAttempts must be an integer"):
        RetryPolicy.from_config({"MaxAttempts": 2.5})


def _sync(**options: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Places": {"b": {"Kind": "orthanc", "Url": "http://b:8042"}},
        "Routes": [{"Destination": "b"}],
    }
    base.update(options)
    return {routing.SECTION: base}


SYNC_OPTIONS: list[tuple[str, Any]] = [
    ("LeaseSeconds", lambda v: {"LeaseSeconds": v}),
    ("PollInterval", lambda v: {"PollInterval": v}),
    ("MetricsInterval", lambda v: {"MetricsInterval": v}),
    ("Concurrency", lambda v: {"Routes": [{"Destination": "b", "Concurrency": v}]}),
    ("BaseDelay", lambda v: {"Retry": {"BaseDelay": v}}),
    ("MaxDelay", lambda v: {"Retry": {"MaxDelay": v}}),
    ("MaxAttempts", lambda v: {"Retry": {"MaxAttempts": v}}),
]


@pytest.mark.parametrize("value", [*BAD_NUMBERS, HUGE], ids=[*BAD_IDS, "10**400"])
@pytest.mark.parametrize(("name", "change"), SYNC_OPTIONS, ids=[n for n, _ in SYNC_OPTIONS])
def test_plugin_section_numeric_options(name: str, change: Any, value: Any, tmp_path: Path) -> None:
    if value is HUGE and name not in FLOAT_OPTIONS:
        return
    assert routing.validate(_sync(**change(7)), tmp_path / "orthanc.json") == []
    problems = routing.validate(_sync(**change(value)), tmp_path / "orthanc.json")
    assert any(name in p for p in problems), problems
    with pytest.raises(ConfigError, match=name):
        routing.load(_sync(**change(value)), tmp_path / "orthanc.json")
