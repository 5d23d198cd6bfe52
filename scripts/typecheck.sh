#!/usr/bin/env bash
# mypy cannot follow setuptools' editable finder, which maps dicomsync over shared/, cli/
# and plugin/. Lay the same package out as symlinks under build/typecheck and check that;
# then tests/ and bench/ with the same settings ([tool.mypy] in pyproject.toml). Their
# modules import each other as top-level modules (tests/ and bench/ are on sys.path when
# they run), so both folders are on MYPYPATH and name their modules from there.
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
status=0
MYPYPATH=build/typecheck .venv/bin/mypy -p dicomsync "$@" || status=$?
MYPYPATH=build/typecheck:tests:bench .venv/bin/mypy --explicit-package-bases tests bench "$@" \
  || status=$?
exit "$status"
