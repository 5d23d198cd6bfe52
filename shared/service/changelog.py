"""``ChangeLog``: the one reader of Orthanc's change log (``GET /changes``).

Two cursors read it: the routes' catch-up cursor (``catch_up.RouteCursor``) and the tag
sinks' feed (``tag_feed.TagFeed``). Both go through this class, so the shape of Orthanc's
answer is read in one place. Each cursor keeps its own durability rules (where it is
stored, when it moves); this class only reads.

Contract:

- ``last()``: the sequence number of the newest change (``/changes?last``);
- ``page(since, limit)``: up to ``limit`` changes after ``since`` as a ``ChangePage``:
  the changes as Orthanc gives them (dicts with ``Seq``, ``ChangeType``, ``ID``...), the
  ``Last`` sequence of the page (None when absent) and ``Done`` (None when absent; a
  caller picks its own default);
- ``study_of(change)``: the Orthanc study ID a change belongs to (``NewStudy``,
  ``StableStudy``, ``NewSeries``, ``NewInstance``), one REST call for the last two;
  ``[]`` for other changes or a resource deleted meanwhile.

Thread-safe as far as the client is (each call is independent; no state here).
Raises what ``OrthancClient`` raises (``dicomsync.errors``: ``Unreachable`` and other
``DicomSyncError``); ``KeyError``/``ValueError`` only for an answer without ``Last``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomsync.errors import NotFound
from dicomsync.orthanc_client import OrthancClient

PAGE = 1000  # changes per read


@dataclass(frozen=True)
class ChangePage:
    changes: list[Mapping[str, Any]]
    last: int | None
    done: bool | None


class ChangeLog:
    def __init__(self, client: OrthancClient) -> None:
        self.client = client

    def last(self) -> int:
        return int(self.client.get_json("/changes?last")["Last"])

    def page(self, since: int, limit: int = PAGE) -> ChangePage:
        answer = self.client.get_json(f"/changes?since={since}&limit={limit}")
        last = answer.get("Last")
        done = answer.get("Done")
        return ChangePage(
            list(answer.get("Changes") or []),
            int(last) if last is not None else None,
            bool(done) if "Done" in answer else None,
        )

    def study_of(self, change: Mapping[str, Any]) -> list[str]:
        kind, rid = change.get("ChangeType"), str(change.get("ID", ""))
        if kind in ("NewStudy", "StableStudy"):
            return [rid]
        if kind in ("NewSeries", "NewInstance"):
            level = "series" if kind == "NewSeries" else "instances"
            try:
                return [str(self.client.get_json(f"/{level}/{rid}/study")["ID"])]
            except NotFound:
                return []
        return []
