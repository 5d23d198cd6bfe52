"""No credentials in any URL option of any place or sink kind (issue 9, point 7).

The rule lives in one place (``dicomsync.urls``, applied by ``Registry.build``), so the
tests go over every registered kind of both registries: a kind added later is covered
without anyone remembering it, and ``test_every_kind_has_an_example`` makes sure the
examples here keep up with the registries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicomsync.config import Config
from dicomsync.errors import ConfigError
from dicomsync.places.base import PLACES
from dicomsync.registry import Registry
from dicomsync.sinks.base import SINKS
from dicomsync.urls import check_section, has_credentials

SECRET = "s3cr3t-Pa55"
USER = "alice"

# One realistic section per kind, with every option that takes a URL.
EXAMPLES: dict[str, dict[str, Any]] = {
    "dicom_root": {"Kind": "dicom_root", "Path": "studies"},
    "zipped_root": {"Kind": "zipped_root", "Path": "zips"},
    "orthanc": {"Kind": "orthanc", "Url": "http://127.0.0.1:8042", "User": "orthanc"},
    "xnat_pre_archive": {
        "Kind": "xnat_pre_archive",
        "Server": "https://xnat.example.org",
        "Project": "P1",
        "User": "alice",
    },
    "dicomweb": {"Kind": "dicomweb", "Url": "https://pacs.example.org/dicom-web", "User": "a"},
    "dicom": {"Kind": "dicom", "Host": "pacs.example.org", "Port": 104, "CalledAet": "PACS"},
    "splunk_hec": {
        "Kind": "splunk_hec",
        "Url": "https://splunk.example.org:8088",
        "SearchUrl": "https://splunk.example.org:8089",
    },
    "sqlite_index": {"Kind": "sqlite_index", "Path": "index.sqlite"},
    "postgresql_index": {"Kind": "postgresql_index", "Url": "postgresql://dicomsync@db:5432/o"},
}

# Ways of writing credentials into a URL; each must be refused.
CREDENTIALED = [
    f"https://{USER}:{SECRET}@host.example.org:8088",
    f"http://{USER}:{SECRET}@127.0.0.1:8042/",
    f"HTTPS://{USER}:{SECRET}@host/path?x=1",
    f"https://{USER}@host.example.org",  # a user alone belongs in User
    f"https://:{SECRET}@host.example.org",
    f"https://{USER}:p@ss{SECRET}@host.example.org",  # an '@' inside the password
    f"  https://{USER}:{SECRET}@host  ",
    f"ftp://{USER}:{SECRET}@files.example.org",
    f"postgresql://{USER}:{SECRET}@db:5432/orthanc",  # a libpq URL may name a user, no password
    f"POSTGRES://:{SECRET}@db/orthanc",
    f"postgresql://{USER}@x:{SECRET}@db/orthanc",
]

REGISTRIES: list[tuple[str, Registry[Any]]] = [("place", PLACES), ("sink", SINKS)]
ALL_KINDS = [(what, reg, kind) for what, reg in REGISTRIES for kind in reg.kinds()]


def url_options(section: dict[str, Any]) -> list[str]:
    """The options of an example that hold a URL."""
    return [k for k, v in section.items() if isinstance(v, str) and "://" in v]


def test_every_kind_has_an_example() -> None:
    assert {kind for _, _, kind in ALL_KINDS} == set(EXAMPLES)


@pytest.mark.parametrize(("what", "registry", "kind"), ALL_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("bad", CREDENTIALED)
def test_every_kind_refuses_credentials_in_every_url_option(
    what: str, registry: Any, kind: str, bad: str, tmp_path: Path
) -> None:
    example = EXAMPLES[kind]
    # the kind's own URL options, and an option no kind has yet: a URL named
    # "…Url" and a URL in an option of any name, at any depth
    for option in [*url_options(example), "FutureUrl", "Anything", "Nested"]:
        section = dict(example)
        section[option] = {"Deep": [bad]} if option == "Nested" else bad
        with pytest.raises(ConfigError) as info:
            registry.build("k", section, tmp_path)
        message = str(info.value)
        assert SECRET not in message and f"{USER}:" not in message, message
        assert USER not in message, message  # never the user either
        assert "has a user name or password in its URL" in message
        assert repr(option if option != "Nested" else "Nested.Deep[0]") in message


@pytest.mark.parametrize("kind", ["splunk_hec", "orthanc"])
def test_scheme_less_url_options_are_read_as_urls(kind: str, tmp_path: Path) -> None:
    registry = SINKS if kind == "splunk_hec" else PLACES
    section = {**EXAMPLES[kind], "Url": f"{USER}:{SECRET}@host:8088"}
    with pytest.raises(ConfigError) as info:
        registry.build("k", section, tmp_path)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "good",
    [
        "https://host.example.org:8088",
        "https://host.example.org/path@v2",  # an '@' in the path is not userinfo
        "https://host.example.org/?q=a@b",
        "alice@example.org",  # not a URL (an e-mail in a User option)
        "/data/studies@2024",
        "postgresql://dicomsync@db:5432/orthanc",  # libpq URLs name their user (not a secret)
        "postgres://db/orthanc",
    ],
)
def test_urls_without_credentials_pass(good: str) -> None:
    check_section("sink", "k", {"Kind": "splunk_hec", "Index": good})
    assert not has_credentials(good)


def test_sink_add_refuses_and_saves_nothing(tmp_path: Path) -> None:
    """``sink add``/``place add`` go through Config._add, which builds through the registry."""
    cfg = Config.init(tmp_path / "dicomsync.json")
    url = f"https://{USER}:{SECRET}@splunk.example.org:8088"
    with pytest.raises(ConfigError) as info:
        cfg.add_sink("splunk", {"Kind": "splunk_hec", "Url": url})
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError):
        cfg.add_place("pacs", {"Kind": "orthanc", "Url": url.replace(":8088", ":8042")})
    cfg.save()
    assert SECRET not in (tmp_path / "dicomsync.json").read_text()
    assert cfg.sinks == {} and cfg.places == {}


def test_cli_sink_add_and_list_never_show_the_secret(cli: Any, tmp_path: Path) -> None:
    cli("init")
    url = f"https://{USER}:{SECRET}@splunk.example.org:8088"
    result = cli("sink", "add", "splunk_hec", "splunk", url, ok=False)
    assert result.exit_code != 0
    assert SECRET not in result.output and f"{USER}:" not in result.output
    assert "has a user name or password in its URL" in result.output
    # a hand-edited file: `sink list` names the problem, not the URL
    cfg = Config.load(cli.config)
    cfg.sinks["splunk"] = {"Kind": "splunk_hec", "Url": url}
    cfg.save()
    listed = cli("sink", "list")
    assert SECRET not in listed.output and "unusable" in listed.output
    listed_json = cli("sink", "list", "--json")
    assert SECRET not in listed_json.output


@pytest.mark.parametrize("what", ["Places", "Sinks"])
def test_the_plugin_section_refuses_credentials_before_anything_lists_it(
    what: str, tmp_path: Path
) -> None:
    """The plugin's /dicomsync/places lists place sections as configured: a credentialed
    URL must stop the DicomSync section at load, with one line that does not quote it."""
    from dicomsync import routing

    url = f"https://{USER}:{SECRET}@host.example.org:8042"
    sections = {
        "Places": {"dest": {"Kind": "orthanc", "Url": url}},
        "Sinks": {"splunk": {"Kind": "splunk_hec", "Url": url}},
    }
    orthanc = {
        "StorageDirectory": str(tmp_path / "storage"),
        "DicomSync": {"StateDirectory": str(tmp_path / "state"), what: sections[what]},
    }
    problems = routing.validate(orthanc)
    assert any("has a user name or password in its URL" in p for p in problems), problems
    assert not any(SECRET in p or f"{USER}:" in p for p in problems)
    with pytest.raises(ConfigError) as info:
        routing.load(orthanc)
    assert SECRET not in str(info.value)
