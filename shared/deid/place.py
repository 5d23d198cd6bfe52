"""``Deidentified(place, profile)``: a destination that receives studies de-identified.

One mechanism for the CLI (``send``/``replicate --deidentify PROFILE``) and the plugin
(a route's ``"Deidentify": "PROFILE"``): the wrapper maps the study key and the
``StudyIdentity`` to their de-identified form without reading any file (HMAC-derived
UIDs are computed from the original ones; the pseudonym comes from the map or the
secret), so

- ``holds`` asks the real destination about the de-identified SOP UIDs and answers in
  original UIDs: a repeat send is a duplicate, a late instance sends only itself;
- ``receive`` transforms each instance's bytes on the way out, one at a time, as the
  real destination reads them: nothing de-identified is stored anywhere else (in the
  plugin, not in Orthanc).

The destination key is ``<pseudonym>/<de-identified StudyInstanceUID>``. The secret is
read from the environment at the first call that needs it: a missing one is one
``ConfigError`` before anything is sent (``prepare`` is the first call of every send).
Thread-safe as the wrapped place is.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dicomsync.deid.keys import Keys
from dicomsync.deid.options import Profile, ProfileOptions
from dicomsync.deid.pseudonyms import PseudonymMap
from dicomsync.deid.pseudonyms_pg import PgPseudonymMap
from dicomsync.deid.transform import Deidentifier, StudyKeys
from dicomsync.errors import ConfigError
from dicomsync.identity import StudyIdentity, safe_component
from dicomsync.places.base import Instance, Place, Receipt, StudyRef
from dicomsync.query import StudyQuery


class Deidentified(Place):
    kind = "deidentified"
    label = "de-identifying wrapper"
    Options = ProfileOptions
    is_source = False

    def __init__(
        self,
        inner: Place,
        profile: Profile,
        pseudonyms: PseudonymMap | PgPseudonymMap | None = None,
    ) -> None:
        super().__init__(inner.key)
        self.inner = inner
        self.profile = profile
        self.pseudonyms = pseudonyms
        self._engine: Deidentifier | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        raise ConfigError("a de-identified place wraps a configured place; it has no section")

    def to_config(self) -> dict[str, Any]:
        return self.inner.to_config()

    def describe(self) -> str:
        return f"{self.inner.describe()}, de-identified by profile {self.profile.name!r}"

    def engine(self) -> Deidentifier:
        with self._lock:
            if self._engine is None:
                self._engine = Deidentifier(self.profile, Keys(self.profile.secret()))
            return self._engine

    def check_environment(self) -> None:
        self.profile.secret()
        self.inner.check_environment()

    # --- the mapping ------------------------------------------------------------------------
    def study_keys(self, patient_id: str) -> StudyKeys:
        keys = self.engine().keys
        derived = keys.pseudonym(patient_id)
        pseudonym, name = derived, derived
        if self.pseudonyms is not None:
            found = self.pseudonyms.get(patient_id)
            pseudonym, name = found if found else self.pseudonyms.put(patient_id, derived)
        return StudyKeys(pseudonym, name, keys.date_offset(patient_id))

    def mapped(self, identity: StudyIdentity) -> tuple[str, StudyIdentity, dict[str, str]]:
        """The de-identified key and identity, and de-identified SOP UID -> original."""
        engine = self.engine()
        back = {engine.uid(u): u for u in identity.sop_uids}
        pseudonym = self.study_keys(identity.patient_id).pseudonym
        study_uid = engine.uid(identity.study_uid)
        new = StudyIdentity(
            study_uid=study_uid,
            sop_uids=frozenset(back),
            patient_id=pseudonym,
            study_uids=frozenset(engine.uid(u) for u in identity.study_uids),
        )
        key = f"{safe_component(pseudonym)}/{safe_component(study_uid)}"
        return key, new, back

    # --- destination --------------------------------------------------------------------
    def prepare(self, identities: Iterable[tuple[str, StudyIdentity]]) -> None:
        batch = [self.mapped(identity)[:2] for _, identity in identities]
        self.inner.prepare(batch)

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        new_key, new, back = self.mapped(identity)
        return frozenset(back[u] for u in self.inner.holds(new_key, new) if u in back)

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        new_key, new, _ = self.mapped(identity)
        engine = self.engine()
        study = self.study_keys(identity.patient_id)

        def convert(inst: Instance) -> Instance:
            sop = engine.uid(inst.sop_uid)
            name = f"{safe_component(sop)}.dcm"

            def load() -> bytes:
                return engine.instance(inst.read(), study, name=name)

            return Instance(sop, name, load)

        return self.inner.receive(new_key, (convert(i) for i in instances), new)

    # --- source: the wrapped place's, unchanged (a wrapper is used as a destination) ---------
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        return self.inner.studies(query)

    def identity(self, ref: StudyRef) -> StudyIdentity:
        return self.inner.identity(ref)

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        return self.inner.instances(ref, only)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.pseudonyms is not None:
                self.pseudonyms.close()
