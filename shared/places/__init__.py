"""Places: one module per kind behind the contract in ``base``."""

from dicomsync.places.base import PLACES, Instance, Place, Receipt, StudyRef

__all__ = ["PLACES", "Instance", "Place", "Receipt", "StudyRef"]
