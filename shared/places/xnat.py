"""``xnat_pre_archive``: an XNAT project's prearchive, through the ``xnat`` client (xnatpy).

Config section (the same in ``dicomsync.json`` and in the plugin's ``DicomSync.Places``)::

    {"Kind": "xnat_pre_archive", "Server": "https://xnat.example.org", "Project": "MYPROJ",
     "User": "alice", "PasswordEnv": "XNAT_PASS", "VerifyTls": true, "CaBundle": "/etc/ca.pem",
     "Timeout": 300}

``PasswordEnv`` (default ``XNAT_PASS``) names the environment variable that holds the
password. The password is read when the place first connects, and is never stored,
logged or put into an error message. ``CaBundle`` and ``Timeout`` are optional.

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
``UNREACHABLE_SECONDS``), so the batch's other calls fail at once instead of waiting
again.

Errors: every HTTP status and transport failure goes through ``dicomsync.http_errors``
(``_from_xnat`` is the one mapping of xnatpy's and requests' exceptions): a certificate
failure is ``Unreachable`` and not retryable; timeouts, refused or reset connections,
408, 429 and 5xx are ``Unreachable`` and retryable; 401/403 ``AuthenticationFailed``;
404 ``NotFound`` (an unknown project: ``has no project``); other 4xx ``RemoteRejected``.

Keys are ``<subject>/<session label>``.

As a destination
    ``prepare`` lists the project's prearchive once (RECEIVING sessions included) and its
    archived experiments once, with their StudyInstanceUIDs. A study counts as present
    when a session (prearchived or archived) with the same StudyInstanceUID exists in the
    project: ``holds`` then answers every SOP UID of the study. XNAT's listings carry no
    SOP UIDs, and downloading a session to compare instance by instance would cost as
    much as sending it, so the session's existence is the duplicate rule. A session still
    RECEIVING therefore also counts: an upload in progress is not duplicated.

    ``receive`` writes the instances one by one into a temporary zip file (never the whole
    study in memory) and uploads it with the request xnatpy's ``services.import_`` makes
    (``POST /data/services/import?dest=/prearchive&import-handler=DICOM-zip``, with
    ``Timeout``), the subject and session labels mapped from the key by ``xnat_label``.
    Then it checks that the session exists and that its scans hold at least the number
    of files sent. XNAT groups what it receives into sessions by
    (project, StudyInstanceUID, label), so a re-send merges into the same session.

    XNAT's importer parses each file only up to a stop tag and copies the rest (Pixel Data
    included) unparsed; it answers ``400`` for a member that is not DICOM or has no SOP
    Class or SOP Instance UID, after storing the members before it. Because a session's
    existence counts as "present", ``receive`` deletes a session that this very upload
    created before it raises ``RemoteRejected`` with XNAT's message. The error is not
    retryable: XNAT refuses the content, and sending it again gives the same answer. A
    retried receive (after a 503 or a lost answer) merges into the same session.

    When the experiment listing has no ``UID`` column (XNAT did not give it), archived
    sessions are matched by (subject, session label) instead, with one warning.

As a source
    ``studies`` lists prearchive sessions (not those still RECEIVING, whose content is
    incomplete) and archived experiments. ``identity`` downloads the session's DICOM as
    one zip into a temporary folder and reads the headers; that download is cached for
    the life of the place and ``instances`` reads from it.

Label mapping (``xnat_label``): XNAT labels may hold only letters, digits, ``_`` and
``-``. Accents are removed (``é`` -> ``e``), every other character becomes ``_``, an
empty value becomes ``unknown``, and labels longer than 64 characters are cut and get an
8-character hash suffix.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
import unicodedata
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dicomsync.errors import (
    AuthenticationFailed,
    ConfigError,
    DicomFileError,
    DicomSyncError,
    NotFound,
    PlaceKindUnavailable,
    RemoteRejected,
    TransferError,
    Unreachable,
)
from dicomsync.http_errors import is_tls_failure, status_error, transport_error
from dicomsync.identity import StudyIdentity, identity_of, read_header
from dicomsync.options import option, parse
from dicomsync.places.base import Instance, Place, Receipt, StudyRef, split_key
from dicomsync.places.local import storage_error, storage_errors
from dicomsync.query import StudyQuery

log = logging.getLogger(__name__)

DEFAULT_PASSWORD_ENV = "XNAT_PASS"
LISTING_MAX_AGE = 300.0  # seconds a project listing answers duplicate checks
DEFAULT_TIMEOUT = 300.0
REFUSED_SECONDS = 60.0  # a refused login is not tried again for this long (or until close)
UNREACHABLE_SECONDS = 60.0  # after prepare() found XNAT unreachable, at most this long
PILOT_TIMEOUT = 12.0  # login requests wait at most this long (xnatpy's pilot_timeout)
VERBOSE = 15  # xnatpy's log level between DEBUG and INFO
MAX_LABEL = 64
T = TypeVar("T")

_LABEL_BAD = re.compile(r"[^A-Za-z0-9_-]")
_LOGIN_PAGE = re.compile(
    r'Login attempt failed|<form name="form1" method="post" action="[^"]*login"'
)


def xnat_label(value: str) -> str:
    """Map a key part to an XNAT label (letters, digits, ``_`` and ``-`` only)."""
    text = unicodedata.normalize("NFKD", str(value).strip())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _LABEL_BAD.sub("_", text)
    if not text:
        return "unknown"
    if len(text) > MAX_LABEL:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        text = text[: MAX_LABEL - 9] + "_" + digest
    return text


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


def _ssl_error_in(exc: BaseException) -> BaseException:
    """The ``ssl`` error inside requests' and urllib3's wrappers (its text says what failed)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        inner = (getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args)
        todo.extend(x for x in inner if isinstance(x, BaseException))
    return exc


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


