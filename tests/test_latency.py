"""Latency timing (flowbench.trial.latency): models side by side in interleaved rounds, in a process
of native numerics whatever the caller's environment, from a trial's selected weights or, where they
are gone, from the recorded architecture."""

import json
import os

import pytest
import torch

import flowbench
from flowbench.numerics import PORTABLE_ENV
from flowbench.trial.checkpoints import save_checkpoint
from flowbench.trial.latency import INITIAL_WEIGHTS, time_in_native_process, time_models

TINY = {"depth": 1, "levels": 2, "hidden_channels": 4}
SHAPE = (1, 8, 8)


def job(tmp_path, **extra) -> dict:
    """Glow from its saved weights beside n×n from its architecture alone, two batch sizes."""
    glow = flowbench.build_model("glow", SHAPE, **TINY)
    state = {"model": glow.state_dict(), "config": {"model": "glow", "hparams": TINY}, "image_shape": list(SHAPE)}
    save_checkpoint(tmp_path / "glow.pt", state)
    items = [
        {"trial_id": "glow-seed0", "model": "glow", "hparams": json.dumps(TINY), "weights": str(tmp_path / "glow.pt")},
        {"trial_id": "nxn-seed0", "model": "nxn_shift", "hparams": json.dumps(TINY), "image_shape": list(SHAPE)},
    ]
    return {"items": items, "device": "cpu", "batch_sizes": [1, 3], "rounds": 3, "warmup": 1, "threads": 1} | extra


def test_every_item_kind_and_batch_gets_its_rounds_and_says_what_it_timed(tmp_path):
    rows = time_models(job(tmp_path))
    assert [(r["trial_id"], r["kind"], r["batch_size"]) for r in rows] == [
        (t, k, b) for t in ("glow-seed0", "nxn-seed0") for b in (1, 3) for k in ("density", "sampling")
    ]
    for row in rows:
        assert len(row["times_ms"]) == row["rounds"] == 3 and row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["median_ms"] * 1e3)
        assert row["device"].startswith("cpu: ") and row["device"].endswith(", 1 thread") and row["threads"] == 1
        assert row["started_at"] <= row["ended_at"] and row["torch_version"] == torch.__version__
    assert {r["trial_id"]: r["weights"] for r in rows} == {"glow-seed0": "selected", "nxn-seed0": INITIAL_WEIGHTS}


def test_the_timing_process_runs_native_numerics_whatever_the_callers_environment(tmp_path, monkeypatch):
    """A portable sweep's Ray worker carries ATen's baseline kernels in its environment; its timing
    process must not (nobody runs inference that way)."""
    for key, value in PORTABLE_ENV.items():
        monkeypatch.setenv(key, value)
    rows = time_in_native_process(job(tmp_path, rounds=2, batch_sizes=[1]))
    native = torch.backends.cpu.get_cpu_capability()  # this pytest process started without the variables
    assert native != "DEFAULT" and "ATEN_CPU_CAPABILITY" in os.environ
    assert {r["cpu_capability"] for r in rows} == {native}


def test_a_corrupted_weights_file_fails_in_one_line(tmp_path):
    broken = job(tmp_path)
    (tmp_path / "glow.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(flowbench.FlowbenchError, match=r"^latency timing failed: flowbench: .*glow.pt: corrupted"):
        time_in_native_process(broken)
