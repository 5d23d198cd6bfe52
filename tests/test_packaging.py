"""The one-package layout: dicomsync over shared/, cli/, plugin/, and the core never imports orthanc."""

from __future__ import annotations

import ast
import importlib.metadata
import site
import sys
from pathlib import Path

from orthanc_server import REPO_ROOT


def test_nothing_generic_at_the_top_of_site_packages() -> None:
    for base in {*site.getsitepackages(), str(Path(sys.prefix) / "lib")}:
        for name in ("shared", "cli", "plugin"):
            assert not (Path(base) / name).exists(), f"{name} landed in {base}"
    dist = importlib.metadata.distribution("dicomsync")
    tops = (dist.read_text("top_level.txt") or "").split()
    assert set(tops) <= {"dicomsync"}


def test_packages_map_to_the_card_folders() -> None:
    import dicomsync
    import dicomsync.cli
    import dicomsync.places

    assert Path(dicomsync.__file__).parent == REPO_ROOT / "shared"
    assert Path(dicomsync.cli.__file__).parent == REPO_ROOT / "cli"
    assert Path(dicomsync.places.__file__).parent == REPO_ROOT / "shared" / "places"


def test_core_and_cli_never_import_orthanc() -> None:
    offenders = []
    for folder in ("shared", "cli"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "orthanc" or n.startswith("orthanc.") for n in names):
                    offenders.append(str(path.relative_to(REPO_ROOT)))
    assert not offenders


PLUGIN_LINES = 250  # issue 10: plugin/ is only the callbacks, register() and the transport
MODULE_LINES = 450  # issue 10: no module of the core or the CLI grows into a god object


def test_the_plugin_glue_stays_thin_and_no_module_grows_past_its_limit() -> None:
    def lines(path: Path) -> int:
        return len(path.read_text(encoding="utf-8").splitlines())

    plugin = sum(lines(p) for p in (REPO_ROOT / "plugin").rglob("*.py"))
    assert plugin <= PLUGIN_LINES, f"plugin/ has {plugin} lines"
    big = {
        str(p.relative_to(REPO_ROOT)): lines(p)
        for folder in ("shared", "cli")
        for p in (REPO_ROOT / folder).rglob("*.py")
        if lines(p) > MODULE_LINES
    }
    assert not big, big
