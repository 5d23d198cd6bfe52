"""No credentials inside a URL, for every place and sink kind, checked in one place.

A URL such as ``https://alice:s3cret@splunk:8088`` would carry its password into
``dicomsync.json``, ``place list``/``sink list``, error messages, the plugin's status
pages, Orthanc's log and the queue file. Secrets come only from the environment
(``PasswordEnv``, ``TokenEnv``, ...), so such a section is refused before any kind
sees it: ``dicomsync.registry.Registry.build`` calls ``check_section`` for every place
and sink section, whatever its kind, so a new kind cannot forget the rule.

What counts as a URL with credentials (``has_credentials``):

- any string value, at any depth of the section (lists and objects are walked, without
  recursion), that starts with a scheme and ``//`` (``http://``, ``HTTPS://``,
  ``ftp://``...) and has an ``@`` in its authority, the part up to the first ``/``,
  ``?``, ``#`` or ``\\``;
- the value of any option whose name ends with ``Url`` or ``URL``, even without a
  scheme (``alice:s3cret@splunk:8088``), with the same ``@`` rule.

A user without a password (``https://alice@host``) is refused too: the user belongs in
``User``. One exception: a PostgreSQL URL (``postgresql://``, ``postgres://``) may name
its user, as libpq URLs do (``postgresql://dicomsync@db/orthanc``); a password never.
The error names the section and the option, never the value, so neither the password
nor the ``user:pass`` part can reach a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from dicomsync.errors import ConfigError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[/\\]{2}")
_AUTHORITY_END = re.compile(r"[/?#\\]")
_PG_SCHEMES = ("postgresql:", "postgres:")


def _authority(text: str) -> str:
    end = _AUTHORITY_END.search(text)
    return text[: end.start()] if end else text


def has_credentials(value: str, *, url_option: bool = False) -> bool:
    """True when ``value`` is a URL with a user or password before its host.

    ``url_option``: the option is named ``…Url``, so a value without a scheme is read
    as ``[user[:password]@]host[:port][/path]`` too.
    """
    text = value.strip()
    scheme = _SCHEME.match(text)
    if scheme:
        authority = _authority(text[scheme.end() :])
        if text.lower().startswith(_PG_SCHEMES):
            return ":" in authority.rpartition("@")[0]
        return "@" in authority
    if url_option:
        return "@" in _authority(text.removeprefix("//"))
    return False


def is_url_option(name: str) -> bool:
    return name.endswith(("Url", "URL"))


def _strings(section: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(option path, value, named like a URL) of every string in the section, depth-first,
    with an explicit stack (a hostile, deeply nested section cannot exhaust the C stack)."""
    stack: list[tuple[str, Any, bool]] = [
        (str(k), v, is_url_option(str(k))) for k, v in reversed(list(section.items()))
    ]
    while stack:
        path, value, url_named = stack.pop()
        if isinstance(value, str):
            yield path, value, url_named
        elif isinstance(value, Mapping):
            stack.extend(
                (f"{path}.{k}", v, url_named or is_url_option(str(k)))
                for k, v in reversed(list(value.items()))
            )
        elif isinstance(value, list | tuple):
            stack.extend(
                (f"{path}[{i}]", v, url_named) for i, v in reversed(list(enumerate(value)))
            )


def credential_problem(what: str, key: str, section: Mapping[str, Any]) -> str | None:
    """One sentence naming the first option that holds a URL with credentials, else None.

    ``what`` is "place" or "sink"; the value itself is never quoted.
    """
    kind = section.get("Kind")
    label = f"{kind} {what}" if isinstance(kind, str) and kind else what
    for path, value, url_named in _strings(section):
        if has_credentials(value, url_option=url_named):
            return (
                f"{label} {key!r}: option {path!r} has a user name or password in its URL "
                "(the part before '@'); remove it and give the user and the environment "
                "variable that holds the secret in their own options (User, PasswordEnv, "
                "TokenEnv)"
            )
    return None


def check_section(what: str, key: str, section: Mapping[str, Any]) -> None:
    """ConfigError when any option of the section is a URL with credentials."""
    problem = credential_problem(what, key, section)
    if problem:
        raise ConfigError(problem)