client_log = _ClientLog(logging.getLogger(__name__ + ".client"), {})


@dataclass(frozen=True)
class _Session:
    """A prearchive session or an archived experiment, as listed."""

    subject: str
    label: str
    tag: str  # StudyInstanceUID ("" when XNAT does not know it)
    status: str  # prearchive status; "ARCHIVED" for experiments
    uri: str  # /data/prearchive/projects/P/ts/name or /data/experiments/ID

    @property
    def archived(self) -> bool:
        return self.status == "ARCHIVED"

    @property
    def zip_uri(self) -> str:
        return f"{self.uri}/scans/ALL/files" if self.archived else self.uri


@dataclass
class _Download:
    identity: StudyIdentity
    path: Path
    members: dict[str, str]  # SOP UID -> zip member


@dataclass(frozen=True)
class XnatOptions:
    """The options of an ``xnat_pre_archive`` place section."""

    server: str = option("Server", "url", "the XNAT base URL", required=True)
    project: str = option("Project", "str", "the project whose pre-archive receives", required=True)
    user: str = option("User", "str", "the XNAT user", required=True)
    password_env: str = option(
        "PasswordEnv",
        "envvar",
        "name of the environment variable holding the password",
        default=DEFAULT_PASSWORD_ENV,
    )
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option(
        "CaBundle", "path", "CA bundle file to verify with", shown="system"
    )
    timeout: float = option(
        "Timeout", "seconds", "seconds per request", default=DEFAULT_TIMEOUT, above=0
    )


