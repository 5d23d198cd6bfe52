"""dicomsync.plugin: the Orthanc Python plugin, the only package that imports ``orthanc``:
``entry`` (the script Orthanc loads), ``glue`` (callbacks), ``inprocess``, ``log``."""
