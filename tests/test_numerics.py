"""What a record says its numbers depend on, and the portable mode's refusal when not in effect."""

import json
import os
import subprocess
import sys

import pytest
import torch

import flowbench.numerics
from flowbench.errors import FlowbenchError
from flowbench.numerics import PORTABLE_ENV, check_in_effect
from flowbench.trial import TrialConfig, run_trial

TINY = dict(model="glow", dataset="digits", hparams=dict(depth=2, levels=2, hidden_channels=8), batch_size=16)
TINY_CLI = ["--hparam", "depth=2", "--hparam", "levels=2", "--hparam", "hidden_channels=8", "--batch-size", "16"]


def test_a_record_names_what_its_numbers_depend_on(tmp_path):
    record = run_trial(TrialConfig(**TINY, budget=2, evaluations=1, out_dir=str(tmp_path)))
    assert record.numerics == "native"
    assert record.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert record.threads == torch.get_num_threads()
    assert record.math_libraries.startswith("MKL ") and "oneDNN v" in record.math_libraries
    flags = open("/proc/cpuinfo").read()
    assert ("avx2" in record.cpu) == (" avx2 " in flags)
    assert record.gpu == ""  # trained on the CPU


def test_portable_numerics_on_a_cpu_without_avx2_is_refused_in_one_line(monkeypatch):
    # oneDNN would fall back to its SSE4.1 kernels there: other bits, silently
    monkeypatch.setattr(flowbench.numerics, "cpu_model_and_flags", lambda: ("Old CPU", frozenset({"sse4_1"})))
    with pytest.raises(FlowbenchError, match=r"^numerics: portable needs a CPU with AVX2 .*this one is Old CPU: "):
        check_in_effect("portable")
    check_in_effect("native")


def test_portable_numerics_in_a_process_started_without_them_is_one_line(tmp_path):
    if any(os.environ.get(k) == v for k, v in PORTABLE_ENV.items()):
        pytest.skip("this process runs with the portable environment")
    with pytest.raises(FlowbenchError, match=r"^numerics: portable asked for, but this process runs ATen's \w+"):
        check_in_effect("portable")
    assert TrialConfig(**TINY).config_hash() != TrialConfig(**TINY, numerics="portable").config_hash()


def test_flowbench_train_in_portable_numerics_runs_the_portable_kernels_on_one_thread(tmp_path):
    """The CLI sets the environment before torch computes anything: the record shows it in effect."""
    out = tmp_path / "run"
    argv = ["train", "--model", "glow", "--dataset", "digits", "--budget-steps", "2", "--evaluations", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "flowbench.cli", *argv, *TINY_CLI, "--numerics", "portable", "--out", str(out)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in PORTABLE_ENV},
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "record.json").read_text())
    assert (record["numerics"], record["cpu_capability"], record["threads"]) == ("portable", "DEFAULT", 1)
