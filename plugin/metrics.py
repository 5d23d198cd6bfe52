"""Prometheus helpers for the plugin's metrics (``orthanc.SetMetricsValue`` names)."""

from __future__ import annotations


def label(name: str, value: str) -> str:
    """``{name="value"}`` with the value escaped as Prometheus' text format wants
    (backslash, double quote and newline), so any place or sink key is a valid label."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{{name}="{escaped}"}}'
