"""Every command the README and docs/ give a user is run by a test: each one is listed here with the test
that runs it, and a command added to the docs without a test, or a test that no longer exists, fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# the tests that run documented commands
REPRODUCE = "tests/test_reproduce.py::test_a_committed_reference_run_comes_out_again"
CI_COMMAND = "tests/test_cluster_yaml.py::test_ci_runs_exactly_the_readmes_test_command"
TRAIN = "tests/test_cli.py::test_train_writes_its_outputs_and_a_rerun_resumes"
PLAN = "tests/sweep/test_cost.py::test_the_table2_plan_prints_its_flops_and_gpu_hours_without_any_data"
REPORT = "tests/results/test_report.py::test_parquet_to_report_round_trip"
PREPARE = "tests/data/test_cache.py::test_data_prepare_cli_writes_a_cache_a_trial_root_may_name"
MODELS = "tests/test_cli.py::test_models_lists_the_registry_with_parameter_counts"

# a documented command (a regular expression over the line as written) -> the test that runs it,
# as "file::test" (the test runs that command, or the same with the test's own folders and sizes)
RUN_BY = {
    r"python3 -m venv .* && \.venv/bin/flowbench sweep sweeps/table2-cpu\.yaml": REPRODUCE,
    r"python3 -m venv .* && \.venv/bin/python -m pytest": CI_COMMAND,
    r"flowbench models": MODELS,
    r"flowbench train --model glow .*": TRAIN,
    r"flowbench sample .*": TRAIN,
    r"flowbench sweep sweeps/table2\.yaml --dry-run": PLAN,
    r"flowbench sweep sweeps/table2-cpu\.yaml( && .*)?": REPRODUCE,
    r"rm -r results/table2-cpu results/ablations results/search-cpu": REPRODUCE,
    r"flowbench report results/table2(-cpu)?": REPORT,
    r"flowbench latency results/table2-cpu": "tests/sweep/test_runner.py::test_sweep_end_to_end_rerun_and_card_change",
    r"ray (up -y|dashboard|exec|rsync-down|down -y) cluster-onprem\.yaml.*": "tests/sweep/test_ray_up.py::onprem",
    r"ray job submit .* --storage /shared/flowbench .*": "tests/sweep/test_ray_up.py::onprem",
    r"sbatch .* cluster-slurm\.sbatch .*": "tests/sweep/test_slurm.py::slurm",
    r"scancel --batch --signal=TERM JOBID": "tests/sweep/test_slurm.py::slurm",
    r"ray (up -y|dashboard|exec|rsync-down|down -y) cluster\.yaml.*": "tests/sweep/test_ray_aws.py::aws",
    r"ray job submit .* --storage s3://your-bucket/flowbench .*": "tests/sweep/test_ray_aws.py::aws",
    r"flowbench data prepare .*": PREPARE,
    r"flowbench sweep sweeps/table2\.yaml --address auto & pid=\$!": "tests/sweep/test_slurm.py::slurm",
    r"trap 'kill -TERM \$pid' TERM": "tests/sweep/test_slurm.py::slurm",
    r"wait \$pid; wait \$pid": "tests/sweep/test_slurm.py::slurm",
}


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block, continuations joined and
    trailing comments dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    found.append((page.name, re.sub(r"\s+", " ", command)))
    return found


def test_every_documented_command_is_run_by_a_test():
    commands = documented_commands()
    assert len(commands) > 20  # the README's and the docs' commands were found
    unmatched = [(page, c) for page, c in commands if not any(re.fullmatch(p, c) for p in RUN_BY)]
    assert unmatched == [], "add each to RUN_BY with the test that runs it (or a test that does)"
    unused = [p for p in RUN_BY if not any(re.fullmatch(p, c) for _, c in commands)]
    assert unused == [], "these commands are no longer documented: drop them from RUN_BY"


@pytest.mark.parametrize("where", sorted(set(RUN_BY.values())))
def test_the_test_that_runs_a_documented_command_exists(where):
    """``file::name``: the file holds a test or a module fixture of that name (the fixture is where a
    launcher test's session types the commands)."""
    path, name = where.split("::")
    source = (ROOT / path).read_text()
    assert re.search(rf"^def {re.escape(name)}\(", source, re.M), where


def test_the_version_command_runs_as_documented():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "flowbench.cli", "--version"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.startswith("flowbench ") and " torch " in out
