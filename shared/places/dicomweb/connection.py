"""The HTTP side of a ``dicomweb`` place: its options, the requests session, auth, errors.

``DicomWebOptions`` declares the section (see ``dicomsync.places.dicomweb``'s docstring).
``Connection`` owns the one ``requests.Session`` of a place and the
``dicomweb_client.DICOMwebClient`` built over it:

- TLS verification is on unless ``VerifyTls`` is false; ``CaBundle`` is set on this session
  only (nothing process-wide changes);
- ``Accept-Encoding: identity`` on every request: Orthanc (and others) would otherwise gzip
  each DICOM file on the fly (26 ms per file against 1.4 ms, ORTHANC_NOTES);
- dicomweb-client's own retries are off: retries are the queue's (``RetryPolicy``); its
  ``Host`` header gets the port back (it sends the bare host name);
- auth, at most one of: basic (``User`` + the password in ``$PasswordEnv``), a bearer
  token in ``$TokenEnv``, or ``TokenCommand``, an argv list run without a shell whose
  stdout is the token. The secret is read at the first request (``place add`` needs
  none); ``check_environment`` checks it offline.

The token command runs at the first request and again when the server answers 401 to a
token it made (RFC 6750 ``error="invalid_token"``: expired); the request is then sent
once more with the new token. Concurrent 401s of the same token run the command once.
A command that fails is one line naming its program and exit status (``TokenCommandError``);
its stderr and stdout are never shown or logged, as they may hold secrets.

``Connection.call(what, fn)`` is the one translation of what requests and dicomweb-client
raise into ``dicomsync.errors``, through ``dicomsync.http_errors`` (a TLS failure is
``Unreachable``, not retryable; timeouts, resets, 408/429/5xx retryable; 401/403
``AuthenticationFailed``; 404 ``NotFound``; other 4xx ``RemoteRejected``). ``what`` names
the request by its path under the base URL, never with a query string or a secret.

Thread-safety: one session is shared by the place's threads (requests' connection pool
is sized for ``RequestsInFlight``); the token and its generation are guarded by a lock.
In the plugin each route worker thread has its own place object (``RouteHandler``), so a
route sends up to ``Concurrency`` x ``RequestsInFlight`` STOW-RS requests at once.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from dicomsync.errors import AuthenticationFailed, ConfigError, DicomSyncError, RemoteRejected
from dicomsync.http_errors import status_error, transport_error
from dicomsync.options import option

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
DEFAULT_PER_REQUEST = 10
DEFAULT_IN_FLIGHT = 4
DEFAULT_PAGE = 200  # Azure's DICOM service allows at most 200 per QIDO page


@dataclass(frozen=True)
class DicomWebOptions:
    """The options of a ``dicomweb`` place section."""

    url: str = option(
        "Url", "url", "the DICOMweb base URL (QIDO, WADO and STOW under it)", required=True
    )
    user: str | None = option("User", "str", "HTTP basic-auth user (with `PasswordEnv`)")
    password_env: str | None = option(
        "PasswordEnv", "envvar", "name of the environment variable holding the password"
    )
    token_env: str | None = option(
        "TokenEnv", "envvar", "name of the environment variable holding a bearer token"
    )
    token_command: Sequence[str] | None = option(
        "TokenCommand",
        "any",
        "argv list (no shell) whose stdout is a bearer token; run again after a 401",
    )
    token_command_timeout: float = option(
        "TokenCommandTimeout",
        "seconds",
        "seconds the token command may take",
        default=30.0,
        above=0,
    )
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option(
        "CaBundle", "path", "CA bundle file to verify with", shown="system"
    )
    timeout: float = option(
        "Timeout", "seconds", "seconds per request", default=DEFAULT_TIMEOUT, above=0
    )
    instances_per_request: int = option(
        "InstancesPerRequest",
        "int",
        "instances in one STOW-RS request (each request also stays under 64 MB)",
        default=DEFAULT_PER_REQUEST,
        low=1,
        high=1000,
    )
    requests_in_flight: int = option(
        "RequestsInFlight",
        "int",
        "STOW-RS requests in parallel per sender (in the plugin, per route worker thread)",
        default=DEFAULT_IN_FLIGHT,
        low=1,
        high=64,
    )
    page_size: int = option(
        "PageSize", "int", "QIDO-RS results asked per request", default=DEFAULT_PAGE, low=1
    )


def check_auth(opts: DicomWebOptions, where: str) -> tuple[str, ...] | None:
    """The token command as a tuple; ConfigError when the auth options contradict."""
    command = opts.token_command
    if command is not None:
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and a for a in command)
        ):
            raise ConfigError(
                f"{where}: TokenCommand must be a non-empty list of strings "
                '(an argv, run without a shell, e.g. ["gcloud", "auth", "print-access-token"])'
            )
    kinds = [
        name
        for name, on in (
            ("User/PasswordEnv", opts.user or opts.password_env),
            ("TokenEnv", opts.token_env),
            ("TokenCommand", command),
        )
        if on
    ]
    if len(kinds) > 1:
        raise ConfigError(f"{where}: use one way to log in, not {' and '.join(kinds)}")
    if opts.password_env and not opts.user:
        raise ConfigError(f"{where}: PasswordEnv needs User")
    return tuple(command) if command is not None else None


class TokenCommandError(AuthenticationFailed):
    """The token command failed, timed out or printed no token."""


class Auth:
    """The ``Authorization`` header of a place, read or made when first needed."""

    def __init__(
        self,
        where: str,
        *,
        user: str | None = None,
        password_env: str | None = None,
        token_env: str | None = None,
        token_command: tuple[str, ...] | None = None,
        command_timeout: float = 30.0,
    ) -> None:
        self.where = where
        self.user = user
        self.password_env = password_env
        self.token_env = token_env
        self.token_command = token_command
        self.command_timeout = command_timeout
        self._lock = threading.Lock()
        self._header: str | None = None
        self.generation = 0  # bumped each time the token command runs

    @property
    def refreshable(self) -> bool:
        return self.token_command is not None

    def _env(self, variable: str) -> str:
        value = os.environ.get(variable)
        if value is None:
            raise ConfigError(f"{self.where}: environment variable {variable} is not set")
        return value

    def check_environment(self) -> None:
        if self.password_env:
            self._env(self.password_env)
        if self.token_env:
            self._env(self.token_env)
        if self.token_command and shutil.which(self.token_command[0]) is None:
            raise ConfigError(
                f"{self.where}: token command {self.token_command[0]!r} is not on the PATH"
            )

    def header(self) -> tuple[int, str | None]:
        """(generation, the Authorization value or None)."""
        with self._lock:
            if self._header is None:
                self._header = self._make()
            return self.generation, self._header

    def refresh(self, generation: int) -> None:
        """Run the token command again, unless another thread did since ``generation``."""
        with self._lock:
            if self.generation == generation:
                log.info(
                    "%s: the server said the token expired; running the token command", self.where
                )
                self._header = self._make()

    def _make(self) -> str | None:
        if self.user is not None:
            password = self._env(self.password_env) if self.password_env else ""
            raw = f"{self.user}:{password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if self.token_env:
            token = self._env(self.token_env).strip()
            if not is_token(token):  # a line break would carry it into an error message
                raise ConfigError(
                    f"{self.where}: environment variable {self.token_env} must hold one "
                    "token: one line of printable characters without spaces"
                )
            return "Bearer " + token
        if self.token_command:
            self.generation += 1
            return "Bearer " + run_token_command(
                self.token_command, self.command_timeout, self.where
            )
        return None


def is_token(text: str) -> bool:
    """One bearer token: non-empty, printable, no whitespace (no line break)."""
    return bool(text) and not any(c.isspace() or not c.isprintable() for c in text)


def run_token_command(argv: tuple[str, ...], timeout: float, where: str) -> str:
    """The token ``argv`` prints on stdout; one ``TokenCommandError`` line when it cannot.

    No shell; stdin is closed; stderr is captured and dropped (a cloud CLI's error may
    quote credentials), so the message says how to see it instead."""
    name = os.path.basename(argv[0])
    see = f"run {name!r} yourself to see why (its output is not shown: it may hold secrets)"
    try:
        done = subprocess.run(  # an argv from the config, no shell
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise TokenCommandError(f"{where}: token command {name!r} not found") from None
    except subprocess.TimeoutExpired:
        raise TokenCommandError(
            f"{where}: token command {name!r} did not finish within {timeout:g}s", retryable=True
        ) from None
    except OSError as exc:
        raise TokenCommandError(
            f"{where}: token command {name!r} could not run ({exc.strerror})"
        ) from None
    if done.returncode != 0:
        raise TokenCommandError(
            f"{where}: token command {name!r} failed (exit status {done.returncode}); {see}"
        )
    lines = [line.strip() for line in done.stdout.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    if len(lines) != 1 or not is_token(lines[0]):
        raise TokenCommandError(
            f"{where}: token command {name!r} printed {len(lines)} lines, expected one token; {see}"
        )
    return lines[0]


def token_expired(response: requests.Response) -> bool:
    """A 401 that asks for a new token: RFC 6750's ``invalid_token`` (expired, revoked), or
    a 401 that names no error at all (the token is not accepted, so a new one may be)."""
    if response.status_code != 401:
        return False
    challenge = response.headers.get("WWW-Authenticate", "")
    return "invalid_token" in challenge or "error=" not in challenge


class AuthSession(requests.Session):
    """A session that adds the place's ``Authorization`` header and, for a token made by
    the token command, runs the command again once after a 401 and sends the request
    again (bodies here are bytes, so a request can be sent twice)."""

    def __init__(self, auth: Auth) -> None:
        super().__init__()
        self.place_auth = auth

    def request(  # type: ignore[override]
        self, method: str | bytes, url: str | bytes, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        for attempt in (1, 2):
            generation, value = self.place_auth.header()
            if value is not None:
                headers["Authorization"] = value
            kwargs["headers"] = headers
            response = super().request(method, url, **kwargs)
            if attempt == 1 and self.place_auth.refreshable and token_expired(response):
                response.close()
                self.place_auth.refresh(generation)
                continue
            return response
        raise AssertionError("unreachable")


def answer_detail(response: requests.Response) -> str:
    """A short, one-line reason from an error answer: Orthanc's ``Message``, a JSON
    ``error``/``message``, else the start of a text body; empty for anything else."""
    try:
        text = response.text[:2000]
    except Exception:  # a body that cannot be decoded
        return ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("Message", "message", "error_description", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value:
                return " ".join(value.split())[:200]
        return ""
    if "json" in response.headers.get("Content-Type", "") or "<" in text[:1]:
        return ""
    return " ".join(text.split())[:200]


class Connection:
    """The session and dicomweb-client of one place (see the module docstring)."""

    def __init__(
        self,
        url: str,
        auth: Auth,
        *,
        verify: bool | str = True,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.verify = verify
        self.timeout = timeout
        self.pool_size = pool_size
        self._session: AuthSession | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def session(self) -> AuthSession:
        with self._lock:
            if self._session is None:
                session = AuthSession(self.auth)
                session.verify = self.verify
                session.headers["Accept-Encoding"] = "identity"
                adapter = HTTPAdapter(pool_connections=2, pool_maxsize=max(10, self.pool_size + 2))
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                self._session = session
            return self._session

    def client(self) -> Any:
        """The ``DICOMwebClient`` over our session (its retries off)."""
        session = self.session()
        with self._lock:
            if self._client is None:
                from dicomweb_client.api import DICOMwebClient

                client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
                client.set_http_retry_params(retry=False)
                # it sends ``Host: <host>`` without the port; RFC 9110 wants host:port
                client.host = urlsplit(self.url).netloc
                self._client = client
            return self._client

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, its failures as ``dicomsync.errors`` (the module docstring's rule)."""
        try:
            return fn()
        except DicomSyncError:
            raise
        except requests.HTTPError as exc:
            response = exc.response
            if response is None:
                raise transport_error(exc, what) from None
            error = status_error(response.status_code, what, answer_detail(response))
            raise (error or RemoteRejected(f"{what}: {response.status_code}")) from None
        except requests.exceptions.InvalidHeader:  # its text quotes the header: a secret
            raise ConfigError(f"{what}: a request header is not valid (not shown)") from None
        except requests.RequestException as exc:
            raise transport_error(exc, what) from None
        except (ValueError, KeyError, TypeError) as exc:  # an answer we cannot read
            raise RemoteRejected(f"{what}: unreadable answer ({type(exc).__name__})") from None

    def check(self, response: requests.Response, what: str) -> requests.Response:
        """``response`` if it is not an error status; else the mapped error."""
        error = status_error(response.status_code, what, answer_detail(response))
        if error is not None:
            raise error
        return response

    def close(self) -> None:
        with self._lock:
            session, self._session, self._client = self._session, None, None
        if session is not None:
            session.close()


def auth_from(opts: DicomWebOptions, command: tuple[str, ...] | None, where: str) -> Auth:
    return Auth(
        where,
        user=opts.user,
        password_env=opts.password_env,
        token_env=opts.token_env,
        token_command=command,
        command_timeout=opts.token_command_timeout,
    )


def described_auth(auth: Auth) -> str:
    if auth.user is not None:
        return f" (user {auth.user})"
    if auth.token_env:
        return f" (token from ${auth.token_env})"
    if auth.token_command:
        return f" (token from {os.path.basename(auth.token_command[0])!r})"
    return ""


def section_auth(auth: Auth) -> Mapping[str, Any]:
    out: dict[str, Any] = {}
    if auth.user is not None:
        out["User"] = auth.user
    if auth.password_env:
        out["PasswordEnv"] = auth.password_env
    if auth.token_env:
        out["TokenEnv"] = auth.token_env
    if auth.token_command:
        out["TokenCommand"] = list(auth.token_command)
        if auth.command_timeout != 30.0:
            out["TokenCommandTimeout"] = auth.command_timeout
    return out
