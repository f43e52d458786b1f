"""A flow registered outside the package — tests/flows/toy_flow.py, its card toy.yaml beside it —
goes through the same harness and counts as the built-in flows, `flowbench models` and a sweep,
with nothing changed outside that module: ``FLOWBENCH_PLUGINS`` names it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flowbench
from flowbench.flows import registry
from flowbench.results.tables import read_table
from tests.flows import test_models, test_param_counts

TOY = Path(__file__).with_name("toy_flow.py")


@pytest.fixture
def toy_plugin(monkeypatch, isolated_registry):
    """The toy, through the variable a user sets."""
    monkeypatch.setenv("FLOWBENCH_PLUGINS", str(TOY))


def test_the_plugin_registers_after_the_built_in_flows(toy_plugin):
    assert flowbench.list_models() == [
        "realnvp",
        "glow",
        "emerging",
        "periodic",
        "convexp",
        "me_woodbury",
        "woodbury",
        "cinc",
        "nxn_shift",
        "butterfly",
        "finc",
        "toy",
    ]
    assert registry.model_entry("toy").builder.__module__ == "flowbench_plugin_toy_flow"


def test_the_generic_model_tests_pass_on_the_plugin(toy_plugin):
    test_models.test_registered_tiny_config_is_small_and_accepted("toy")
    for shape in [(2, 4, 4), (3, 8, 8)]:
        test_models.test_model_passes_harness("toy", shape)
    test_models.test_every_layer_inside_the_model_passes_harness("toy")
    test_models.test_log_prob_sample_and_bits_per_dim("toy")
    test_param_counts.test_counted_entries_are_exactly_those_that_change_the_map("toy", {})


def test_flowbench_models_lists_the_plugin_with_its_card(tmp_path):
    env = os.environ | {"FLOWBENCH_PLUGINS": str(TOY)}
    cli = shutil.which("flowbench", path=str(Path(sys.executable).parent))
    out = subprocess.run(
        [cli, "models", "--dataset", "digits", "--image-shape", "1x8x8"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    toy_row = next(line for line in out.splitlines() if line.startswith("toy "))
    assert "depth=2 levels=2" in toy_row and "a test of flowbench's plugin registry" in toy_row  # from toy.yaml
    assert "glow" in out


@pytest.mark.slow
def test_a_sweep_runs_the_plugin_in_ray_workers(tmp_path, monkeypatch, toy_plugin):
    import ray

    from flowbench.sweep.driver import run_sweep
    from flowbench.sweep.experiment import start_ray

    assert not ray.is_initialized(), "another test left Ray running"
    spec = tmp_path / "toy.yaml"
    spec.write_text("""\
name: toy-sweep
models: [toy]
datasets: [digits]
seeds: [0]
budget: {steps: 4}
train: {batch_size: 32, evaluations: 2}
latency: {batch_sizes: [1, 4], rounds: 2, warmup: 1}
""")
    monkeypatch.chdir(tmp_path)  # the plugin path reaches the workers made absolute
    start_ray(None, num_cpus=2)
    try:
        assert ray.get_runtime_context().runtime_env["env_vars"] == {"FLOWBENCH_PLUGINS": str(TOY)}
        run_sweep(spec, tmp_path / "results")
    finally:
        ray.shutdown()
    trials = read_table(tmp_path / "results" / "toy-sweep" / "trials.parquet", "trials")
    assert trials.model.tolist() == ["toy"] and trials.status.tolist() == ["ok"], trials.reason.tolist()
    assert trials.steps.tolist() == [4] and trials.test_bpd.between(0, 16).all()
