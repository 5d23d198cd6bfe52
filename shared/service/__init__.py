"""dicomsync.service: what the plugin runs, without Orthanc.

Every unit here talks to Orthanc only through ``dicomsync.orthanc_client`` (a
``Transport``: in-process inside the plugin, HTTP in tests) and publishes metrics
through a ``MetricSink`` callable, so each one is tested without the ``orthanc``
module. ``dicomsync.plugin`` keeps only the callbacks and turns a ``Reply`` into
Orthanc's output calls.

| module | contract |
|---|---|
| ``app.py`` | ``Service``: the composition root; builds the units from the configuration, starts and stops their threads |
| ``intake.py`` | ``Intake``: STABLE_STUDY hand-over, route matching -> enqueue, held (unrouted) studies |
| ``changelog.py`` | ``ChangeLog``: the one reader of Orthanc's ``/changes`` |
| ``catch_up.py`` | ``RouteCursor``: the routes' change-log cursor (catch-up of missed studies) |
| ``rest_api.py``, ``rest_jobs.py``, ``rest_common.py`` | ``RestApi``: the ``/dicomsync/`` endpoints, their bodies and limits |
| ``metrics.py`` | ``Metrics`` and Prometheus label escaping |
| ``tag_lanes.py``, ``tag_feed.py``, ``event_cache.py`` | tag sinks: one lane per sink, the change-log feed, the shared event cache |
| ``storage.py`` | an instance's headers from Orthanc's storage folder when safe, else the REST API |
| ``callback_thread.py`` | ``settle_callback_thread``: orthanc-python's change thread made cheap |
"""
