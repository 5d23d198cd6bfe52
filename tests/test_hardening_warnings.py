"""pyproject's pytest ``filterwarnings``: a warning from a dicomsync module is an error.

Python names a warning after the module of the code that raised it (``stacklevel`` 1) or
of its caller: code whose globals say ``__name__ == "dicomsync.…"`` is a dicomsync
module. Third-party warnings raised inside third-party code stay warnings. The checks
run under the suite's own configuration (the filters pytest applies to every test), and
once more in a fresh pytest process over a test file of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from orthanc_server import REPO_ROOT

_SOURCE = """
import warnings

def warn(category):
    warnings.warn("from a dicomsync module", category)
"""


def _warner(module: str) -> Callable[[type[Warning]], None]:
    """``warn(category)`` defined in a module named ``module``, as its code would be."""
    namespace: dict[str, object] = {"__name__": module}
    exec(compile(_SOURCE, f"<{module}>", "exec"), namespace)
    warn = namespace["warn"]
    assert callable(warn)
    return warn


@pytest.mark.parametrize("module", ["dicomsync", "dicomsync.identity", "dicomsync.cli.main"])
@pytest.mark.parametrize("category", [UserWarning, DeprecationWarning, RuntimeWarning])
def test_a_warning_from_a_dicomsync_module_is_an_error(
    module: str, category: type[Warning]
) -> None:
    with pytest.raises(category, match="from a dicomsync module"):
        _warner(module)(category)


@pytest.mark.parametrize("module", ["pydicom.config", "requests", "dicomsyncx", "xdicomsync"])
def test_a_third_party_warning_stays_a_warning(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        _warner(module)(DeprecationWarning)
    assert [str(w.message) for w in caught] == ["from a dicomsync module"]


def test_a_fresh_pytest_run_fails_on_a_dicomsync_warning(tmp_path: Path) -> None:
    """The same filters from pyproject.toml, in a pytest process of its own."""
    test = tmp_path / "test_sample.py"
    test.write_text(
        textwrap.dedent(
            f"""
            _SOURCE = {_SOURCE!r}

            def warner(module):
                namespace = {{"__name__": module}}
                exec(compile(_SOURCE, module, "exec"), namespace)
                return namespace["warn"]

            def test_ours():
                warner("dicomsync.transfer")(UserWarning)

            def test_theirs():
                warner("urllib3.util")(UserWarning)
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO_ROOT / "pyproject.toml"),
            "--rootdir",
            ".",
            test.name,
        ],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED test_sample.py::test_ours - UserWarning: from a dicomsync module" in done.stdout
    assert "1 failed, 1 passed, 1 warning" in done.stdout, done.stdout
