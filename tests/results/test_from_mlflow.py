"""A trial logged into a real sqlite MLflow store by the record's declarations reads back to the identical row."""

import json
import math

import pandas as pd
import pytest

from flowbench import FlowbenchError
from flowbench.record import FINAL_PREFIX, METRIC, PARAM, RECORD_COLUMNS, TAG, TrialRecord, columns
from flowbench.results.from_mlflow import PARENT_TAG, tables_from_mlflow
from flowbench.results.tables import CURVE_METRICS, read_table, write_table


def a_record() -> TrialRecord:
    """Every column away from its default, one metric NaN (a figure not measured)."""
    return TrialRecord(
        sweep="e",
        trial_id="glow-cifar10-seed3",
        model="glow",
        dataset="cifar10",
        seed=3,
        config_hash="c0ffee",
        variant="actnorm=false,learned_prior=true",
        hparams=json.dumps({"depth": 4, "levels": 2}),
        recipe=json.dumps({"optimizer": "adam", "source": "openai/glow train.py"}),
        budget_kind="flops",
        budget=1.5e12,
        batch_size=64,
        lr=1e-3,
        steps=120,
        epochs=1.25,
        images_seen=7680,
        train_seconds=61.5,
        wall_seconds=70.25,
        flops_per_image=2.0e8,
        train_flops=1.536e12,
        val_bpd=3.456789,
        test_bpd=3.5,
        train_bpd=3.4,
        selected_step=100,
        num_params=123456,
        num_params_allocated=130000,
        throughput_images_per_s=125.0,
        peak_memory_mb=math.nan,
        status="ok",
        reason="",
        phase="final",
        workers=2,
        memory_kind="rss",
        device="cpu",
        node="node-a",
        hostname="host-a",
        torch_version="2.13.0",
        flowbench_version="0.1.0",
        git_commit="abcdef",
        finished_at="2026-11-25T03:00:00",
    )


def log_like_the_sweep(client, experiment_id: str, parent: str, row: dict, curve: list[dict]) -> None:
    """The declarations: params str(value), metrics final_<name>, tags str(value); a child of the sweep run."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, tags={PARENT_TAG: parent}, run_name=row["trial_id"]).info.run_id
    client.log_batch(
        run,
        params=[Param(name, str(row[name])) for name in columns(PARAM)],
        metrics=[Metric(FINAL_PREFIX + name, float(row[name]), 0, 0) for name in columns(METRIC)]
        + [Metric(name, point[name], 0, point["step"]) for point in curve for name in CURVE_METRICS],
        tags=[RunTag(name, str(row[name])) for name in columns(TAG)],
    )


def test_a_logged_record_reads_back_to_the_identical_row(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="sweep:e").info.run_id
    record = a_record()
    curve = [
        {
            "step": s,
            "val_bpd": 4.0 - s / 100,
            "train_bpd": 4.1 - s / 100,
            "lr": 1e-3,
            "train_seconds": s / 2,
            "train_flops": s * 1.28e10,
            "images_seen": 64 * s,
            "epochs": s / 96,
            "milestone": s // 50,
            "budget_fraction": s / 100,
        }
        for s in (50, 100)
    ]
    log_like_the_sweep(client, experiment, parent, record.row(), curve)

    trials, curves = tables_from_mlflow(uri, "e")
    expected = pd.DataFrame([record.row()], columns=RECORD_COLUMNS)
    pd.testing.assert_frame_equal(trials, expected)
    # the rebuilt table is a trials table as the sweep writes it: same columns, same order, same types
    write_table(trials, tmp_path / "trials.parquet", "trials")
    pd.testing.assert_frame_equal(read_table(tmp_path / "trials.parquet", "trials"), expected)
    assert curves.step.tolist() == [50, 100] and curves.val_bpd.tolist() == [3.5, 3.0]
    assert curves.images_seen.tolist() == [3200, 6400] and set(curves.variant) == {record.variant}
    assert curves.milestone.tolist() == [1, 2] and curves.budget_fraction.tolist() == [0.5, 1.0]

    # in the same store (one store per test keeps it fast): what a user can get wrong
    client.create_experiment("empty", artifact_location=(tmp_path / "artifacts").as_uri())
    with pytest.raises(FlowbenchError, match="has no trial runs yet"):
        tables_from_mlflow(uri, "empty")
    with pytest.raises(FlowbenchError, match="no experiment 'other'"):
        tables_from_mlflow(uri, "other")
