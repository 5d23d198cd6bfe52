"""``xnat_pre_archive``: an XNAT project's prearchive, through the ``xnat`` client (xnatpy).

The config section and the password rule are in ``place``'s docstring.

The place is built in three layers, each with its contract in its module docstring:

- ``connection``: ``XnatConnection``, the one xnat session of a place (login with our own
  requests session and ``CaBundle``, one re-login after a 401, a refused login and an
  unreachable XNAT remembered) and ``_from_xnat``, the one mapping of xnatpy's and
  requests' exceptions through ``dicomsync.http_errors``;
- ``destination``: ``XnatDestination``, listings, ``prepare``, ``holds`` and ``receive``
  (a temporary zip uploaded with the request xnatpy's ``services.import_`` makes), and
  ``xnat_label``;
- ``place``: ``XnatPreArchive`` (the registered class), its options and the source side
  (``studies``, ``identity``, ``instances`` from one cached download per session).
"""

from dicomsync.places.xnat.connection import (
    DEFAULT_PASSWORD_ENV,
    DEFAULT_TIMEOUT,
    PILOT_TIMEOUT,
    REFUSED_SECONDS,
    XnatConnection,
    client_log,
)
from dicomsync.places.xnat.destination import (
    LISTING_MAX_AGE,
    MAX_LABEL,
    UNREACHABLE_SECONDS,
    XnatDestination,
    xnat_label,
)
from dicomsync.places.xnat.place import XnatOptions, XnatPreArchive

__all__ = [
    "DEFAULT_PASSWORD_ENV",
    "DEFAULT_TIMEOUT",
    "LISTING_MAX_AGE",
    "MAX_LABEL",
    "PILOT_TIMEOUT",
    "REFUSED_SECONDS",
    "UNREACHABLE_SECONDS",
    "XnatConnection",
    "XnatDestination",
    "XnatOptions",
    "XnatPreArchive",
    "client_log",
    "xnat_label",
]
