"""Flattening benchmark (issue 4): dose reports turned into events per second, one core.

Every RDSR of the shared test data (``rdsr/`` and ``study_petct_siemens/``) is read
from memory and turned into all its events (instance tags, dose summary, per-event
records) with ``dicomsync.tags.events_from_bytes``, repeatedly, for a few seconds.
Also reports the pydicom-only reference path (no lite sequence reader) for scale.
Target: >= 200 RDSRs/s.

Run: ``.venv/bin/python bench/bench_flatten.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from dicomsync.tags import events_from_bytes, read_dataset, sr
from dicomsync.tags.lite import reader_for

from common import report

SECONDS = 3.0


def dose_files() -> list[Path]:
    from dicomdata import data_dir

    base = data_dir()
    files = sorted((base / "rdsr").glob("*.dcm")) + sorted(
        (base / "study_petct_siemens").glob("*.dcm")
    )
    return [f for f in files if "PetIm" not in f.name]


def rate(fn, blobs: list[bytes]) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    n = 0
    events = 0
    start = time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        for blob in blobs:
            events += fn(blob)
            n += 1
    return n / (time.perf_counter() - start), events // max(n, 1)


def main() -> None:
    blobs = [f.read_bytes() for f in dose_files()]
    full, per = rate(lambda b: len(events_from_bytes(b)), blobs)

    def reference(b: bytes) -> int:
        ds = read_dataset(b)
        sr.flatten(ds, flattener=sr.Flattener(False, reader_for(ds, lite=False)))
        return 1

    ref, _ = rate(reference, blobs)
    report(
        f"Flattening ({len(blobs)} vendor RDSRs, one core, {SECONDS:.0f}s each)",
        [
            (
                "events_from_bytes (all events)",
                f"{full:7.1f} RDSRs/s  (target >= 200; {per} events/RDSR avg)",
            ),
            (
                "flatten via pydicom sequences",
                f"{ref:7.1f} RDSRs/s  (reference path, summary only)",
            ),
        ],
    )


if __name__ == "__main__":
    main()
