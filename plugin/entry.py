"""The script Orthanc loads: ``"PythonScript": "/path/to/dicomsync/plugin/entry.py"``.

orthanc-python runs this file inside Orthanc's embedded interpreter (Debian's
python3.11), with this folder first on ``sys.path`` and Debian's dist-packages
last. Before importing dicomsync it:

1. finds the project's venv: ``$DICOMSYNC_VENV``, else ``<repo>/.venv``;
2. ``site.addsitedir`` on its site-packages (this runs the ``.pth`` files, which
   is how the editable install is found) and moves the added entries to the
   front of ``sys.path``, so the venv's pydicom/requests win over Debian's;
3. without a venv (e.g. a container with the dependencies installed system-wide),
   maps the ``dicomsync`` package onto the repo folders itself;
4. drops this folder from ``sys.path`` (its modules belong to ``dicomsync.plugin``).

Then ``dicomsync.plugin.glue.register()`` installs the callbacks.
"""

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
    return (
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )


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
