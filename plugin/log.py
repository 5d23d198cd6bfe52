"""Forward Python logging to Orthanc's log (``orthanc.LogInfo/LogWarning/LogError``).

Only the plugin's entry point installs this handler. ``LogInfo`` lines appear
when Orthanc runs with ``--verbose`` (or ``--verbose-plugins``). Messages are escaped
(``dicomsync.printable.PrintableFormatter``): a study name holding a newline or a
terminal escape cannot forge a line of Orthanc's log.
"""

from __future__ import annotations

import logging

import orthanc

from dicomsync.printable import PrintableFormatter

PREFIX = "dicomsync"


class OrthancLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                orthanc.LogError(text)
            elif record.levelno >= logging.WARNING:
                orthanc.LogWarning(text)
            else:
                orthanc.LogInfo(text)
        except Exception:  # logging must never raise into Orthanc
            self.handleError(record)


def install(level: int = logging.INFO) -> logging.Logger:
    """Attach the handler to the ``dicomsync`` logger (once)."""
    logger = logging.getLogger(PREFIX)
    if not any(isinstance(h, OrthancLogHandler) for h in logger.handlers):
        handler = OrthancLogHandler()
        handler.setFormatter(PrintableFormatter(f"{PREFIX}: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger
