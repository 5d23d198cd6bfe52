"""The ``dicom`` place kind: a DICOM node over the DICOM network (pynetdicom).

Modules, one concern each:

- ``options.py``: the section's options (declared once) and the TLS context;
- ``failures.py``: every network failure and DIMSE status -> the errors tree;
- ``association.py``: ``Peer`` (associations, TCP_NODELAY, TLS, C-ECHO), presentation
  contexts;
- ``connections.py``: ``Connections``, at most ``Associations`` open per node and
  process, reused by C-STORE and C-FIND;
- ``store.py``: the C-STORE SCU (parallel associations, syntax fallbacks, statuses);
- ``fastsend.py``: a file's C-STORE framed and written in one go (plain sockets);
- ``find.py``: C-FIND and the probe of whether the peer answers it;
- ``retrieve.py``: C-GET, and C-MOVE with our Storage SCP;
- ``place.py``: ``DicomPlace``, the ``Place`` over them (and the ledger's use).
"""

from dicomsync.places.dicom.place import DicomPlace

__all__ = ["DicomPlace"]
