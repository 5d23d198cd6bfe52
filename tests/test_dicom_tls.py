"""DICOM over TLS against Orthanc with ``DicomTlsEnabled``, with a throw-away CA (openssl):
verification is on by default, a client certificate whose key password comes from an
environment variable, and a certificate failure that is one line and never retried."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomsync.errors import Unreachable
from dicomsync.places.base import PLACES

from conftest import Cli
from dicom_peers import dicom_orthanc
from dicomdata import build_seed_tree
from orthanc_server import OrthancProcess

pytestmark = pytest.mark.orthanc
KEY_PASSWORD = "Tls-Key-Secret-99"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(where: Path) -> Path:
    """ca.pem/ca.key, server.pem/server.key (127.0.0.1), client.pem + client.key (password)."""
    where.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=dicomsync test CA", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=where)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra, cwd=where)  # fmt: skip
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
            "-out", "client-enc.key", cwd=where)  # fmt: skip
    # a CA nobody trusts, for the failure case
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
            "other.pem", "-days", "2", "-subj", "/CN=another CA", cwd=where)  # fmt: skip
    return where


def tls_orthanc(base: Path, name: str, pki: Path) -> OrthancProcess:
    """An Orthanc (not started) whose DICOM port speaks only TLS, with ``pki``'s
    server certificate, trusting ``pki``'s CA."""
    return dicom_orthanc(
        base,
        name,
        config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki / "server.pem"),
            "DicomTlsPrivateKey": str(pki / "server.key"),
            "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
        },
    )


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancProcess, Path]]:
    base = tmp_path_factory.mktemp("tls")
    pki = make_pki(base / "pki")
    server = tls_orthanc(base / "o", "pacs", pki).start()
    yield server, pki
    server.stop()


def test_send_and_read_back_over_tls_with_a_client_certificate(
    tmp_path: Path, cli: Cli, tls_pacs: tuple[OrthancProcess, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, pki = tls_pacs
    build_seed_tree(tmp_path / "root")
    cli("init")
    cli("place", "add", "dicom_root", "my_studies", str(tmp_path / "root"))
    args = [
        "127.0.0.1",
        str(server.dicom_port),
        "PACS",
        "--tls",
        "--ca-bundle",
        str(pki / "ca.pem"),
    ]
    client = ["--cert", str(pki / "client.pem"), "--key", str(pki / "client-enc.key")]
    cli("place", "add", "dicom", "pacs", *args, *client, "--key-env", "DICOM_KEY_PASS")
    config = cli.config.read_text()
    assert KEY_PASSWORD not in config and "DICOM_KEY_PASS" in config
    # without the key's password: one line, before any connection
    assert (
        "environment variable DICOM_KEY_PASS is not set"
        in cli("place", "ls", "pacs", ok=False).output
    )
    monkeypatch.setenv("DICOM_KEY_PASS", KEY_PASSWORD)
    assert "over TLS" in cli("place", "list").output
    ls = cli("place", "ls", "pacs").output.splitlines()
    assert ls[0].startswith("C-ECHO PACS@127.0.0.1:") and ls[1] == "0 studies in pacs:"
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")
    out = cli("send", "my_studies:*", "pacs").output
    assert out.splitlines()[-1].startswith("0 sent, 4 duplicate, 0 failed")
    assert len(cli("find", "pacs:*").output.splitlines()) == 5
    (tmp_path / "fresh").mkdir()
    cli("place", "add", "dicom_root", "fresh", str(tmp_path / "fresh"))
    out = cli("send", "pacs:*", "fresh").output
    assert out.splitlines()[-1].startswith("4 sent, 0 duplicate, 0 failed (16 instances")


def test_an_untrusted_certificate_is_one_line_and_not_retried(
    tmp_path: Path, tls_pacs: tuple[OrthancProcess, Path]
) -> None:
    server, pki = tls_pacs
    section = {
        "Kind": "dicom",
        "Host": "127.0.0.1",
        "Port": server.dicom_port,
        "CalledAet": "PACS",
        "Tls": True,
        "CaBundle": str(pki / "other.pem"),
        "Cert": str(pki / "client.pem"),
        "Key": str(pki / "client.key"),
    }
    with PLACES.build("pacs", section, tmp_path) as place, pytest.raises(Unreachable) as err:
        place.probe()
    assert not err.value.retryable
    assert str(err.value).startswith(
        f"cannot reach DICOM node PACS@127.0.0.1:{server.dicom_port}: TLS verification failed ("
    )
    assert "certificate verify failed" in str(err.value)
    # the system's CAs (no CaBundle) do not know the throw-away CA either
    del section["CaBundle"]
    with PLACES.build("pacs", section, tmp_path) as place, pytest.raises(Unreachable) as err:
        place.probe()
    assert not err.value.retryable
