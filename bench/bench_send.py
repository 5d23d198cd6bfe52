"""Foundation benchmarks (issue: core, CLI parity):

1. ``find`` over a generated dicom_root of 1,000 studies (target < 1 s).
2. A repeat ``send`` of 1,000 already-sent studies, dicom_root->zipped_root and
   dicom_root->orthanc (target < 10 s each).
3. A first send dicom_root->orthanc against a keep-alive curl upload of the same
   files, in the same run (target >= 0.8x curl).

Run: ``.venv/bin/python bench/bench_send.py`` (or ``make bench``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from dicomsync.config import build_place
from dicomsync.places.dicom_root import DicomRoot
from dicomsync.query import StudyQuery
from dicomsync.transfer import send

from common import REPO, OrthancProcess, curl_upload, generate_root, report, workdir

STUDIES = 1000


def cli(config: Path, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "dicomsync"), "--config", str(config), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.perf_counter() - start, out


def main() -> None:
    base = workdir("send")
    root = base / "root"
    if not root.exists():
        print(f"generating {STUDIES} studies in {root} ...", flush=True)
        generate_root(root, STUDIES, instances=2)
    config = base / "dicomsync.json"
    config.unlink(missing_ok=True)
    (base / "zips").mkdir(exist_ok=True)
    subprocess.run(
        [str(REPO / ".venv/bin/dicomsync"), "--config", str(config), "init"],
        check=True,
        capture_output=True,
    )
    cli(config, "place", "add", "dicom_root", "root", str(root))
    cli(config, "place", "add", "zipped_root", "zips", str(base / "zips"))

    rows: list[tuple[str, str]] = []
    src = DicomRoot("root", root)
    start = time.perf_counter()
    n = sum(1 for _ in src.studies(StudyQuery.parse("root:*")))
    rows.append((f"find root:* library call ({n} studies)", f"{time.perf_counter() - start:.3f} s"))
    secs, out = cli(config, "find", "root:*")
    rows.append(("dicomsync find root:* (whole process)", f"{secs:.3f} s  [target < 1 s]"))
    assert out.startswith(f"found {STUDIES}:")

    secs, out = cli(config, "send", "root:*", "zips")
    rows.append(("first send root->zips (1,000 studies, 2,000 files)", f"{secs:.2f} s"))
    secs, out = cli(config, "send", "root:*", "zips")
    assert out.splitlines()[-1].startswith(f"0 sent, {STUDIES} duplicate"), out
    rows.append(("repeat send root->zips (all duplicates)", f"{secs:.2f} s  [target < 10 s]"))

    orthanc = OrthancProcess(base / "orthanc", "bench", config={"StableAge": 3600}).start()
    try:
        cli(config, "place", "add", "orthanc", "pacs", orthanc.url)
        secs, out = cli(config, "send", "root:*", "pacs")
        rows.append(("first send root->orthanc (1,000 small studies)", f"{secs:.2f} s"))
        secs, out = cli(config, "send", "root:*", "pacs")
        assert out.splitlines()[-1].startswith(f"0 sent, {STUDIES} duplicate"), out
        rows.append(
            ("repeat send root->orthanc (all duplicates)", f"{secs:.2f} s  [target < 10 s]")
        )
    finally:
        orthanc.stop()

    # Throughput: 400 instances of ~0.5 MB in 20 studies, curl keep-alive vs dicomsync.
    big = base / "big"
    if not big.exists():
        print("generating 400 instances of 0.5 MB ...", flush=True)
        generate_root(big, 20, instances=20, pixel_bytes=512 * 1024)
    files = sorted(big.rglob("*.dcm"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    orthanc = OrthancProcess(base / "orthanc2", "thru", config={"StableAge": 3600}).start()
    try:
        curl_s = curl_upload(orthanc.url, files)
        for pid in orthanc.get("/patients"):
            import requests

            requests.delete(f"{orthanc.url}/patients/{pid}", timeout=60).raise_for_status()
        source = DicomRoot("big", big)
        dest = build_place("pacs", {"Kind": "orthanc", "Url": orthanc.url}, base)
        start = time.perf_counter()
        summary = send([(source, r) for r in source.studies()], dest)
        ours = time.perf_counter() - start
        assert summary.sent == 20 and summary.instances_sent == len(files), summary.line()
    finally:
        orthanc.stop()
    rows.append(
        (
            f"curl keep-alive upload ({len(files)} files, {mb:.0f} MB)",
            f"{len(files) / curl_s:.0f} instances/s",
        )
    )
    rows.append(("dicomsync first send root->orthanc", f"{len(files) / ours:.0f} instances/s"))
    rows.append(("ratio dicomsync / curl", f"{curl_s / ours:.2f}x  [target >= 0.8x]"))
    report("send benchmarks", rows)


if __name__ == "__main__":
    main()
