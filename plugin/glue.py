"""Orthanc's callbacks; each only hands over to ``dicomsync.service.app.Service``, whose
docstring says what each change does (STOPPED waits at most ``STOP_TIMEOUT`` s)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import orthanc

import dicomsync
from dicomsync import jsonsafe
from dicomsync.service.app import Service
from dicomsync.service.callback_thread import settle_callback_thread
from dicomsync.service.rest_common import Reply

log = logging.getLogger(__name__)
APP: Service | None = None


def _on_change(change_type: int, level: int, resource_id: str) -> None:
    try:
        if APP is not None and change_type == orthanc.ChangeType.STABLE_STUDY:
            APP.on_stable_study(resource_id)
        elif APP is not None and change_type == orthanc.ChangeType.ORTHANC_STARTED:
            APP.start_in_background()
        elif APP is not None and change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            APP.stop()
    except Exception:
        log.exception("OnChange(%s, %s) failed", change_type, resource_id)
    try:  # after STARTED: the threads it began keep Orthanc's priority, this one is niced
        settle_callback_thread()
    except Exception:
        log.exception("cannot settle the change-callback thread")


def _send(output: Any, reply: Reply) -> None:
    data = reply.payload()
    for name, value in reply.headers.items():
        output.SetHttpHeader(name, value)
    if reply.status == 200:
        return output.AnswerBuffer(data, reply.content_type)
    output.SetHttpHeader("Content-Type", reply.content_type)
    output.SendHttpStatus(reply.status, data.decode(errors="replace"), len(data))  # not bytes


def _rest(output: Any, uri: str, **request: Any) -> None:
    reply = Reply(503, {"Message": "dicomsync failed to start; see Orthanc's log"})
    try:
        if APP is not None:
            groups, get = request.get("groups") or ("",), request.get("get") or {}
            method, headers = str(request.get("method", "GET")), request.get("headers") or {}
            reply = APP.handle(method, groups[0], get, request.get("body"), headers)
        if reply.status != 405:
            return _send(output, reply)
        output.SendMethodNotAllowed(reply.allow)  # the SDK refuses a body with 405
    except Exception:
        log.exception("REST %s failed", uri[:200])
        with contextlib.suppress(Exception):
            _send(output, Reply(500, {"Message": "internal error; see Orthanc's log"}))


def register() -> None:
    """Called once by entry.py: logging, configuration, callbacks."""
    global APP
    from dicomsync.plugin import log as plugin_log
    from dicomsync.plugin.inprocess import InProcessTransport

    plugin_log.install()
    APP = None
    try:  # bounded (all plugins' sections): an operator's file, never worth a crash
        config = jsonsafe.loads(orthanc.GetConfiguration(), max_depth=256)
        path = orthanc.GetConfigurationPath()
        metric = lambda n, v: orthanc.SetMetricsValue(n, float(v), orthanc.MetricsType.DEFAULT)  # noqa: E731
        APP = Service(config, str(path) if path else None, InProcessTransport(), metric)
    except jsonsafe.JsonRejected as exc:
        log.error("cannot read Orthanc's configuration (%s); routing is OFF", exc)
    except Exception:
        log.exception("cannot set up dicomsync; routing is OFF")
    orthanc.RegisterOnChangeCallback(_on_change)
    orthanc.RegisterRestCallback("/dicomsync/(.*)", _rest)
    log.info("dicomsync %s plugin loaded from %s", dicomsync.__version__, Path(__file__).parent)
