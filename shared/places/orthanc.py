"""``orthanc``: an Orthanc server, over HTTP from the CLI or in-process inside the plugin.

Keys are ``<PatientID>/<StudyInstanceUID>``, each made a safe path component.

- Listing: one ``GET /studies?expand``.
- Reading: ``GET /instances/{id}/file`` with ``Accept-Encoding: identity``.
- Writing: ``POST /instances`` over keep-alive sessions, several in parallel.
- Duplicate check: Orthanc's study ID is computed from PatientID and
  StudyInstanceUID, then ``GET /studies/{id}/instances``; when that study is absent
  (the PatientID differs), ``POST /tools/lookup`` finds it by UID.

The password is read from the environment variable named by ``PasswordEnv`` when the
first connection is made (so ``place add`` needs no secret; a run without it fails with
one line).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomsync.errors import ConfigError, DicomSyncError, NotFound, RemoteRejected
from dicomsync.identity import StudyIdentity, orthanc_study_id, safe_component
from dicomsync.options import option, parse
from dicomsync.orthanc_client import HttpTransport, OrthancClient
from dicomsync.places.base import Instance, Place, Receipt, StudyRef
from dicomsync.places.parallel import run_bounded
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_THREADS = 4
META_CACHE = 1024
"""Studies whose (PatientID, StudyInstanceUID) a place remembers from listings; the least
recently used are forgotten (``identity`` then reads the study again), so a plugin that
routes for months holds no more than this."""


def password_from_env(key: str, variable: str) -> str:
    """The password in ``$variable``; asked when the first connection is made."""
    password = os.environ.get(variable)
    if password is None:
        raise ConfigError(f"orthanc place {key!r}: environment variable {variable} is not set")
    return password


@dataclass(frozen=True)
class OrthancOptions:
    """The options of an ``orthanc`` place section."""

    url: str = option("Url", "url", "`http://` or `https://` base URL", required=True)
    user: str | None = option("User", "str", "HTTP basic-auth user")
    password_env: str | None = option(
        "PasswordEnv", "envvar", "name of the environment variable holding the password"
    )
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option(
        "CaBundle", "path", "CA bundle file to verify with", shown="system"
    )
    timeout: float = option("Timeout", "seconds", "seconds per request", default=60.0, above=0)
    upload_threads: int = option(
        "UploadThreads",
        "int",
        "parallel keep-alive upload sessions",
        default=DEFAULT_UPLOAD_THREADS,
        low=1,
    )


class OrthancPlace(Place):
    kind = "orthanc"
    label = "Orthanc"
    Options = OrthancOptions

    def __init__(
        self,
        key: str,
        client: OrthancClient,
        *,
        url: str = "",
        user: str | None = None,
        password_env: str | None = None,
        verify: bool | str = True,
        upload_threads: int = DEFAULT_UPLOAD_THREADS,
    ) -> None:
        super().__init__(key)
        self.client = client
        self.url = url
        self.user = user
        self.password_env = password_env
        self.verify = verify
        self.upload_threads = max(1, upload_threads)
        # study ID -> (PatientID, StudyInstanceUID), least recently used first; bounded
        self._meta: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._meta_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        opts = parse(OrthancOptions, section, f"{cls.kind} place {key!r}")
        password_env = opts.password_env
        # read at the first connection: ``place add`` validates without the secret
        password = functools.partial(password_from_env, key, password_env) if password_env else None
        verify: bool | str = opts.ca_bundle or opts.verify_tls
        transport = HttpTransport(
            opts.url, opts.user, password, verify=verify, timeout=opts.timeout
        )
        return cls(
            key,
            OrthancClient(transport),
            url=opts.url,
            user=opts.user,
            password_env=password_env,
            verify=verify,
            upload_threads=opts.upload_threads,
        )

    def check_environment(self) -> None:
        if self.password_env:
            password_from_env(self.key, self.password_env)

    def to_config(self) -> dict[str, Any]:
        section: dict[str, Any] = {"Kind": self.kind, "Url": self.url}
        if self.user:
            section["User"] = self.user
        if self.password_env:
            section["PasswordEnv"] = self.password_env
        if self.verify is not True:
            section["VerifyTls" if isinstance(self.verify, bool) else "CaBundle"] = self.verify
        return section

    def describe(self) -> str:
        return f"Orthanc at '{self.url or self.client.transport.description}'"

    # --- source -----------------------------------------------------------------------
    def ref_for(self, study: Mapping[str, Any]) -> StudyRef:
        """A StudyRef from one entry of ``/studies?expand`` (or ``/studies/{id}``)."""
        patient_id = str(study.get("PatientMainDicomTags", {}).get("PatientID", ""))
        uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
        self._remember(str(study["ID"]), (patient_id, uid))
        return StudyRef(
            self.key, safe_component(patient_id), safe_component(uid), handle=study["ID"]
        )

    def _remember(self, study_id: str, meta: tuple[str, str]) -> None:
        with self._meta_lock:
            self._meta[study_id] = meta
            self._meta.move_to_end(study_id)
            while len(self._meta) > META_CACHE:
                self._meta.popitem(last=False)

    def _recall(self, study_id: str) -> tuple[str, str] | None:
        with self._meta_lock:
            meta = self._meta.get(study_id)
            if meta is not None:
                self._meta.move_to_end(study_id)
            return meta

    def ref_by_id(self, study_id: str) -> StudyRef:
        return self.ref_for(self.client.study(study_id))

    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        query = query or StudyQuery(self.key)
        refs = [self.ref_for(s) for s in self.client.studies_expanded()]
        for ref in sorted(refs):
            if query.matches(ref.patient, ref.study):
                yield ref

    def _study_id(self, ref: StudyRef) -> str:
        if ref.handle:
            return ref.handle
        for candidate in self.studies(StudyQuery(self.key, ref.patient, ref.study)):
            return candidate.handle
        raise NotFound(f"{ref}: no such study in Orthanc")

    def identity(self, ref: StudyRef) -> StudyIdentity:
        study_id = self._study_id(ref)
        instances = self.client.study_instances(study_id)
        meta = self._recall(study_id)
        if meta is None:
            study = self.client.study(study_id)
            self.ref_for(study)
            meta = (
                str(study.get("PatientMainDicomTags", {}).get("PatientID", "")),
                str(study.get("MainDicomTags", {}).get("StudyInstanceUID", "")),
            )
        patient_id, study_uid = meta
        return StudyIdentity(
            study_uid=study_uid,
            sop_uids=frozenset(i["MainDicomTags"]["SOPInstanceUID"] for i in instances),
            patient_id=patient_id,
        )

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        study_id = self._study_id(ref)
        for inst in self.client.study_instances(study_id):
            sop = inst["MainDicomTags"]["SOPInstanceUID"]
            if only is not None and sop not in only:
                continue
            loader = functools.partial(self.client.instance_file, inst["ID"])
            yield Instance(sop, f"{safe_component(sop)}.dcm", loader)

    # --- destination --------------------------------------------------------------------
    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        held = self.client.study_sop_uids(orthanc_study_id(identity.patient_id, identity.study_uid))
        if not held:
            for study_id in self.client.lookup_studies(identity.study_uid):
                held.update(self.client.study_sop_uids(study_id))
        return frozenset(held) & identity.sop_uids

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        """Upload with a few parallel keep-alive sessions; at most 2 x threads files in memory.

        Orthanc stores each instance on its own, so a failed upload leaves the ones before
        it stored: the error raised then carries their number as ``delivered`` (the
        queue's ``Delivered`` counts them; see ``dicomsync.worker.delivered_by``)."""
        limit = self.upload_threads * 2
        stored = [0]
        lock = threading.Lock()

        def upload(inst: Instance) -> None:
            answer = self.client.store_instance(inst.read())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RemoteRejected(f"Orthanc refused {inst.name}: {answer.get('Status')}")
            with lock:
                stored[0] += 1

        try:
            run_bounded(self._upload_pool(), upload, instances, limit)
        except DicomSyncError as exc:
            exc.delivered = stored[0]  # type: ignore[attr-defined]
            raise
        return Receipt(stored[0], self.describe())

    def _upload_pool(self) -> ThreadPoolExecutor:
        """One pool per place, so its threads (and their keep-alive sessions) are reused."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.upload_threads, thread_name_prefix="orthanc-up"
                )
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.client.close()
