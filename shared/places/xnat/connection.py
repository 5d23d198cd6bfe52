"""The XNAT connection of an ``xnat_pre_archive`` place: login, calls and the error mapping.

``XnatConnection`` is the base of ``XnatPreArchive`` (``dicomsync.places.xnat``): it holds
the one xnat session of a place and every request goes through ``_call``.

One xnat session per place, opened on first use and logged out by ``close()``. The place
makes the requests session itself, with ``verify`` (``CaBundle``, or false) set on that
session only, logs it in with xnatpy's login requests and hands it to xnatpy's
``XNATSession`` (``xnat.connect`` has no CA parameter and would read the process-wide
``REQUESTS_CA_BUNDLE``). Nothing process-wide is changed: no environment variable, no
warning filter, no ``logging.Logger`` method. Login requests wait ``min(Timeout, 12 s)``,
the others ``Timeout``. A 401 after login (XNAT forgot the session) logs in again once.
A refused login (password, project, unset variable) is remembered for
``REFUSED_SECONDS`` so that a batch does not try a bad password once per study; an
unreachable XNAT found by ``prepare`` is remembered until the next ``prepare`` (at most
``UNREACHABLE_SECONDS``, set in ``destination``), so the batch's other calls fail at once
instead of waiting again (``_call`` answers with the remembered error).

Errors: every HTTP status and transport failure goes through ``dicomsync.http_errors``
(``_from_xnat`` is the one mapping of xnatpy's and requests' exceptions): a certificate
failure is ``Unreachable`` and not retryable; timeouts, refused or reset connections,
408, 429 and 5xx are ``Unreachable`` and retryable; 401/403 ``AuthenticationFailed``;
404 ``NotFound`` (an unknown project: ``has no project``); other 4xx ``RemoteRejected``.

Thread-safety: the session, the remembered refusal and the remembered unreachable XNAT
are guarded by the place's ``RLock`` (``_lock``); worker lanes may share one place. A
login runs under the lock (one at a time); the other requests run outside it.
Raises only ``dicomsync.errors`` (``ConfigError`` for an unset password variable,
``PlaceKindUnavailable`` without the ``xnat`` package, and the mapped errors above).
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dicomsync.errors import (
    AuthenticationFailed,
    ConfigError,
    DicomSyncError,
    NotFound,
    PlaceKindUnavailable,
    RemoteRejected,
    Unreachable,
)
from dicomsync.http_errors import is_tls_failure, status_error, tls_error_in, transport_error
from dicomsync.places.base import Place
from dicomsync.places.local import storage_error

log = logging.getLogger(__name__)

DEFAULT_PASSWORD_ENV = "XNAT_PASS"
DEFAULT_TIMEOUT = 300.0
REFUSED_SECONDS = 60.0  # a refused login is not tried again for this long (or until close)
PILOT_TIMEOUT = 12.0  # login requests wait at most this long (xnatpy's pilot_timeout)
VERBOSE = 15  # xnatpy's log level between DEBUG and INFO
T = TypeVar("T")

_LOGIN_PAGE = re.compile(
    r'Login attempt failed|<form name="form1" method="post" action="[^"]*login"'
)


def _xnat_message(text: str) -> str:
    """XNAT's error text as one line: the ``<h3>`` of XNAT's (Restlet's) status page, else
    the ``<h1>`` or ``<title>`` of another HTML page (Tomcat, a proxy), else the plain
    body; empty when there is none (``status_error`` then shows the status alone)."""
    for tag in ("h3", "h1", "title"):
        match = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", text, re.S | re.I)
        if match:
            text = match.group(1)
            break
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return " ".join(text.split())[:300]


def _response_of(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status and body an xnatpy or requests exception carries, if it carries one."""
    status = getattr(exc, "status_code", None)  # xnat.exceptions.XNATResponseError
    if isinstance(status, int):
        return status, str(getattr(exc, "text", "") or "")
    response = getattr(exc, "response", None)  # requests.HTTPError
    if response is not None and isinstance(getattr(response, "status_code", None), int):
        return int(response.status_code), str(response.text or "")
    return None, ""


def _log_out(session: Any, timeout: float) -> None:
    """``disconnect`` (``DELETE /data/JSESSION``), waiting as long as a login request may."""
    session.request_timeout = timeout
    session.disconnect()


def _again(error: DicomSyncError) -> DicomSyncError:
    """A fresh copy of a remembered error (same type, message and retryability)."""
    return type(error)(str(error), retryable=error.retryable)


class _ClientLog(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to xnatpy, which logs at its own VERBOSE level through ``.verbose``.

    ``xnat.connect`` adds that method to ``logging.Logger`` for the whole process; the
    place does not call ``connect``, so it gives xnatpy this adapter instead.
    """

    def verbose(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(VERBOSE, msg, *args, **kwargs)


client_log = _ClientLog(logging.getLogger("dicomsync.places.xnat.client"), {})


class XnatConnection(Place):
    """One XNAT server, project and user; the session opened on first use (abstract: the
    place's operations are in the subclasses)."""

    def __init__(
        self,
        key: str,
        server: str,
        project: str,
        user: str,
        *,
        password_env: str = DEFAULT_PASSWORD_ENV,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(key)
        self.server = server.rstrip("/")
        self.project = project
        self.user = user
        self.password_env = password_env
        self.verify_tls = verify_tls
        self.ca_bundle = ca_bundle
        self.timeout = timeout
        self._refused: tuple[float, DicomSyncError] | None = None
        self._down: tuple[float, DicomSyncError] | None = None  # prepare() found XNAT unreachable
        self._session: Any = None
        self._lock = threading.RLock()

    # --- the xnat session -----------------------------------------------------------------
    @property
    def _where(self) -> str:
        return f"XNAT {self.server}"

    def _what(self, action: str) -> str:
        return f"{self._where} {action}"

    def check_environment(self) -> None:
        self._password()

    def _password(self) -> str:
        password = os.environ.get(self.password_env)
        if not password:
            raise ConfigError(
                f"xnat_pre_archive place {self.key!r}: set the password in the environment "
                f"variable {self.password_env}"
            )
        return password

    def _open(self) -> Any:
        with self._lock:
            if self._session is not None:
                return self._session
            if self._refused is not None and time.monotonic() < self._refused[0]:
                # do not hammer XNAT with a password it refused (accounts get locked)
                raise _again(self._refused[1])
            try:
                return self._login()
            except (AuthenticationFailed, NotFound, ConfigError) as exc:
                self._refused = (time.monotonic() + REFUSED_SECONDS, exc)
                raise

    def _verify_setting(self) -> bool | str:
        """What this place's requests session verifies TLS with (only this session's)."""
        if not self.verify_tls:
            return False
        return self.ca_bundle or True

    def _login(self) -> Any:
        """xnatpy's login sequence, on a requests session of our own.

        ``xnat.connect`` builds its requests session inside and has no CA parameter, so the
        only way to give it a CA bundle would be ``REQUESTS_CA_BUNDLE`` in ``os.environ``,
        which every other HTTPS client of the process would then use too. Instead the
        session is made here with ``verify`` set on it, logged in with the requests
        xnatpy makes (redirect probe, ``PUT /data/services/auth``, ``GET /data/auth``), and
        handed to xnatpy's ``XNATSession`` (``no_parse_model``: the model is never built).
        Login requests wait ``min(Timeout, 12 s)`` (xnatpy's own limit is 12 s).
        """
        with self._lock:
            try:
                import requests
                import xnat
                from xnat.session import XNATSession
                from xnat.utils import JSessionAuth
            except ImportError as exc:
                raise PlaceKindUnavailable(
                    f"xnat_pre_archive place {self.key!r} needs the 'xnat' package "
                    f"(pip install xnat): {exc}"
                ) from None
            password = self._password()
            log.debug("connecting to %s as %s", self.server, self.user)
            if not self.verify_tls:
                log.warning("%s: TLS certificates are not verified (VerifyTls: false)", self._where)
            http = requests.Session()
            http.verify = self._verify_setting()
            http.headers["User-Agent"] = (
                f"dicomsync xnatpy/{xnat.__version__} requests/{requests.__version__}"
            )
            http.auth = JSessionAuth()
            timeout = min(self.timeout, PILOT_TIMEOUT)
            try:
                with self._translate("login"):
                    server, token = self._authenticate(http, password, timeout)
                    session = XNATSession(
                        server=server,
                        logger=client_log,
                        interface=http,
                        original_uri=self.server,
                        logged_in_user=self.user,
                        default_timeout=self.timeout,
                        jsession=token,
                    )
            except BaseException:
                http.close()
                raise
            finally:
                del password
            self._session = session
            try:
                self._check_project()
            except BaseException:
                self.close()
                raise
            return session

    def _authenticate(self, http: Any, password: str, timeout: float) -> tuple[str, str]:
        """Log ``http`` in; the server URL to use (after redirects) and the JSESSIONID."""
        import xnat
        from xnat.utils import JSessionAuth

        probe = http.get(self.server, timeout=timeout)  # xnatpy's redirect probe
        server = str(xnat.detect_redirection(probe, self.server, client_log)).rstrip("/")
        answer = http.put(
            f"{server}/data/services/auth",
            data={"username": self.user, "password": password},
            timeout=timeout,
        )
        if answer.status_code in (401, 403):
            raise self._refused_login()
        self._raise_for(answer, "login")
        token = answer.text.strip()
        http.auth = JSessionAuth(token)
        if not http.cookies.get("JSESSIONID"):
            http.cookies.set("JSESSIONID", token)
        check = http.get(f"{server}/data/auth", timeout=timeout)
        # what xnatpy's check_auth reads as a refused login: 401, or a login page
        if check.status_code == 401 or re.search(_LOGIN_PAGE, check.text):
            raise self._refused_login()
        if "Your password has expired" in check.text:
            raise AuthenticationFailed(
                f"{self._where}: the password of user {self.user!r} has expired; renew it in XNAT"
            )
        self._raise_for(check, "login")
        if not re.search(r"User '[^']+' is logged in|Logged in as", check.text):
            raise RemoteRejected(
                f"{self._what('login')}: /data/auth did not confirm the login; "
                "is Server the address of an XNAT?"
            )
        return server, token

    def _refused_login(self) -> AuthenticationFailed:
        return AuthenticationFailed(
            f"{self._where} refused the login of user {self.user!r} "
            f"(check the password in {self.password_env})"
        )

    def _raise_for(self, response: Any, action: str) -> None:
        error = self._status_error(int(response.status_code), str(response.text or ""), action)
        if error is not None:
            raise error

    def _check_project(self) -> None:
        self._call(
            "project check", lambda s: s.get(f"/data/projects/{self.project}", format="json")
        )

    def close(self) -> None:
        """Log out (waiting as long as a login may) and forget what was remembered."""
        with self._lock:
            self._refused = None
            self._down = None
            session, self._session = self._session, None
            if session is not None:
                try:
                    _log_out(session, min(self.timeout, PILOT_TIMEOUT))
                except Exception as exc:  # logging out of a server that is gone
                    log.debug("closing the XNAT session failed: %s", type(exc).__name__)

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)``; one re-login if XNAT forgot our session (401)."""
        with self._lock:
            down = self._down
        if down is not None and time.monotonic() < down[0]:
            # prepare() found XNAT unreachable: the batch's other calls fail at once
            raise _again(down[1])
        session = self._open()
        state: dict[str, int] = {}
        try:
            with self._translate(what, state):
                return fn(session)
        except AuthenticationFailed:
            if state.get("status") != 401:
                raise
            log.info("%s: session expired; logging in again", self._where)
        with self._lock:
            old, self._session = self._session, None
        if old is not None:
            with contextlib.suppress(Exception):
                _log_out(old, min(self.timeout, PILOT_TIMEOUT))
        session = self._open()
        with self._translate(what):
            return fn(session)

    @contextlib.contextmanager
    def _translate(self, action: str, state: dict[str, int] | None = None) -> Iterator[None]:
        """Turn xnat/requests exceptions into dicomsync errors (one line, no secret)."""
        try:
            yield
        except DicomSyncError:
            raise
        except Exception as exc:
            error, status = self._from_xnat(exc, action)
            if state is not None and status is not None:
                state["status"] = status
            raise error from None

    def _from_xnat(self, exc: Exception, action: str) -> tuple[DicomSyncError, int | None]:
        """The one mapping of xnatpy's and requests' exceptions, with the HTTP status if any.

        Statuses and transport failures go through ``dicomsync.http_errors``, so XNAT
        follows the rule every HTTP client of ours follows (TLS failures not retryable,
        timeouts, resets and 5xx retryable).
        """
        import requests
        import urllib3
        import xnat.exceptions as xe

        if isinstance(exc, xe.XNATAuthError):
            return self._refused_login(), None
        status, text = _response_of(exc)
        if status is not None:
            error = self._status_error(status, text, action)
            if error is None:  # xnatpy refused a 2xx/3xx answer (unexpected content)
                error = RemoteRejected(
                    f"{self._what(action)}: unexpected answer ({status}: {_xnat_message(text)})"
                )
            return error, status
        if isinstance(exc, requests.exceptions.InvalidJSONError):
            return RemoteRejected(f"{self._what(action)}: the answer is not JSON"), None
        if isinstance(
            exc,
            requests.RequestException
            | urllib3.exceptions.HTTPError
            | xe.XNATConnectionError
            | xe.XNATSSLError
            | ConnectionError
            | TimeoutError,
        ):
            return self._transport_error(exc, action), None
        if isinstance(exc, OSError) and not isinstance(exc, xe.XNATError):
            # our temporary files: a full or read-only disk
            return storage_error(exc, f"a temporary file ({action})"), None
        message = _xnat_message(str(exc))
        return RemoteRejected(f"{self._what(action)}: {type(exc).__name__}: {message}"), None

    def _status_error(self, status: int, text: str, action: str) -> DicomSyncError | None:
        if action == "project check" and status in (403, 404):
            extra = "" if status == 404 else f" or user {self.user!r} may not access it"
            return NotFound(f"{self._where} has no project {self.project!r}{extra}")
        return status_error(status, self._what(action), _xnat_message(text))

    def _transport_error(self, exc: BaseException, action: str) -> DicomSyncError:
        import requests
        import xnat.exceptions as xe

        if isinstance(exc, xe.XNATError) and isinstance(exc.__context__, requests.RequestException):
            exc = exc.__context__  # xnatpy re-raises requests' error with a generic text
        if is_tls_failure(exc):
            error = transport_error(tls_error_in(exc) or exc, self._what(action))
            hint = "; give the CA in CaBundle" if self.verify_tls and not self.ca_bundle else ""
            return Unreachable(f"{error}{hint}", retryable=False)
        return transport_error(exc, f"{self._where} is unreachable during {action}")
