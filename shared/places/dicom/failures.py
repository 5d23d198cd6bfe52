"""Every DICOM network failure -> the errors tree, in one place for the ``dicom`` package.

- the association was rejected (wrong called AET, calling AET not allowed):
  ``RemoteRejected`` with the peer's result, source and reason; a *transient* rejection
  (result 2, "busy") is retryable;
- no connection (refused, no route, DNS, timeout): ``Unreachable`` (retryable), with the
  operating system's reason; a TLS handshake or certificate failure is ``Unreachable``
  but **not** retryable (``http_errors.transport_error``, the project's one rule);
- the peer aborted, or sent no answer within ``Timeout``: ``Unreachable`` (retryable);
- the peer refused every presentation context we proposed (a SOP class it does not
  support): ``RemoteRejected`` naming the SOP class and the peer's reason;
- a DIMSE status: 0x0000 and the warnings (0x0001, 0xB000-0xBFFF) are success; the
  "out of resources" failures (0xA700-0xA7FF) are retryable ``RemoteRejected``; every
  other failure is final, with its code.
"""

from __future__ import annotations

import socket
import ssl

from dicomsync.errors import DicomSyncError, RemoteRejected, Unreachable
from dicomsync.http_errors import transport_error

SUCCESS = 0x0000


def status_ok(code: int) -> bool:
    """0x0000 stored, 0x0001 and 0xB000-0xBFFF warnings: stored too."""
    return code == SUCCESS or code == 0x0001 or 0xB000 <= code <= 0xBFFF


def status_error(code: int, what: str, comment: str = "") -> DicomSyncError:
    """The error of a failed DIMSE status ``code`` for ``what``."""
    detail = f" ({comment.strip()})" if comment and comment.strip() else ""
    message = f"{what}: refused with status 0x{code:04X}{detail}"
    return RemoteRejected(message, retryable=0xA700 <= code <= 0xA7FF)


def rejected(peer: str, result: int, result_str: str, source: str, reason: str) -> RemoteRejected:
    """The association was rejected (A-ASSOCIATE-RJ)."""
    message = f"{peer}: association rejected ({result_str}, {source}: {reason})"
    return RemoteRejected(message, retryable=result == 2)


def no_connection(
    peer: str, host: str, port: int, timeout: float, tls: ssl.SSLContext | None
) -> DicomSyncError:
    """Why no association could be made, found by connecting once more ourselves (pynetdicom
    only logs the reason); called only after a failure."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10)) as sock:
            if tls is not None:
                with tls.wrap_socket(sock, server_hostname=host):
                    pass
    except (OSError, ssl.SSLError) as exc:
        return transport_error(exc, f"cannot reach DICOM node {peer}")
    return no_connection_closed(peer)


def no_connection_closed(peer: str) -> Unreachable:
    return Unreachable(f"{peer}: the peer closed the connection before answering")


def aborted(peer: str, what: str, reason: str = "") -> Unreachable:
    """The association was lost during ``what``; ``reason``, when known, says how."""
    detail = f" ({reason})" if reason else ""
    return Unreachable(
        f"{peer}: {what}: the peer aborted the association or did not answer{detail}"
    )


def refused_context(peer: str, sop_class: str, reason: str) -> RemoteRejected:
    """The peer refused the presentation context(s) of ``sop_class``."""
    return RemoteRejected(f"{peer}: refuses SOP class {sop_class} ({reason})")
