"""The options of a ``splunk_hec`` sink section (``HecOptions``, one declarative table).

Config (every option but ``Url`` has a default)::

    "splunk": {
      "Kind": "splunk_hec",
      "Url": "https://splunk.example.org:8088",   // HEC base URL (no user:pass@, see dicomsync.urls)
      "TokenEnv": "SPLUNK_HEC_TOKEN",             // env var holding the HEC token
      "Index": "dicom",                           // omitted: the token's default index
      "Source": "...",                            // omitted: each instance's origin (below)
      "Host": "<this host's name>",
      "Gzip": true,                               // Content-Encoding: gzip
      "BatchEvents": 500, "BatchBytes": 1000000,  // a batch ends at whichever comes first
      "Ack": false,                               // indexer acknowledgement
      "AckTimeoutSeconds": 120, "AckPollSeconds": 0.25, "AckInFlight": 64,
      "TimeoutSeconds": 30,
      "VerifyTls": true, "CaBundle": "/etc/ssl/splunk-ca.pem",
      "StateFile": ".dicomsync/sinks/splunk.ledger.sqlite",
      "SearchUrl": "https://splunk.example.org:8089",   // for replicate --where
      "SearchTokenEnv": "SPLUNK_SEARCH_TOKEN",          // Bearer token, or:
      "SearchUserEnv": "SPLUNK_USER", "SearchPasswordEnv": "SPLUNK_PASSWORD"
    }

``Retries``, ``BackoffSeconds`` and ``MaxBackoffSeconds`` are accepted and ignored
(deprecated, with one warning): the sink does not retry. A transient failure raises
``SinkRetryable`` at once and the caller retries in one layer with
``dicomsync.queue.base.RetryPolicy`` (the plugin's queue; ``dicomsync index``).

Pure declarations: ``dicomsync.options.parse`` validates a section against ``HecOptions``
(raising ``ConfigError`` with one line) and ``SplunkHec.from_config`` builds the sink.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomsync.options import option

DEPRECATED = ("Retries", "BackoffSeconds", "MaxBackoffSeconds")


@dataclass(frozen=True)
class HecOptions:
    """The options of a ``splunk_hec`` sink section."""

    url: str = option("Url", "url", "HEC base URL (`/services/collector/event`)", required=True)
    token_env: str = option(
        "TokenEnv", "envvar", "environment variable with the HEC token", default="SPLUNK_HEC_TOKEN"
    )
    index: str | None = option("Index", "str", "the envelope's `index`", shown="the token's index")
    source: str | None = option(
        "Source",
        "str",
        "the envelope's `source`: one value for every event, instead of each instance's "
        "origin (`orthanc:<instance id>` in the plugin, the file path for `dicomsync index`)",
        shown="the origin",
    )
    host: str | None = option("Host", "str", "the envelope's `host`", shown="host name")
    gzip: bool = option("Gzip", "bool", "gzip request bodies", default=True)
    batch_events: int = option(
        "BatchEvents", "int", "most events in one request", default=500, low=1
    )
    batch_bytes: int = option(
        "BatchBytes", "int", "most bytes in one request", default=1_000_000, low=1024
    )
    ack: bool = option(
        "Ack",
        "bool",
        "indexer acknowledgement: events count as delivered only once acked",
        default=False,
    )
    ack_timeout: float = option(
        "AckTimeoutSeconds",
        "seconds",
        "how long a batch waits for its ack before it is posted again",
        default=120.0,
        above=0,  # 0 would count every batch late at its first poll and post it again
    )
    ack_poll: float = option(
        "AckPollSeconds",
        "seconds",
        "one `/services/collector/ack` request, for every batch in flight, this often",
        default=0.25,
        above=0,
    )
    ack_in_flight: int = option(
        "AckInFlight", "int", "batches that wait for their ack together", default=64, low=1
    )
    timeout: float = option(
        "TimeoutSeconds",
        "seconds",
        "per request",
        default=30.0,
        above=0,  # requests refuses 0
    )
    verify_tls: bool = option("VerifyTls", "bool", "verify TLS certificates", default=True)
    ca_bundle: str | None = option("CaBundle", "path", "CA bundle file to verify with")
    state_file: str | None = option(
        "StateFile",
        "path",
        "the ledger of delivered event ids",
        shown="`.dicomsync/sinks/<key>.ledger.sqlite`",
    )
    search_url: str | None = option(
        "SearchUrl", "url", "Splunk's management URL, for `replicate --where`"
    )
    search_token_env: str | None = option(
        "SearchTokenEnv", "envvar", "environment variable with a search token"
    )
    search_user_env: str | None = option(
        "SearchUserEnv",
        "envvar",
        "environment variable with a search user (with `SearchPasswordEnv`)",
    )
    search_password_env: str | None = option(
        "SearchPasswordEnv", "envvar", "environment variable with that user's password"
    )
