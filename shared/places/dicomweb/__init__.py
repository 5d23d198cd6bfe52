"""``dicomweb``: a DICOMweb service (QIDO-RS, WADO-RS, STOW-RS), through dicomweb-client.

Config section (the same in ``dicomsync.json`` and in the plugin's ``DicomSync.Places``)::

    {"Kind": "dicomweb", "Url": "https://host/dicom-web",
     "User": "alice", "PasswordEnv": "WEB_PASS"}            # basic auth, or
     "TokenEnv": "WEB_TOKEN"                                 # a bearer token, or
     "TokenCommand": ["gcloud", "auth", "print-access-token"]  # a token from a command
     "VerifyTls": true, "CaBundle": "/etc/ca.pem", "Timeout": 60,
     "InstancesPerRequest": 10, "RequestsInFlight": 4, "PageSize": 200}

Secrets come only from the environment or the token command, are read at the first
request, and never reach the config, a log line, an error or a URL.

The place is built in three layers, each with its contract in its module docstring:

- ``connection``: the options, the requests session (TLS, ``Accept-Encoding: identity``,
  auth, the token command and its re-run after a 401) and ``Connection.call``, the one
  mapping of requests' and dicomweb-client's exceptions through ``dicomsync.http_errors``;
- ``stow``: STOW-RS batches, bodies with a Content-Length (never chunked) and the reading
  of the answer's failed-SOP sequence;
- ``place``: ``DicomWebPlace`` (the registered class): QIDO-RS listings and ``holds``,
  WADO-RS retrieval, ``receive``.
"""

from dicomsync.places.dicomweb.connection import (
    Auth,
    AuthSession,
    Connection,
    DicomWebOptions,
    TokenCommandError,
    run_token_command,
)
from dicomsync.places.dicomweb.place import DicomWebPlace
from dicomsync.places.dicomweb.stow import MAX_REQUEST_BYTES, Answer, Stow, read_answer

__all__ = [
    "MAX_REQUEST_BYTES",
    "Answer",
    "Auth",
    "AuthSession",
    "Connection",
    "DicomWebOptions",
    "DicomWebPlace",
    "Stow",
    "TokenCommandError",
    "read_answer",
    "run_token_command",
]
