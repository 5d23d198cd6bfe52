"""The configuration schema, shared by ``dicomsync.json`` and Orthanc's ``DicomSync`` section.

``dicomsync.json``::

    {
      "Places": {
        "my_studies": {"Kind": "dicom_root", "Path": "/data/studies"},
        "zips":       {"Kind": "zipped_root", "Path": "zips"},
        "pacs":       {"Kind": "orthanc", "Url": "http://127.0.0.1:8042",
                       "User": "orthanc", "PasswordEnv": "PACS_PASSWORD"}
      },
      "Sinks": {
        "splunk":     {"Kind": "splunk_hec", "Url": "https://splunk:8088", "TokenEnv": "SPLUNK_HEC_TOKEN"}
      }
    }

Relative paths are relative to the file's folder. Secrets are never in the file:
a place names the environment variable that holds its password.

The Orthanc plugin reads the same ``Places`` and ``Sinks`` (inline, or a path to
such a file) plus ``Routes``, ``StateDirectory`` and ``Retry``.

Hostile or broken files give one ``ConfigError`` line, never a traceback: the file is
read up to ``MAX_CONFIG_BYTES``, its nesting is measured without recursion
(``dicomsync.jsonsafe``, at most ``jsonsafe.MAX_DEPTH`` levels) before ``json.loads``,
and a number that is not finite (the ``NaN``/``Infinity`` literals Python's json
accepts, or ``1e999``, which overflows to infinity) is refused with its place in the
file (``Retry.BaseDelay``).

Numbers in options: every option is declared and checked in ``dicomsync.options``,
whose number types go through ``is_finite_number``: a JSON number, not a boolean
(``True`` is an ``int`` in Python), not a string, and finite. ``finite_number`` is the
same rule for a caller that has one value to check.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomsync import jsonsafe
from dicomsync.errors import ConfigError, UnknownPlaceError, UnknownSinkError

DEFAULT_FILENAME = "dicomsync.json"
ENV_CONFIG = "DICOMSYNC_CONFIG"
MAX_CONFIG_BYTES = 16 << 20
"""Largest dicomsync.json read (a real one is a few KB)."""


def is_finite_number(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is finite; False for booleans, strings, NaN and
    infinities. Use it in every numeric option check, before comparing the value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):  # a 400-digit integer is finite, but not as a float
        return abs(value) <= sys.float_info.max
    return math.isfinite(value)


def finite_number(value: Any, what: str) -> float:
    """``value`` as a float; ``ConfigError("<what> must be a finite number")`` unless it is
    a JSON number (not a boolean, not a string) that is finite."""
    if not is_finite_number(value):
        raise ConfigError(f"{what} must be a finite number")
    return float(value)


def non_finite_path(value: Any) -> str | None:
    """Where the first non-finite number is in parsed JSON (``"Retry.BaseDelay"``,
    ``"Routes[0].Concurrency"``), or None. A flat walk (no recursion); the path is
    spelled out only for the number found, so a deep document costs linear time."""
    Chain = tuple[Any, str | int] | None  # (parent chain, key or index)
    stack: list[tuple[Chain, Any]] = [(None, value)]
    while stack:
        chain, node = stack.pop()
        if isinstance(node, int | float) and not isinstance(node, bool):
            if not is_finite_number(node):
                return _spell(chain)
        elif isinstance(node, dict):
            stack.extend(((chain, k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend(((chain, i), v) for i, v in reversed(list(enumerate(node))))
    return None


def _spell(chain: Any) -> str:
    parts: list[str] = []
    while chain is not None:
        chain, key = chain
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    path = "".join(reversed(parts)).removeprefix(".")
    return path or "the top level"


def parse_json(text: str, source: str) -> Any:
    """A configuration file's text parsed; one ``ConfigError`` line for anything bad."""
    try:
        jsonsafe.check_depth(text)
        data = json.loads(text)
    except jsonsafe.JsonRejected as exc:
        raise ConfigError(f"{source} is not valid JSON ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except ValueError:  # an integer of more than 4,300 digits (int_max_str_digits)
        raise ConfigError(f"{source} is not valid JSON (a number is too long)") from None
    except RecursionError:  # cannot happen after check_depth; a last guard
        raise ConfigError(f"{source} is not valid JSON (nested too deep)") from None
    where = non_finite_path(data)
    if where is not None:
        raise ConfigError(
            f"{source}: {where} must be a finite number (NaN, Infinity and numbers that "
            "overflow, like 1e999, are refused)"
        )
    return data


def default_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or DEFAULT_FILENAME)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_sections(value: Any, what: str, source: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {what!r} must be an object of key -> settings")
    for key, section in value.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {what}[{key!r}] must be an object")
        if not isinstance(section.get("Kind"), str):
            raise ConfigError(f'{source}: {what}[{key!r}] needs a "Kind"')
    return dict(value)


def load_sections(
    value: Any, what: str, base_dir: Path, source: str
) -> tuple[dict[str, dict[str, Any]], Path]:
    """``Places``/``Sinks`` given inline, or as a path to a dicomsync.json file.

    Returns the sections and the folder that relative paths in them are relative to.
    """
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute():
            path = base_dir / path
        cfg = Config.load(path)
        return (cfg.places if what == "Places" else cfg.sinks), path.parent
    return _check_sections(value, what, source), base_dir


@dataclass
class Config:
    """A dicomsync.json file: places and sinks by key."""

    path: Path
    places: dict[str, dict[str, Any]] = field(default_factory=dict)
    sinks: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or default_path()
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"no configuration at {path}; run 'dicomsync init' first") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})") from None
        data = parse_json(text, str(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object")
        places = _check_sections(data.pop("Places", {}), "Places", str(path))
        sinks = _check_sections(data.pop("Sinks", {}), "Sinks", str(path))
        return cls(path=path, places=places, sinks=sinks, extra=data)

    @classmethod
    def init(cls, path: Path | None = None) -> Config:
        path = path or default_path()
        if path.exists():
            raise ConfigError(f"{path} already exists; not overwriting it")
        cfg = cls(path=path)
        cfg.save()
        return cfg

    def save(self) -> None:
        data: dict[str, Any] = {"Places": self.places, "Sinks": self.sinks, **self.extra}
        where = non_finite_path(data)
        if where is not None:  # json.dumps would write NaN/Infinity, which is not JSON
            raise ConfigError(f"{where} must be a finite number; {self.path} not written")
        atomic_write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    # --- places and sinks: the same rules for both ------------------------------------------
    def _table(self, what: str) -> dict[str, dict[str, Any]]:
        return self.places if what == "place" else self.sinks

    def _section(self, what: str, key: str) -> dict[str, Any]:
        table = self._table(what)
        try:
            return table[key]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            unknown = UnknownPlaceError if what == "place" else UnknownSinkError
            raise unknown(f"unknown {what} {key!r} (configured: {known})") from None

    def _add(self, what: str, key: str, section: Mapping[str, Any]) -> None:
        table = self._table(what)
        if key in table:
            raise ConfigError(f"a {what} called {key!r} already exists")
        if not key or any(c in key for c in ":/*"):
            raise ConfigError(f"invalid {what} key {key!r}: no ':', '/' or '*' allowed")
        build = build_place if what == "place" else _build_sink
        built = build(key, section, self.base_dir)
        built.close()  # built only to validate the section before it is saved
        table[key] = dict(section)

    def _remove(self, what: str, key: str) -> None:
        self._section(what, key)
        del self._table(what)[key]

    def place_section(self, key: str) -> dict[str, Any]:
        return self._section("place", key)

    def place(self, key: str) -> Any:
        """Build the place configured under ``key``."""
        return build_place(key, self.place_section(key), self.base_dir)

    def add_place(self, key: str, section: Mapping[str, Any]) -> None:
        self._add("place", key, section)

    def remove_place(self, key: str) -> None:
        self._remove("place", key)

    def sink_section(self, key: str) -> dict[str, Any]:
        return self._section("sink", key)

    def sink(self, key: str) -> Any:
        return _build_sink(key, self.sink_section(key), self.base_dir)

    def add_sink(self, key: str, section: Mapping[str, Any]) -> None:
        self._add("sink", key, section)

    def remove_sink(self, key: str) -> None:
        self._remove("sink", key)

    def deid_profiles(self) -> dict[str, Any]:
        """The ``Deidentify`` section's profiles (``dicomsync.deid.options``), checked."""
        from dicomsync.deid.options import parse_profiles

        return parse_profiles(self.extra.get("Deidentify"), f"{self.path}: Deidentify")


def build_place(key: str, section: Mapping[str, Any], base_dir: Path) -> Any:
    """Instantiate a place from its section through the registry."""
    from dicomsync.places.base import PLACES

    return PLACES.build(key, section, base_dir)


def _build_sink(key: str, section: Mapping[str, Any], base_dir: Path) -> Any:
    from dicomsync.sinks.base import build_sink  # sinks import this module

    return build_sink(key, section, base_dir)


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)
