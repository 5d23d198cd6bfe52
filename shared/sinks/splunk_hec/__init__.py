"""``splunk_hec``: events to Splunk's HTTP Event Collector; queries through the search API.

The sink is built in layers, each with its contract in its module docstring:

- ``options``: ``HecOptions``, every option of the section (the configuration reference);
- ``channel``: ``HecChannel``, the requests session, the token, the ledger of delivered
  ids, and the one mapping of HEC's answers through ``dicomsync.http_errors``;
- ``search``: ``HecSearch``, ``query`` through Splunk's search REST API (``SearchUrl``);
- ``sink``: ``SplunkHec`` (the registered class): batches, partial rejections
  (``SendResult.rejected``) and the pipelined indexer acknowledgements.

``Retries``, ``BackoffSeconds`` and ``MaxBackoffSeconds`` are accepted and ignored
(deprecated, with one warning): the sink does not retry. A transient failure raises
``SinkRetryable`` at once and the caller retries in one layer with
``dicomsync.queue.base.RetryPolicy`` (the plugin's queue; ``dicomsync index``).
"""

from dicomsync.sinks.splunk_hec.channel import ACK_PATH, EVENT_PATH, MAX_ANSWER_BYTES, HecChannel
from dicomsync.sinks.splunk_hec.options import DEPRECATED, HecOptions
from dicomsync.sinks.splunk_hec.search import HecSearch
from dicomsync.sinks.splunk_hec.sink import ACK_DISABLED, REJECT_CODES, SplunkHec

__all__ = [
    "ACK_DISABLED",
    "ACK_PATH",
    "DEPRECATED",
    "EVENT_PATH",
    "MAX_ANSWER_BYTES",
    "REJECT_CODES",
    "HecChannel",
    "HecOptions",
    "HecSearch",
    "SplunkHec",
]
