"""The ``dicom`` place kind: a DICOM node over the DICOM network (pynetdicom).

Modules, one concern each:

- ``options.py``: the section's options (declared once) and the TLS context;
- ``failures.py``: every network failure and DIMSE status -> the errors tree;
- ``association.py``: ``Peer`` (pynetdicom associations for C-GET/C-MOVE, TCP_NODELAY,
  TLS, C-ECHO), presentation contexts;
- ``link.py``: ``Link``, our own thread-free association (C-STORE, C-FIND, C-ECHO
  driven by the calling thread over one blocking socket);
- ``wire.py``: the bytes a link frames and parses itself (PDU headers, command sets);
- ``connections.py``: ``Connections``, at most ``Associations`` links open per node
  and process, reused by C-STORE and C-FIND;
- ``payload.py``: an instance's bytes to send (never spooled; file meta parsed once);
- ``store.py``: the C-STORE SCU (parallel associations, syntax fallbacks, statuses);
- ``find.py``: C-FIND and the probe of whether the peer answers it;
- ``retrieve.py``: C-GET, and C-MOVE with our Storage SCP;
- ``place.py``: ``DicomPlace``, the ``Place`` over them (and the ledger's use).
"""

from dicomsync.places.dicom.place import DicomPlace

__all__ = ["DicomPlace"]
