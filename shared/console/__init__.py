"""The console: HTML pages under ``/dicomsync/ui/`` served by the plugin's REST callback.

- ``pages.py``: how a page plugs in (``PAGES``, ``PageContext``, ``View``), the
  cross-site guard of the console's POSTs, the security headers;
- ``html.py``: escaping, tables, Chart.js charts, the layout (also standalone files);
- ``assets.py``: the static files (ours, and Debian's Chart.js; never a CDN);
- ``throughput.py``: per-minute counts of finished instances, sampled by the metrics
  thread from ``Queue.stats()``;
- ``overview.py``, ``jobs.py``: the overview and jobs pages; ``dose*.py``: the dose page.

Nothing here imports ``orthanc``; the pages read the ``Service``'s units.
"""