class XnatPreArchive(Place):
    kind = "xnat_pre_archive"
    label = "XNAT pre-archive"
    Options = XnatOptions

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
        self._present: set[str] | None = None  # StudyInstanceUIDs in the project
        self._listed_at = 0.0  # monotonic time of the listing behind _present
        self._listing: list[_Session] | None = None
        self._untagged: set[tuple[str, str]] = set()  # (subject, label) of sessions without UID
        self._warned_no_uid = False
        self._downloads: dict[str, _Download] = {}
        self._tmp: Path | None = None

    # --- configuration ----------------------------------------------------------------
    @classmethod
    def from_config(cls, key: str, section: Mapping[str, Any], *, base_dir: Path) -> Place:
        opts = parse(XnatOptions, section, f"{cls.kind} place {key!r}")
        ca_bundle = None
        if opts.ca_bundle:
            ca_path = Path(opts.ca_bundle).expanduser()
            ca_bundle = str(ca_path if ca_path.is_absolute() else base_dir / ca_path)
        return cls(
            key,
            opts.server,
            opts.project,
            opts.user,
            password_env=opts.password_env,
            verify_tls=opts.verify_tls,
            ca_bundle=ca_bundle,
            timeout=opts.timeout,
        )

    def to_config(self) -> dict[str, Any]:
        section: dict[str, Any] = {
            "Kind": self.kind,
            "Server": self.server,
            "Project": self.project,
            "User": self.user,
            "PasswordEnv": self.password_env,
        }
        if not self.verify_tls:
            section["VerifyTls"] = False
        if self.ca_bundle:
            section["CaBundle"] = self.ca_bundle
        if self.timeout != DEFAULT_TIMEOUT:
            section["Timeout"] = self.timeout
        return section

    def describe(self) -> str:
        return f"XNAT pre-archive project '{self.project}' at {self.server} (user {self.user})"

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
        with self._lock:
            self._refused = None
            self._down = None
            session, self._session = self._session, None
            if session is not None:
                try:
                    _log_out(session, min(self.timeout, PILOT_TIMEOUT))
                except Exception as exc:  # logging out of a server that is gone
                    log.debug("closing the XNAT session failed: %s", type(exc).__name__)
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self._downloads.clear()

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
            error = transport_error(_ssl_error_in(exc), self._what(action))
            hint = "; give the CA in CaBundle" if self.verify_tls and not self.ca_bundle else ""
            return Unreachable(f"{error}{hint}", retryable=False)
        return transport_error(exc, f"{self._where} is unreachable during {action}")

    # --- listings ---------------------------------------------------------------------------
    def _list_sessions(self) -> list[_Session]:
        """One prearchive listing (RECEIVING included) and one archive listing."""

        def run(s: Any) -> list[_Session]:
            pre = s.get_json(f"/data/prearchive/projects/{self.project}")
            exp = s.get_json(
                f"/data/projects/{self.project}/experiments",
                query={"columns": "ID,label,subject_label,UID,xsiType"},
            )
            out: list[_Session] = []
            for row in pre["ResultSet"]["Result"]:
                url = str(row.get("url", ""))
                out.append(
                    _Session(
                        subject=str(row.get("subject", "") or ""),
                        label=str(row.get("name", "") or row.get("folderName", "") or ""),
                        tag=str(row.get("tag", "") or ""),
                        status=str(row.get("status", "") or ""),
                        uri=url if url.startswith("/data/") else f"/data{url}",
                    )
                )
            rows = exp["ResultSet"]["Result"]
            if rows and not all("UID" in row for row in rows) and not self._warned_no_uid:
                self._warned_no_uid = True
                log.warning(
                    "%s: the experiment listing of project %r has no UID column; archived "
                    "sessions are matched by subject and session label instead of "
                    "StudyInstanceUID",
                    self._where,
                    self.project,
                )
            for row in rows:
                out.append(
                    _Session(
                        subject=str(row.get("subject_label", "") or ""),
                        label=str(row.get("label", "") or ""),
                        tag=str(row.get("UID", "") or ""),
                        status="ARCHIVED",
                        uri=f"/data/experiments/{row['ID']}",
                    )
                )
            return out

        with self._lock:
            self._listing = self._present = None  # a failed listing leaves no stale answer
        sessions = self._call("listing", run)
        with self._lock:  # worker lanes may share one place between threads
            self._set_listing(sessions)
            self._listed_at = time.monotonic()
        return sessions

    def _set_listing(self, sessions: list[_Session]) -> None:
        """The sessions, and what counts as present: their StudyInstanceUIDs, and the
        (subject, label) of sessions listed without one (XNAT did not say it)."""
        self._listing = sessions
        self._present = {s.tag for s in sessions if s.tag}
        self._untagged = {(s.subject, s.label) for s in sessions if not s.tag}

    # --- destination -------------------------------------------------------------------------
    def prepare(self, identities: Iterable[tuple[str, StudyIdentity]]) -> None:
        """List the project once for the batch; an unreachable XNAT is remembered.

        Every prepare() tries again (a retry of the batch, the next plugin job). When it
        finds XNAT unreachable, the batch's ``holds``/``receive`` calls answer with the
        same error at once, instead of each logging in and waiting ``Timeout`` again.
        """
        with self._lock:
            self._down = None
        try:
            self._list_sessions()
        except Unreachable as exc:
            with self._lock:
                self._down = (time.monotonic() + UNREACHABLE_SECONDS, exc)
            raise

    def holds(self, key: str, identity: StudyIdentity) -> frozenset[str]:
        present = self._present
        # A long-lived place (a plugin worker's) lists again when its listing is old, so a
        # session deleted in XNAT is sent again; within a batch, prepare() lists once.
        if present is None or time.monotonic() - self._listed_at > LISTING_MAX_AGE:
            self._list_sessions()
            present = self._present or set()
        if identity.study_uid and identity.study_uid in present:
            return identity.sop_uids
        patient, study = split_key(key)
        if (xnat_label(patient), xnat_label(study)) in self._untagged:
            return identity.sop_uids
        return frozenset()

    def receive(self, key: str, instances: Iterable[Instance], identity: StudyIdentity) -> Receipt:
        patient, study = split_key(key)
        subject, label = xnat_label(patient), xnat_label(study)
        if self._listing is None:
            self._list_sessions()
        before = {s.uri for s in (self._listing or [])}
        with storage_errors("a temporary upload zip"):
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=self._tmpdir())
            os.close(fd)
        zip_path = Path(name)
        try:
            with storage_errors(str(zip_path)):
                count = self._write_zip(zip_path, instances)
            if count == 0:
                raise RemoteRejected(f"{key}: nothing to send")
            log.info(
                "uploading %s (%d instances) to %s project %s as %s/%s",
                key,
                count,
                self.server,
                self.project,
                subject,
                label,
            )

            def upload(s: Any) -> Any:
                # what xnatpy's services.import_ sends, as one POST whose failure keeps
                # its status (import_ turns it into text), with Timeout applied
                with open(zip_path, "rb") as fh:
                    return s.post(
                        "/data/services/import",
                        data=fh,
                        query={
                            "dest": "/prearchive",
                            "project": self.project,
                            "subject": subject,
                            "session": label,
                            "import-handler": "DICOM-zip",
                        },
                        headers={"Content-Type": "application/zip"},
                        timeout=self.timeout,
                    )

            try:
                response = self._call("upload", upload)
            except RemoteRejected:
                self._remove_new_sessions(subject, label, before)
                raise
            uri = (str(response.text or "").split() or [""])[0]
            self._verify(key, uri, count, label, before, identity)
        finally:
            zip_path.unlink(missing_ok=True)
        with self._lock:
            if self._present is not None and identity.study_uid:
                self._present.add(identity.study_uid)
            elif not identity.study_uid:
                self._untagged.add((subject, label))
            if self._listing is not None and uri not in before:
                # known from now on, so that a later failure in this batch never removes it
                self._listing.append(_Session(subject, label, identity.study_uid, "READY", uri))
        return Receipt(count, f"{self.server}{uri}")

    def _write_zip(self, path: Path, instances: Iterable[Instance]) -> int:
        count = 0
        seen: set[str] = set()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for inst in instances:
                if inst.sop_uid in seen:
                    continue
                seen.add(inst.sop_uid)
                count += 1
                base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(inst.name))[-80:]
                zf.writestr(f"{count:06d}_{base or 'instance'}", inst.read())
        return count

    def _verify(
        self, key: str, uri: str, count: int, label: str, before: set[str], identity: StudyIdentity
    ) -> None:
        """The session exists and its scans hold at least the files sent."""
        if not uri.startswith("/data/prearchive/"):
            raise TransferError(f"{key}: XNAT answered the upload with {uri!r}, not a session")

        def files(s: Any) -> dict[str, int]:
            counts: dict[str, int] = {}
            scans = s.get_json(f"{uri}/scans")["ResultSet"]["Result"]
            for scan in scans:
                sid = str(scan["ID"])
                res = s.get_json(f"{uri}/scans/{sid}/resources")["ResultSet"]["Result"]
                counts[sid] = sum(
                    int(r.get("file_count", 0) or 0)
                    for r in res
                    if r.get("label") in ("DICOM", "secondary")
                )
            return counts

        try:
            counts = self._call("verification", files)
        except NotFound:
            raise TransferError(f"{key}: XNAT session {uri} is missing after the upload") from None
        total = sum(counts.values())
        if total < count:
            detail = ", ".join(f"scan {k}: {v}" for k, v in sorted(counts.items()))
            if uri not in before:
                self._remove(uri)
            raise TransferError(
                f"{key}: XNAT session {uri} holds {total} files after sending {count} ({detail})"
            )
        log.info("%s: XNAT session %s holds %d files in %d scans", key, uri, total, len(counts))

    def _remove_new_sessions(self, subject: str, label: str, before: set[str]) -> None:
        """After a rejected upload, delete the partial sessions this upload created."""
        try:
            sessions = self._list_sessions()
        except DicomSyncError as exc:
            log.warning("cannot list XNAT sessions to remove a partial upload: %s", exc)
            return
        removed = {
            s.uri
            for s in sessions
            if not s.archived and s.uri not in before and (s.subject, s.label) == (subject, label)
        }
        for uri in sorted(removed):
            self._remove(uri)
        with self._lock:
            self._set_listing([s for s in sessions if s.uri not in removed])

    def _remove(self, uri: str) -> None:
        src = uri.removeprefix("/data")
        try:
            self._call(
                "cleanup", lambda s: s.post("/data/services/prearchive/delete", query={"src": src})
            )
            log.warning("removed partial XNAT session %s", uri)
        except DicomSyncError as exc:
            log.warning("could not remove partial XNAT session %s: %s", uri, exc)

    # --- source --------------------------------------------------------------------------------
    def studies(self, query: StudyQuery | None = None) -> Iterator[StudyRef]:
        query = query or StudyQuery(self.key)
        seen: set[str] = set()
        sessions = self._list_sessions()
        # archived experiments first: they are final; prearchive copies come second
        for s in sorted(sessions, key=lambda s: (not s.archived, s.uri)):
            if s.status == "RECEIVING":
                log.info("skipping XNAT session %s: still RECEIVING", s.uri)
                continue
            patient, study = s.subject or "unknown", s.label or "unknown"
            if f"{patient}/{study}" in seen:
                # disambiguate by the experiment ID or the prearchive timestamp
                study = (
                    f"{study}@{s.uri.rsplit('/', 1)[-1] if s.archived else s.uri.split('/')[-2]}"
                )
            seen.add(f"{patient}/{study}")
            if query.matches(patient, study):
                yield StudyRef(self.key, patient, study, handle=s.uri)

    def _resolve(self, ref: StudyRef) -> _Session:
        if self._listing is None:
            self._list_sessions()
        for s in self._listing or []:
            if s.uri == ref.handle:
                return s
        for candidate in self.studies(StudyQuery(self.key, ref.patient, ref.study)):
            for s in self._listing or []:
                if s.uri == candidate.handle:
                    return s
        raise NotFound(f"{ref}: no such XNAT session in project {self.project!r}")

    def _tmpdir(self) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="dicomsync-xnat-"))
            return self._tmp

    def _download(self, ref: StudyRef) -> _Download:
        session = self._resolve(ref)
        cached = self._downloads.get(session.uri)
        if cached is not None:
            return cached
        with storage_errors("a temporary download zip"):
            fd, name = tempfile.mkstemp(prefix="session-", suffix=".zip", dir=self._tmpdir())
        path = Path(name)

        def fetch(s: Any) -> None:
            with os.fdopen(os.dup(fd), "wb") as fh:
                fh.truncate(0)
                s.download_stream(session.zip_uri, fh, format="zip")

        try:
            self._call("download", fetch)
        finally:
            os.close(fd)
        headers = []
        members: dict[str, str] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    try:
                        with zf.open(info) as f:
                            h = read_header(f)
                    except DicomFileError as exc:
                        log.debug("skipping %s in %s: %s", info.filename, session.uri, exc)
                        continue
                    headers.append(h)
                    members.setdefault(h.sop_uid, info.filename)
        except zipfile.BadZipFile as exc:
            raise RemoteRejected(f"{ref}: XNAT sent an unreadable zip ({exc})") from None
        download = _Download(identity_of(headers), path, members)
        self._downloads[session.uri] = download
        return download

    def identity(self, ref: StudyRef) -> StudyIdentity:
        return self._download(ref).identity

    def instances(self, ref: StudyRef, only: Collection[str] | None = None) -> Iterator[Instance]:
        download = self._download(ref)
        for sop, member in sorted(download.members.items(), key=lambda kv: kv[1]):
            if only is not None and sop not in only:
                continue

            def load(path: Path = download.path, name: str = member) -> bytes:
                with zipfile.ZipFile(path) as zf:
                    return zf.read(name)

            yield Instance(sop, os.path.basename(member), load)
