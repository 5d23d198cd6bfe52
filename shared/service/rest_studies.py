"""``StudyJobs``: the bodies of ``POST /dicomsync/send`` and ``POST /dicomsync/backfill``.

``send(queue, destination, body)``: ``{"Destination": key, "Resources": [id or UID...]}``
(1 to ``MAX_RESOURCES`` non-empty strings). Each resource is an Orthanc study ID (looked
up first) or a StudyInstanceUID (``/tools/lookup``; it may name several studies). Any
unknown resource is a 400 naming up to five of them, and nothing is enqueued. Answer:
``{"Destination", "Jobs": [{"Resource", "Study", "JobId", "Action"}]}`` where Action is
the queue's (``created``, ``requeued``, ``rerun``, ``unchanged``).

``backfill(queue, destination, body)``: ``{"Destination", "Since"?, "Query"?}``. Every
study of this Orthanc (``Query``: through ``/tools/find``, page by page, ``PAGE`` at a
time) last updated at or after ``Since`` is enqueued, except a study the destination
already holds unchanged (its fingerprint equals the delivered one: one listing of the
study's instances). Answer: ``{"Destination", "Studies", "Enqueued", "AlreadyQueued",
"AlreadyDelivered", "Seconds"}``. Orthanc refusing the ``Query`` is a 400; a listing that
is not a list is a 502.

Thread-safe (no state; Orthanc's REST threads call it at once). Raises ``HttpError`` for
the request's faults and the client's/queue's ``DicomSyncError`` otherwise (the API maps
those).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dicomsync.errors import NotFound, RemoteRejected
from dicomsync.orthanc_client import OrthancClient
from dicomsync.queue import NewJob, Queue
from dicomsync.service.rest_common import (
    MAX_RESOURCES,
    MAX_UID,
    ORTHANC_ID,
    PAGE,
    HttpError,
    check_query,
    parse_since,
    quote,
)


class StudyJobs:
    def __init__(self, client: OrthancClient, fingerprint: Callable[[str], str | None]) -> None:
        self.client = client
        self.fingerprint = fingerprint

    def send(self, queue: Queue, dest: str, body: Mapping[str, Any]) -> dict[str, Any]:
        resources = body.get("Resources")
        if (
            not isinstance(resources, list)
            or not resources
            or len(resources) > MAX_RESOURCES
            or not all(isinstance(r, str) and r for r in resources)
        ):
            raise HttpError(
                400,
                f'"Resources" must be a list of 1 to {MAX_RESOURCES} study IDs or '
                "StudyInstanceUIDs",
            )
        studies: dict[str, str] = {}
        unknown: list[str] = []
        for resource in resources:
            found = self._resolve_study(resource)
            if not found:
                unknown.append(resource)
            for study_id in found:
                studies.setdefault(study_id, resource)
        if unknown:
            listed = ", ".join(quote(u) for u in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise HttpError(
                400, f"unknown study (no such Orthanc ID or StudyInstanceUID): {listed}{more}"
            )
        results = queue.enqueue_many(
            [
                NewJob("study", s, dest, study_uid="" if ORTHANC_ID.match(r) else r)
                for s, r in studies.items()
            ]
        )
        return {
            "Destination": dest,
            "Jobs": [
                {"Resource": res, "Study": sid, "JobId": r.job_id, "Action": r.action}
                for (sid, res), r in zip(studies.items(), results, strict=True)
            ],
        }

    def _resolve_study(self, resource: str) -> list[str]:
        if len(resource) > MAX_UID:  # neither an Orthanc ID nor a UID (64 characters)
            return []
        if ORTHANC_ID.match(resource):
            try:
                self.client.study(resource)
                return [resource]
            except NotFound:
                pass
        try:
            return self.client.lookup_studies(resource)
        except NotFound:
            return []

    def backfill(self, queue: Queue, dest: str, body: Mapping[str, Any]) -> dict[str, Any]:
        since = parse_since(body.get("Since"))
        query = check_query(body.get("Query"))
        started = time.monotonic()
        delivered = queue.fingerprints(dest)
        jobs: list[NewJob] = []
        already = considered = 0
        for study in self._studies(query):
            if since and str(study.get("LastUpdate", "")) < since:
                continue
            considered += 1
            study_id = str(study["ID"])
            uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
            fingerprint = None
            if study_id in delivered:
                fingerprint = self.fingerprint(study_id)
                if fingerprint == delivered[study_id]:
                    already += 1
                    continue
            jobs.append(NewJob("study", study_id, dest, study_uid=uid, fingerprint=fingerprint))
        results = queue.enqueue_many(jobs)
        actions = [r.action for r in results]
        return {
            "Destination": dest,
            "Studies": considered,
            "Enqueued": sum(a in ("created", "requeued", "rerun") for a in actions),
            "AlreadyQueued": actions.count("unchanged"),
            "AlreadyDelivered": already,
            "Seconds": round(time.monotonic() - started, 3),
        }

    def _studies(self, query: Mapping[str, Any] | None) -> Iterator[Any]:
        """Studies of this Orthanc (expanded), page by page."""
        offset = 0
        while True:
            if query:
                try:
                    page = self.client.post_json(
                        "/tools/find",
                        {
                            "Level": "Study",
                            "Query": dict(query),
                            "Expand": True,
                            "Since": offset,
                            "Limit": PAGE,
                        },
                    )
                except (RemoteRejected, NotFound) as exc:  # an unknown tag, a bad value
                    raise HttpError(400, f'Orthanc refused the "Query": {exc}') from None
            else:
                page = self.client.get_json(f"/studies?expand&since={offset}&limit={PAGE}")
            if not isinstance(page, list):
                raise HttpError(502, "Orthanc answered a study listing with something else")
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE
