"""``HttpTransport`` reads the environment once per session, not on every request.

requests merges the proxy variables, the CA bundle variables and ``~/.netrc`` into every
request of a session that trusts the environment (about a tenth of a small request's
CPU, measured); the transport talks to one URL, so it resolves them when it makes the
session and turns that off. These tests check the settings still apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomsync.orthanc_client import HttpTransport

URL = "http://orthanc.example:8042"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_proxy_variables_apply(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    s = HttpTransport(URL)._session()
    assert s.proxies.get("http") == "http://proxy.example:3128"
    assert s.trust_env is False


def test_no_proxy_bypasses(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    clean_env.setenv("NO_PROXY", "orthanc.example")
    assert not HttpTransport(URL)._session().proxies


def test_ca_bundle_variable_applies_unless_verify_is_given(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    https = URL.replace("http:", "https:")
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read here")
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert HttpTransport(https)._session().verify == str(bundle)
    assert HttpTransport(https, verify=False)._session().verify is False
    own = str(tmp_path / "own.pem")
    assert HttpTransport(https, verify=own)._session().verify == own
    # plain HTTP verifies nothing: no path, which requests would stat on every request
    assert HttpTransport(URL)._session().verify is True
    # but through a proxy the bundle may still be needed (an https proxy)
    clean_env.setenv("HTTP_PROXY", "https://proxy.example:3128")
    assert HttpTransport(URL)._session().verify == str(bundle)


def test_netrc_applies_without_a_user(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine orthanc.example login alice password from-netrc\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    assert HttpTransport(URL)._session().auth == ("alice", "from-netrc")
    assert HttpTransport(URL, "bob", "given")._session().auth == ("bob", "given")


def test_requests_do_not_read_the_environment(
    clean_env: pytest.MonkeyPatch, orthanc_server: Any, tmp_path: Path
) -> None:
    """Five requests against a real Orthanc: the proxy variables are read once (when the
    session is made), not once per request, and no file is looked at per request."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read over plain HTTP")
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    looked: list[str] = []
    real_isdir = os.path.isdir

    def isdir(path: Any) -> bool:
        looked.append(str(path))
        return real_isdir(path)

    clean_env.setattr(os.path, "isdir", isdir)
    calls = []
    real = requests.utils.get_environ_proxies

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        return real(*args, **kw)

    clean_env.setattr(requests.sessions, "get_environ_proxies", counted)
    t = HttpTransport(orthanc_server.url)
    for _ in range(5):
        assert b"Version" in t.get("/system")
    assert len(calls) <= 1, calls
    assert str(bundle) not in looked
