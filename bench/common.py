"""Helpers for benchmarks: generated data, real Orthanc servers, timing, curl uploads."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dicomdata import generate_root, make_instance  # noqa: E402,F401
from orthanc_server import OrthancProcess as _TestOrthanc  # noqa: E402


@dataclass
class OrthancProcess(_TestOrthanc):
    """A test Orthanc that never runs ``--verbose`` (the tests turn it on with the plugin):
    its per-request log lines cost a few percent of ingest and would bias every
    plugin-on/plugin-off comparison."""

    verbose: bool | None = False


@contextmanager
def timed(label: str, results: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start


def workdir(name: str) -> Path:
    """The benchmark's folder: ``$DICOMSYNC_BENCH_DIR`` (kept), else a temporary one that
    is removed when the benchmark ends (runs write several GB of Orthanc storage)."""
    explicit = os.environ.get("DICOMSYNC_BENCH_DIR")
    base = Path(explicit or tempfile.mkdtemp(prefix=f"dicomsync-{name}-"))
    base.mkdir(parents=True, exist_ok=True)
    if not explicit:
        atexit.register(shutil.rmtree, base, True)
    os.environ.setdefault("DICOMSYNC_CACHE_DIR", str(base / "cache"))
    return base


def curl_upload(url: str, files: list[Path]) -> float:
    """Upload files with ONE keep-alive curl process; returns seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as cfg:
        for i, f in enumerate(files):
            if i:
                cfg.write("next\n")
            cfg.write(f'url = "{url}/instances"\n')
            cfg.write(f'data-binary = "@{f}"\n')
            cfg.write('header = "Expect:"\nheader = "Content-Type: application/dicom"\n')
            cfg.write('output = "/dev/null"\nsilent\nfail\n')
    start = time.perf_counter()
    subprocess.run(["curl", "-K", cfg.name], check=True)
    seconds = time.perf_counter() - start
    os.unlink(cfg.name)
    return seconds


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n## {title}")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
