"""The script Orthanc loads (``"PythonScript": ".../plugin/entry.py"``), in its embedded
interpreter with this folder first on ``sys.path``. It puts the project's venv
(``$DICOMSYNC_VENV``, else ``<repo>/.venv``) first on ``sys.path`` (its ``.pth`` files find
the editable install, and its pydicom/requests win over Debian's); without a venv it maps
``dicomsync`` onto the repo folders; it drops this folder from ``sys.path``; then
``glue.register()``."""

from __future__ import annotations

import importlib.util
import os
import site
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGES = {"dicomsync": "shared", "dicomsync.cli": "cli", "dicomsync.plugin": "plugin"}


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _use_venv() -> bool:
    venv = Path(os.environ.get("DICOMSYNC_VENV") or REPO / ".venv")
    packages = _site_packages(venv)
    if not packages.is_dir():
        return False
    before = list(sys.path)
    site.addsitedir(str(packages))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before
    return True


def _map_repo() -> None:
    """Import ``dicomsync`` straight from the repo folders (no installed distribution)."""
    for name, folder in PACKAGES.items():
        path = REPO / folder
        if name in sys.modules or not (path / "__init__.py").is_file():
            continue  # e.g. cli/ is not mounted into containers
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot map {name} onto {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def bootstrap() -> None:
    have_venv = _use_venv()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    try:
        importlib.import_module("dicomsync")
    except ImportError:
        if have_venv:
            raise
        _map_repo()


bootstrap()

from dicomsync.plugin import glue  # noqa: E402

glue.register()
