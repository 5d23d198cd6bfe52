"""``settle_callback_thread``: make the thread orthanc-python runs change callbacks on
cheap, once per thread.

orthanc-python calls the change callback from a thread of its own, about once per
stored instance, and enters Python each time through ``PyGILState_Ensure/Release``:
each call creates and destroys a Python thread state, and that thread wakes for every
change. Measured on a 1,000-instance upload, a no-op callback alone took 0.2 s of CPU
and slowed ingest by a few percent. Two changes make it nearly free:

- one ``PyGILState_Ensure`` that is never released keeps this thread's state alive, so
  later calls only take the GIL;
- the nice value the workers have (``WORKER_NICE``): the thread then drains the changes
  in batches instead of waking per instance, and never preempts an upload. The callback
  only hands over, so waiting for the CPU costs nothing.

(0.2 s of CPU went to 0.03 s.) The plugin calls this after handling a change, so the
threads the first one (ORTHANC_STARTED) starts keep Orthanc's priority. Outside CPython
or Linux it changes nothing. Call it only on a thread that lives as long as the process
(its Python state is never freed). Never raises for a missing ``ctypes``/``pythonapi``.
"""

from __future__ import annotations

import logging
import threading

from dicomsync.worker import lower_thread_priority

log = logging.getLogger(__name__)

WORKER_NICE = 10  # workers (and their upload threads) yield the CPU to ingest

_settled_threads: set[int] = set()


def settle_callback_thread() -> None:
    ident = threading.get_ident()  # not a threading.local: it dies with the thread state
    if ident in _settled_threads:
        return
    _settled_threads.add(ident)
    try:
        import ctypes

        ctypes.pythonapi.PyGILState_Ensure()  # never released: the state outlives calls
    except (ImportError, AttributeError, OSError):
        log.debug("cannot keep the change-callback thread's Python state")
    lower_thread_priority(WORKER_NICE)
