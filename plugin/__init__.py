"""dicomsync.plugin: the Orthanc Python plugin.

Only this package imports ``orthanc``. ``entry.py`` is the script Orthanc loads
(``"PythonScript"``); it puts the project's venv first on ``sys.path`` and calls
``glue.register()``. ``glue`` turns callbacks into queue records and serves the
REST endpoints; ``inprocess`` reads this Orthanc without an HTTP hop; ``log``
forwards Python logging to Orthanc's log.
"""
