"""Python logging into Orthanc's log (``orthanc.LogInfo/LogWarning/LogError``; info lines
show with ``--verbose``), escaped by ``dicomsync.printable.PrintableFormatter`` so no study
name can forge a line. Only the plugin's entry point installs it."""

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
        logger.addHandler(OrthancLogHandler())
        logger.handlers[-1].setFormatter(PrintableFormatter(f"{PREFIX}: %(message)s"))
    logger.setLevel(level)
    return logger
