#!/usr/bin/env bash
# `make run`: Orthanc with the dicomsync plugin, configured by ./orthanc.json.
# Relative paths in orthanc.json are relative to its folder (the repo root): storage in
# ./var/orthanc, the queue in ./var/dicomsync, routed studies in ./var/zips.
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHANC=${ORTHANC_BIN:-/usr/sbin/Orthanc}
mkdir -p var/orthanc var/dicomsync var/zips
echo "Orthanc + dicomsync: http://127.0.0.1:8042 (DICOM port 4242, AET DICOMSYNC)"
echo "Upload:  curl -X POST http://127.0.0.1:8042/instances --data-binary @file.dcm"
echo "Status:  curl http://127.0.0.1:8042/dicomsync/status    Zips: ./var/zips"
# --verbose-plugins shows dicomsync's info lines; add --verbose for all of Orthanc's.
exec "$ORTHANC" --verbose-plugins "$@" orthanc.json
