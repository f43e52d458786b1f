"""The wheel works anywhere: built from the project, installed into a fresh virtual environment
outside the checkout, it finds its model cards and sweep specs (package data) and trains.

The new environment reuses the packages of the one running the tests (a .pth line pointing at its
site-packages: offline and fast) but not its editable flowbench: flowbench comes from the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None, timeout=600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: setuptools writes build/ and egg-info next to the sources it builds
    src = tmp_path_factory.mktemp("src") / "flowbench"
    anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", "mlflow.db", "mlruns")
    at_top = {".git", ".venv", "build", ".pytest_cache", "results", "runs"}  # flowbench/results is the package's

    def ignore(folder, names):
        return set(anywhere(folder, names)) | (at_top & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: setuptools from this environment, nothing downloaded
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        cwd=dist,
    )
    (built,) = dist.glob("flowbench-*.whl")
    return built


def test_the_wheel_carries_the_model_cards_and_the_sweep_specs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, shipped in (("models", ROOT / "flowbench" / "models"), ("specs", ROOT / "flowbench" / "specs")):
        expected = {f"flowbench/{folder}/{p.name}" for p in shipped.glob("*.yaml")}
        assert expected and expected <= names, expected - names


def test_installed_wheel_lists_models_and_trains_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    (site / "reuse-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # no PYTHONPATH: a checkout on it (its flowbench.egg-info) would make pip skip the wheel as installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLOWBENCH_MODELS_DIR")}
    env |= {"HOME": str(tmp_path), "FLOWBENCH_CACHE_DIR": str(tmp_path / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        [python, "-c", "import flowbench, flowbench.cards as c; print(flowbench.__file__); print(c.cards_dir())"],
        cwd=work,
        env=env,
    ).split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's files, not the checkout's

    flowbench = env_dir / "bin" / "flowbench"
    listing = run([flowbench, "models", "--image-shape", "1x8x8", "--dataset", "digits"], cwd=work, env=env)
    for card in (ROOT / "flowbench" / "models").glob("*.yaml"):
        assert card.stem in listing
    dry = run([flowbench, "sweep", "smoke", "--dry-run"], cwd=work, env=env)  # a shipped spec, by name
    assert "sweep smoke: 4 trials" in dry
    run(
        [
            flowbench,
            "train",
            "--model",
            "glow",
            "--dataset",
            "digits",
            "--budget-steps",
            "4",
            "--evaluations",
            "2",
            "--batch-size",
            "16",
            "--hparam",
            "depth=1",
            "--hparam",
            "levels=1",
            "--hparam",
            "hidden_channels=4",
            "--out",
            work / "run",
        ],
        cwd=work,
        env=env,
    )
    assert (work / "run" / "record.json").is_file() and (work / "run" / "checkpoint").is_dir()
