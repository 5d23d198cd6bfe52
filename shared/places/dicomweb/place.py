"""``DicomWebPlace``: the ``dicomweb`` place, as a source and as a destination.

Keys are ``<PatientID>/<StudyInstanceUID>``, each made a safe path component, as for
Orthanc; a ref's ``handle`` is the StudyInstanceUID.

As a source
    ``studies`` pages through QIDO-RS ``GET /studies?includefield=00100020`` (a query
    naming one study asks for that StudyInstanceUID only). ``identity`` is QIDO-RS
    ``GET /studies/{uid}/instances`` (SOP and series UIDs). ``instances`` are WADO-RS
    ``GET /studies/{uid}/series/{series}/instances/{sop}`` with ``transfer-syntax=*``
    (the file as stored, not transcoded), one request per instance when its bytes are
    read: at most one instance of a study is in memory per reader, whatever its size.
As a destination
    ``holds`` is QIDO-RS ``GET /studies/{uid}/instances?includefield=00080018``; a 404,
    a 204 or an empty list mean none held. ``receive`` is STOW-RS
    (``dicomsync.places.dicomweb.stow``).

QIDO-RS pages: ``limit=PageSize&offset=n`` until a page comes back short (a server that
ignores ``offset`` and repeats itself stops the paging when a page brings nothing new).

Thread-safety: the connection and the STOW pool are shared by the lanes that use the
place; the caches of PatientIDs and series UIDs (bounded, least recently used out) are
guarded by a lock. Raises only ``dicomsync.errors``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dicomsync.errors import NotFound, RemoteRejected
from dicomsync.identity import StudyIdentity, safe_component
from dicomsync.options import parse
from dicomsync.places.base import Instance, Place, Receipt, StudyRef
from dicomsync.places.dicomweb.connection import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_PAGE,
    DEFAULT_PER_REQUEST,
    Connection,
    DicomWebOptions,
    auth_from,
    check_auth,
    described_auth,
    section_auth,
)
from dicomsync.places.dicomweb.stow import Stow
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)

CACHE = 256  # studies whose PatientID / series UIDs a place remembers
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def first(item: Mapping[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON item, as text ("" when absent)."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values:
        return ""
    value = values[0]
    if isinstance(value, dict):  # a PN: {"Alphabetic": ...}
        value = value.get("Alphabetic", "")
    return str(value)


class DicomWebPlace(Place):
    kind = "dicomweb"
    label = "DICOMweb"
    Options = DicomWebOptions

    def __init__(
        self,
        key: str,
        connection: Connection,
        *,
        options: DicomWebOptions,
    ) -> None:
        super().__init__(key)
        self.connection = connection
        self.options = options
        self.url = connection.url
        self.page_size = options.page_size
        self.stow = Stow(connection, options.instances_per_request, options.requests_in_flight)
        self._patients: OrderedDict[str, str] = OrderedDict()  # study UID -> PatientID
        self._series: OrderedDict[str, dict[str, str]] = OrderedDict()  # study -> sop -> series
        self._lock = threading.Lock()

    # --- configuration ----------------------------------------------------------------
    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        where = f"{cls.kind} place {key!r}"
        opts = parse(DicomWebOptions, section, where)
        command = check_auth(opts, where)
        verify: bool | str = opts.verify_tls
        if opts.ca_bundle:
            ca_path = Path(opts.ca_bundle).expanduser()
            verify = str(ca_path if ca_path.is_absolute() else base_dir / ca_path)
        connection = Connection(
            opts.url,
            auth_from(opts, command, where),
            verify=verify,
            timeout=opts.timeout,
            pool_size=opts.requests_in_flight,
        )
        return cls(key, connection, options=opts)

    def check_environment(self) -> None:
        self.connection.auth.check_environment()

    def to_config(self) -> dict[str, Any]:
        o = self.options
        section: dict[str, Any] = {"Kind": self.kind, "Url": o.url}
        section.update(section_auth(self.connection.auth))
        if not o.verify_tls:
            section["VerifyTls"] = False
        if o.ca_bundle:
            section["CaBundle"] = o.ca_bundle
        defaults = (
            ("Timeout", o.timeout, 60.0),
            ("InstancesPerRequest", o.instances_per_request, DEFAULT_PER_REQUEST),
            ("RequestsInFlight", o.requests_in_flight, DEFAULT_IN_FLIGHT),
            ("PageSize", o.page_size, DEFAULT_PAGE),
        )
        section.update({name: value for name, value, default in defaults if value != default})
        return section

    def describe(self) -> str:
        return f"DICOMweb at '{self.url}'{described_auth(self.connection.auth)}"

    def probe(self) -> str | None:
        """One QIDO-RS request for one study: the service answers, and accepts our login."""
        client = self.connection.client()
        self.connection.call(
            f"QIDO-RS {self.url}/studies", functools.partial(client.search_for_studies, limit=1)
        )
        return f"DICOMweb at '{self.url}' answers QIDO-RS"

    # --- QIDO-RS ----------------------------------------------------------------------
    def _pages(self, what: str, search: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Every result of a QIDO-RS search, page by page."""
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self.connection.call(
                what,
                functools.partial(search, limit=self.page_size, offset=offset, **kwargs),
            )
            if not isinstance(page, list):
                raise RemoteRejected(f"{what}: the answer is not a list")
            fresh = [r for r in page if isinstance(r, dict) and _fingerprint(r) not in seen]
            results.extend(fresh)
            seen.update(_fingerprint(r) for r in fresh)
            if len(page) < self.page_size or not fresh:
                return results
            offset += len(page)

    def _study_instances(self, study_uid: str, fields: list[str]) -> list[dict[str, Any]]:
        client = self.connection.client()
        what = f"QIDO-RS {self.url}/studies/{study_uid}/instances"
        try:
            return self._pages(
                what, client.search_for_instances, study_instance_uid=study_uid, fields=fields
            )
        except NotFound:
            return []

    # --- source -----------------------------------------------------------------------
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        query = query or StudyQuery(self.key)
        filters: dict[str, Any] = {}
        if query.study and "*" not in query.study and safe_component(query.study) == query.study:
            filters["StudyInstanceUID"] = query.study
        client = self.connection.client()
        found = self._pages(
            f"QIDO-RS {self.url}/studies",
            client.search_for_studies,
            fields=["00100020"],
            search_filters=filters or None,
        )
        refs = []
        for item in found:
            uid, patient_id = first(item, "0020000D"), first(item, "00100020")
            if not uid:
                continue
            self._remember(self._patients, uid, patient_id)
            refs.append(StudyRef(self.key, safe_component(patient_id), safe_component(uid), uid))
        for ref in sorted(refs):
            if query.matches(ref.patient, ref.study):
                yield ref

    def _remember(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > CACHE:
                cache.popitem(last=False)

    def _recall(self, cache: OrderedDict[str, Any], key: str) -> Any:
        with self._lock:
            value = cache.get(key)
            if value is not None:
                cache.move_to_end(key)
            return value

    def _uid(self, ref: StudyRef) -> str:
        if ref.handle:
            return ref.handle
        for candidate in self.studies(StudyQuery(self.key, ref.patient, ref.study)):
            return candidate.handle
        raise NotFound(f"{ref}: no such study at {self.url}")

    def _series_of(self, study_uid: str) -> dict[str, str]:
        found = self._study_instances(study_uid, ["00080018", "0020000E"])
        series = {first(i, "00080018"): first(i, "0020000E") for i in found}
        series.pop("", None)
        self._remember(self._series, study_uid, series)
        return series

    def identity(self, ref: StudyRef) -> StudyIdentity:
        study_uid = self._uid(ref)
        series = self._series_of(study_uid)
        patient_id = self._recall(self._patients, study_uid)
        if patient_id is None:
            for found in self.studies(StudyQuery(self.key, "*", safe_component(study_uid))):
                if found.handle == study_uid:
                    patient_id = self._recall(self._patients, study_uid)
        return StudyIdentity(
            study_uid=study_uid, sop_uids=frozenset(series), patient_id=patient_id or ""
        )

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        study_uid = self._uid(ref)
        series = self._recall(self._series, study_uid) or self._series_of(study_uid)
        for sop in sorted(series):
            if only is not None and sop not in only:
                continue
            loader = functools.partial(self._retrieve, study_uid, series[sop], sop)
            yield Instance(sop, f"{safe_component(sop)}.dcm", loader)

    def _retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """One instance by WADO-RS, as stored (``transfer-syntax=*``)."""
        path = f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        what = f"WADO-RS {self.url}{path}"
        session = self.connection.session()
        client = self.connection.client()

        def get() -> bytes:
            response = session.get(
                self.url + path,
                headers={"Accept": WADO_ACCEPT},
                timeout=self.connection.timeout,
                stream=True,
            )
            self.connection.check(response, what)
            if response.headers.get("Content-Type", "").startswith("application/dicom"):
                return response.content  # a single part sent bare, as some servers do
            for part in client._decode_multipart_message(response, stream=True):
                return bytes(part)
            raise RemoteRejected(f"{what}: the answer holds no instance")

        return self.connection.call(what, get)

    # --- destination --------------------------------------------------------------------
    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        found = self._study_instances(identity.study_uid, ["00080018"])
        return frozenset(first(i, "00080018") for i in found) & identity.sop_uids

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        """STOW-RS; a failed batch raises with the instances stored before as ``delivered``
        (each stored instance stays stored: the server keeps what it accepted)."""
        written = self.stow.store(identity.study_uid, instances)
        return Receipt(written, f"{self.url}/studies/{identity.study_uid}")

    def close(self) -> None:
        self.stow.close()
        self.connection.close()


def _fingerprint(item: Mapping[str, Any]) -> str:
    return first(item, "00080018") or first(item, "0020000E") or first(item, "0020000D")
