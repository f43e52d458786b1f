"""The type check (mypy, configured in pyproject.toml) as a test: it runs beside the other tests on one of
pytest-xdist's workers, where it used to run before them on one core (23 s of CI's clean-clone run)."""

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flowbench_type_checks():
    out, err, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            str(ROOT / "flowbench"),
        ]
    )
    assert status == 0, out + err
