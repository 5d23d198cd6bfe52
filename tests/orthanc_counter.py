"""A PythonScript for a test Orthanc: counts the instances it is sent over HTTP.

``GET /counter`` answers ``{"PostInstances": n}``: every ``POST /instances``,
including instances Orthanc already held (which leave no trace in ``/changes``).
Lets tests count real transfers, e.g. that only new instances were re-sent.
"""

import json
import threading
from typing import Any

import orthanc

_lock = threading.Lock()
_count = {"PostInstances": 0}


def _filter(uri: str, **request: Any) -> bool:
    if request.get("method") == orthanc.HttpMethod.POST and uri.rstrip("/") == "/instances":
        with _lock:
            _count["PostInstances"] += 1
    return True


def _answer(output: Any, uri: str, **request: Any) -> None:
    with _lock:
        output.AnswerBuffer(json.dumps(_count), "application/json")


orthanc.RegisterIncomingHttpRequestFilter(_filter)
orthanc.RegisterRestCallback("/counter", _answer)
