"""A ``TokenEnv`` value that is not one printable line never reaches an error message.

requests' ``InvalidHeader`` quotes the header's value (the bearer token) when it holds
a line break; the value is now checked as the token command's output is (one line,
printable, no spaces), and an ``InvalidHeader`` from anywhere is one line without it.
"""

from __future__ import annotations

import pytest
import requests

from dicomsync.errors import ConfigError
from dicomsync.places.dicomweb.connection import Auth, Connection

SECRET = "eyJhbGciOiJSUzI1NiJ9.SECRETPAYLOAD.sig"
URL = "http://127.0.0.1:9/dicom-web/studies"


@pytest.mark.parametrize(
    "value",
    [
        f"{SECRET}\nsecond-line",
        f"{SECRET}\r\nsecond-line",
        f"{SECRET}\rX",
        f"{SECRET} {SECRET}",
        f"{SECRET}\tX",
        f"{SECRET}\x7fX",
        f"{SECRET}\x1bX",
        f"{SECRET}\u2028X",
    ],
)
def test_a_token_env_value_not_one_line_is_a_config_error_without_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DW_TOKEN", value)
    conn = Connection(URL.rsplit("/", 1)[0], Auth("places['pacs']", token_env="DW_TOKEN"))
    with pytest.raises(ConfigError) as info:
        conn.call("QIDO-RS " + URL, lambda: conn.session().get(URL, timeout=2))
    message = str(info.value)
    assert "SECRETPAYLOAD" not in message and "second-line" not in message
    assert "DW_TOKEN" in message
    conn.close()


def test_a_token_env_value_with_outer_whitespace_still_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DW_TOKEN", f"  {SECRET}\n")  # a file read whole: its last newline
    auth = Auth("places['pacs']", token_env="DW_TOKEN")
    assert auth.header()[1] == f"Bearer {SECRET}"


def test_an_invalid_header_is_never_quoted() -> None:
    conn = Connection("http://127.0.0.1:9/dicom-web", Auth("places['pacs']"))

    def fails() -> None:
        raise requests.exceptions.InvalidHeader(
            f"Invalid leading whitespace, reserved character(s), or return character(s) "
            f"in header value: 'Bearer {SECRET}\\nX'"
        )

    with pytest.raises(ConfigError) as info:
        conn.call("QIDO-RS " + URL, fails)
    assert "SECRETPAYLOAD" not in str(info.value)
    conn.close()
