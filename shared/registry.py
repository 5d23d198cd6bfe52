"""A registry of implementations by kind, in the style of pydicom's pixel backends.

Each kind names the module and class that implement it. Modules are imported only
when a kind is used, so a missing optional dependency makes that one kind
unavailable, with the reason, instead of breaking every command.

Errors: an unknown kind is ``ConfigError``; a kind whose module cannot be imported is
``PlaceKindUnavailable`` for the place registry and ``SinkKindUnavailable`` for the sink
registry (``what``). Registration happens at import time; lookups after that only fill
caches (a race imports a module twice, which Python makes harmless).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from dicomsync.errors import ConfigError, DicomSyncError, PlaceKindUnavailable, SinkKindUnavailable
from dicomsync.urls import check_section

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Maps a kind (``dicom_root``) to ``module:Class``, imported on first use."""

    what: str  # "place" or "sink", for messages
    _targets: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, type[T]] = field(default_factory=dict)
    _missing: dict[str, str] = field(default_factory=dict)

    def register(self, kind: str, target: str) -> None:
        self._targets[kind] = target
        self._loaded.pop(kind, None)
        self._missing.pop(kind, None)

    def _unavailable(self, message: str) -> DicomSyncError:
        return (
            SinkKindUnavailable(message) if self.what == "sink" else PlaceKindUnavailable(message)
        )

    def kinds(self) -> list[str]:
        return sorted(self._targets)

    def get(self, kind: str) -> type[T]:
        """The class for ``kind``; ConfigError if unknown, Place/SinkKindUnavailable if it
        cannot be loaded."""
        if kind in self._loaded:
            return self._loaded[kind]
        if kind not in self._targets:
            raise ConfigError(
                f"unknown {self.what} kind {kind!r}; known kinds: {', '.join(self.kinds())}"
            )
        if kind in self._missing:
            raise self._unavailable(
                f"{self.what} kind {kind!r} is unavailable: {self._missing[kind]}"
            )
        module_name, _, class_name = self._targets[kind].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            self._missing[kind] = f"cannot import {exc.name or module_name} ({exc})"
            raise self._unavailable(
                f"{self.what} kind {kind!r} is unavailable: {self._missing[kind]}"
            ) from exc
        cls: type[T] = getattr(module, class_name)
        self._loaded[kind] = cls
        return cls

    def build(self, key: str, section: Mapping[str, Any], base_dir: Path) -> T:
        """Instantiate the ``Kind`` of a config section: ``cls.from_config(key, section, …)``.

        Every section passes ``dicomsync.urls.check_section`` first, whatever its kind:
        no option may hold a URL with a user or password in it.
        """
        kind = section.get("Kind")
        if not isinstance(kind, str):
            raise ConfigError(f'{self.what} {key!r} needs a "Kind"')
        check_section(self.what, key, section)
        built: T = self.get(kind).from_config(key, section, base_dir=base_dir)  # type: ignore[attr-defined]
        return built

    def availability(self) -> dict[str, str | None]:
        """kind -> None when usable, else the reason it is not."""
        result: dict[str, str | None] = {}
        for kind in self.kinds():
            try:
                self.get(kind)
                result[kind] = None
            except (PlaceKindUnavailable, SinkKindUnavailable):
                result[kind] = self._missing.get(kind, "unavailable")
        return result
