"""Issue 10, scope 2: every option declared once (``dicomsync.options``), checked in one
style, carried by typed objects, and documented by the generated README tables.

- The README's ``<!-- options:NAME -->`` blocks are exactly what ``options.tables()``
  generates, and every declared option of every registered kind is in them: an option
  added without regenerating the README fails here.
- Every declared option of every place kind, sink kind, route, ``Retry`` and the
  ``DicomSync`` section refuses a wrong value with ``<where>: Name must be <noun>`` and,
  when required, a missing one with ``<where>: option 'Name' is required (<noun>)``,
  through the real builders (``PLACES.build``, ``build_sink``, ``routing.validate``).
- ``SyncConfig`` carries every option of the section (``Enabled``, ``NodeId`` and
  ``SinksBackfill`` were read again from the raw section).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from dicomsync import options, routing
from dicomsync.errors import ConfigError
from dicomsync.places.base import PLACES
from dicomsync.queue.base import RetryOptions, RetryPolicy
from dicomsync.routing import RouteOptions, SyncConfig, SyncOptions
from dicomsync.sinks.base import SINKS, build_sink

README = Path(__file__).resolve().parent.parent / "README.md"

# kind -> a valid section without its Kind (the paths are made under tmp_path)
PLACE_SECTIONS: dict[str, dict[str, Any]] = {
    "dicom_root": {"Path": "root"},
    "zipped_root": {"Path": "root"},
    "orthanc": {"Url": "http://127.0.0.1:9"},
    "xnat_pre_archive": {"Server": "http://127.0.0.1:9", "Project": "P", "User": "u"},
    "dicomweb": {"Url": "http://127.0.0.1:9/dicom-web"},
    "dicom": {"Host": "127.0.0.1", "Port": 9, "CalledAet": "PACS"},
}
SINK_SECTIONS: dict[str, dict[str, Any]] = {
    "sqlite_index": {"Path": "index.sqlite"},
    "postgresql_index": {"Url": "postgresql://dicomsync@127.0.0.1:9/x"},
    "splunk_hec": {"Url": "http://127.0.0.1:9"},
}
# a value of the wrong type for each option type ("any" options are checked by their owner)
WRONG = {
    "str": 5,
    "url": "ftp://host",
    "envvar": "not a name",
    "path": ["a"],
    "bool": "yes",
    "int": 2.5,
    "seconds": "5",
}


# --- the README ------------------------------------------------------------------------------
def test_readme_blocks_are_the_generated_tables() -> None:
    found = options.blocks_in(README.read_text(encoding="utf-8"))
    assert found == options.tables(), "run: python -m dicomsync.options --write README.md"


def _documented() -> list[tuple[str, type]]:
    return [
        *(("places", PLACES.get(k).Options) for k in PLACES.kinds()),
        *(("sinks", SINKS.get(k).Options) for k in SINKS.kinds()),
        ("sync", SyncOptions),
        ("sync", RouteOptions),
        ("sync", RetryOptions),
    ]


def test_every_declared_option_is_in_the_readme_with_help() -> None:
    blocks = options.blocks_in(README.read_text(encoding="utf-8"))
    for block, cls in _documented():
        assert options.declared(cls), cls
        for opt in options.declared(cls):
            assert opt.help.strip(), f"{cls.__name__}.{opt.name} has no help"
            assert f"`{opt.name}`" in blocks[block] or f".{opt.name}`" in blocks[block], (
                f"{opt.name} is not in the README's {block} table"
            )


def test_an_option_added_without_docs_fails_the_readme_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cls = PLACES.get("orthanc")

    @dataclasses.dataclass(frozen=True)
    class Wider(cls.Options):  # type: ignore[name-defined]
        extra: int = options.option("ExtraOption", "int", "an undocumented option", default=1)

    monkeypatch.setattr(cls, "Options", Wider)
    found = options.blocks_in(README.read_text(encoding="utf-8"))
    assert found["places"] != options.tables()["places"]
    assert "ExtraOption" in options.tables()["places"]


def test_write_readme_regenerates_a_stale_block(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    stale = text.replace("| `orthanc` | `Timeout` |", "| `orthanc` | `Timeuot` |")
    assert stale != text
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert options.write_readme(path) is True
    assert path.read_text(encoding="utf-8") == text
    assert options.write_readme(path) is False


# --- one error style, through the real builders ----------------------------------------------
def _cases(sections: dict[str, dict[str, Any]], registry: Any) -> list[tuple[str, options.Option]]:
    assert set(sections) == set(registry.kinds()), "a new kind must be added to the table"
    return [
        (kind, opt)
        for kind in sections
        for opt in options.declared(registry.get(kind).Options)
        if opt.type != "any"
    ]


def _ids(cases: list[tuple[str, options.Option]]) -> list[str]:
    return [f"{kind}.{opt.name}" for kind, opt in cases]


PLACE_CASES = _cases(PLACE_SECTIONS, PLACES)
SINK_CASES = _cases(SINK_SECTIONS, SINKS)


@pytest.mark.parametrize(("kind", "opt"), PLACE_CASES, ids=_ids(PLACE_CASES))
def test_place_options_one_style(
    kind: str, opt: options.Option, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XNAT_PASS", "secret")
    section = {"Kind": kind, **PLACE_SECTIONS[kind]}
    where = f"{kind} place 'p'"
    PLACES.build("p", section, tmp_path).close()
    with pytest.raises(ConfigError) as err:
        PLACES.build("p", {**section, opt.name: WRONG[opt.type]}, tmp_path)
    assert str(err.value) == f"{where}: {opt.name} must be {opt.noun()}"
    if opt.required:
        without = {k: v for k, v in section.items() if k != opt.name}
        with pytest.raises(ConfigError) as err:
            PLACES.build("p", without, tmp_path)
        assert str(err.value) == f"{where}: option {opt.name!r} is required ({opt.noun()})"


@pytest.mark.parametrize(("kind", "opt"), SINK_CASES, ids=_ids(SINK_CASES))
def test_sink_options_one_style(kind: str, opt: options.Option, tmp_path: Path) -> None:
    section = {"Kind": kind, **SINK_SECTIONS[kind]}
    where = f"{kind} sink 's'"
    build_sink("s", section, tmp_path).close()
    with pytest.raises(ConfigError) as err:
        build_sink("s", {**section, opt.name: WRONG[opt.type]}, tmp_path)
    assert str(err.value) == f"{where}: {opt.name} must be {opt.noun()}"
    if opt.required:
        without = {k: v for k, v in section.items() if k != opt.name}
        with pytest.raises(ConfigError) as err:
            build_sink("s", without, tmp_path)
        assert str(err.value) == f"{where}: option {opt.name!r} is required ({opt.noun()})"


def _sync(**change: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "Places": {"b": {"Kind": "orthanc", "Url": "http://b:8042"}},
        "Routes": [{"Destination": "b"}],
        **change,
    }
    return {routing.SECTION: section}


SECTION_CASES = [
    *((o, "DicomSync", lambda o, v: _sync(**{o.name: v})) for o in options.declared(SyncOptions)),
    *(
        (o, "DicomSync.Routes[0]", lambda o, v: _sync(Routes=[{"Destination": "b", o.name: v}]))
        for o in options.declared(RouteOptions)
    ),
    *(
        (o, "DicomSync.Retry", lambda o, v: _sync(Retry={o.name: v}))
        for o in options.declared(RetryOptions)
    ),
]
SECTION_CASES = [c for c in SECTION_CASES if c[0].type != "any"]


@pytest.mark.parametrize(
    ("opt", "where", "change"), SECTION_CASES, ids=[f"{w}.{o.name}" for o, w, _ in SECTION_CASES]
)
def test_plugin_section_options_one_style(
    opt: options.Option, where: str, change: Any, tmp_path: Path
) -> None:
    config = tmp_path / "orthanc.json"
    assert routing.validate(_sync(), config) == []
    problems = routing.validate(change(opt, WRONG[opt.type]), config)
    assert problems == [f"{where}: {opt.name} must be {opt.noun()}"]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{where}: {opt.name} must be")):
        routing.load(change(opt, WRONG[opt.type]), config)


def test_a_missing_route_destination_is_the_required_message(tmp_path: Path) -> None:
    problems = routing.validate(_sync(Routes=[{"Concurrency": 2}]), tmp_path / "orthanc.json")
    assert problems == [
        "DicomSync.Routes[0]: option 'Destination' is required (a non-empty string)"
    ]


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    problems = routing.validate(
        _sync(LeaseSeconds=0, Enabled="no", Routes=[{"Destination": "b", "Concurrency": 99}]),
        tmp_path / "orthanc.json",
    )
    assert problems == [
        "DicomSync: LeaseSeconds must be a positive number of seconds",
        "DicomSync: Enabled must be true or false",
        "DicomSync.Routes[0]: Concurrency must be an integer from 1 to 64",
    ]


# --- typed objects ---------------------------------------------------------------------------
def test_sync_config_carries_every_section_option(tmp_path: Path) -> None:
    """What the plugin used to read again from the raw section is on SyncConfig."""
    config = tmp_path / "orthanc.json"
    cfg = routing.load(_sync(), config)
    assert cfg is not None
    assert (cfg.enabled, cfg.sinks_backfill, cfg.node_id_given) == (True, True, False)
    assert cfg.node_id.endswith(f":{cfg.state_dir}")
    assert (cfg.lease_seconds, cfg.poll_interval, cfg.metrics_interval) == (300.0, 5.0, 5.0)
    cfg = routing.load(
        _sync(
            Enabled=False,
            SinksBackfill=False,
            NodeId="node-1",
            LeaseSeconds=30,
            PollInterval=1,
            MetricsInterval=2,
            StateDirectory="st",
            Retry={"BaseDelay": 1, "MaxDelay": 2, "MaxAttempts": 3},
        ),
        config,
    )
    assert cfg is not None
    assert (cfg.enabled, cfg.sinks_backfill) == (False, False)
    assert (cfg.node_id, cfg.node_id_given) == ("node-1", True)
    assert (cfg.lease_seconds, cfg.poll_interval, cfg.metrics_interval) == (30.0, 1.0, 2.0)
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.retry == RetryPolicy(1, 2, 3)
    assert not hasattr(cfg, "raw")
    carried = {f.name for f in dataclasses.fields(SyncConfig)}
    for opt_field in dataclasses.fields(SyncOptions):  # each option has its typed home
        home = {"state_directory": "state_dir", "node_id": "node_id"}.get(
            opt_field.name, opt_field.name
        )
        assert home in carried, f"SyncConfig does not carry {opt_field.name}"


def test_parse_builds_typed_values() -> None:
    opts = options.parse(RetryOptions, {"BaseDelay": 2, "MaxAttempts": 3.0}, "Retry")
    assert opts == RetryOptions(base_delay=2.0, max_delay=600.0, max_attempts=3)
    assert isinstance(opts.base_delay, float) and isinstance(opts.max_attempts, int)
    assert options.parse(RetryOptions, {"BaseDelay": None}, "Retry") == RetryOptions()


@pytest.mark.parametrize("value", [True, 1, "true", 0, None], ids=repr)
def test_bool_options_take_only_booleans(value: Any, tmp_path: Path) -> None:
    """``VerifyTls: "false"`` was true for orthanc places (``bool("false")``)."""
    section = {"Kind": "orthanc", "Url": "https://h", "VerifyTls": value}
    if value is True or value is None:
        place = PLACES.build("p", section, tmp_path)
        assert place.to_config().get("VerifyTls", True) is True
        return
    with pytest.raises(ConfigError, match=r"^orthanc place 'p': VerifyTls must be true or false$"):
        PLACES.build("p", section, tmp_path)


@pytest.mark.parametrize("value", [2.5, 0, -1, "4"], ids=repr)
def test_integer_options_refuse_fractions(value: Any, tmp_path: Path) -> None:
    """``UploadThreads: 2.5`` was taken as 2."""
    with pytest.raises(ConfigError, match="UploadThreads must be an integer >= 1"):
        PLACES.build("p", {"Kind": "orthanc", "Url": "http://h", "UploadThreads": value}, tmp_path)
    place = PLACES.build(
        "p", {"Kind": "orthanc", "Url": "http://h", "UploadThreads": 3.0}, tmp_path
    )
    assert place.upload_threads == 3  # type: ignore[attr-defined]


TIMEOUT_CASES = [
    (kind, opt)
    for kind, opt in [*PLACE_CASES, *SINK_CASES]
    if opt.type == "seconds" and opt.name.endswith(("Timeout", "TimeoutSeconds"))
]


@pytest.mark.parametrize(("kind", "opt"), TIMEOUT_CASES, ids=_ids(TIMEOUT_CASES))
def test_no_timeout_may_be_zero(
    kind: str, opt: options.Option, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zero timeout cannot work: requests refuses one (every call an internal error), and
    a zero ack timeout posts every batch again at its first poll (duplicates in Splunk)."""
    monkeypatch.setenv("XNAT_PASS", "secret")
    with pytest.raises(ConfigError, match=f"{opt.name} must be"):
        if kind in PLACE_SECTIONS:
            PLACES.build("x", {"Kind": kind, **PLACE_SECTIONS[kind], opt.name: 0}, tmp_path)
        else:
            build_sink("x", {"Kind": kind, **SINK_SECTIONS[kind], opt.name: 0}, tmp_path)
