#!/usr/bin/env bash
# mypy cannot follow setuptools' editable finder, which maps dicomsync over shared/, cli/
# and plugin/. Lay the same package out as symlinks under build/typecheck and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
farm=build/typecheck/dicomsync
rm -rf build/typecheck
mkdir -p "$farm"
for entry in shared/*; do
  ln -s "../../../$entry" "$farm/$(basename "$entry")"
done
ln -s ../../../cli "$farm/cli"
ln -s ../../../plugin "$farm/plugin"
MYPYPATH=build/typecheck exec .venv/bin/mypy -p dicomsync "$@"
