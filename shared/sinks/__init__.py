"""Tag sinks: where events go (Splunk HEC, the embedded SQLite index).

See ``dicomsync.sinks.base`` for the contract the plugin and the CLI use.
"""

from __future__ import annotations

from dicomsync.sinks.base import SINKS, Sink, StudyHit, build_sink, delivered_before

__all__ = ["SINKS", "Sink", "StudyHit", "build_sink", "delivered_before"]
