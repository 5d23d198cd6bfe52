"""dicomsync: move DICOM studies between places without duplicates.

The core package. It never imports ``orthanc``; the plugin (``dicomsync.plugin``)
is the only code that does.
"""

from dicomsync.errors import DicomSyncError

__version__ = "0.3.0"
__all__ = ["DicomSyncError", "__version__"]
