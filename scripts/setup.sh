#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine:
#   1. the Debian packages (root or sudo), when missing: orthanc and its python, dicomweb and
#      postgresql plugins; postgresql (tests run their own cluster; a shared queue for several
#      nodes); chromium and its driver (the console's browser tests); chart.js (the console's
#      charts, served by the plugin);
#   2. .venv from Debian's python3.11, the interpreter the Orthanc Python plugin embeds;
#   3. the project in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_SYSTEM=${PY_SYSTEM:-/usr/bin/python3.11}
VENV=${VENV:-.venv}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "setup: need root or sudo to run: $*" >&2; exit 1; fi
}

need=()
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancPython.so ] || need+=(orthanc-python)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -f /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ] || need+=(orthanc-postgresql)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ -f /usr/share/javascript/chart.js/chart.umd.js ] || [ -f /usr/share/javascript/chart.js/chart.min.js ] || need+=(libjs-chart.js)
[ -x "$PY_SYSTEM" ] || need+=(python3.11)
"$PY_SYSTEM" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3.11-venv)
command -v dcmdump >/dev/null || need+=(dcmtk)      # tests read reference values with dcmdump
command -v openssl >/dev/null || need+=(openssl)    # TLS tests make a throw-away certificate
command -v curl >/dev/null || need+=(curl)          # benchmarks compare against curl
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV from $PY_SYSTEM"
  "$PY_SYSTEM" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "setup: ready ($("$VENV/bin/python" --version), $(/usr/sbin/Orthanc --version 2>/dev/null | head -1))"
