"""The sweep driver: planning and the Tune searcher in isolation (fast), then real Ray Tune
sweeps on a local Ray (loopback only) with tiny budgets, end to end (slow)."""

import json
import logging
import numbers
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Result
from ray.tune.result import AUTO_RESULT_KEYS

from flowbench.record import RECORD_COLUMNS
from flowbench.results.tables import CURVE_METRICS, read_table
from flowbench.sweep.driver import run_sweep
from flowbench.sweep.experiment import start_ray, stored_results
from flowbench.sweep.plan import Unit, plan_sweep, sample_id, trial_of
from flowbench.sweep.records import RecordStore, collect
from flowbench.sweep.search import INTERRUPTED, SweepSearch, tune_config
from flowbench.trial import TrialConfig

TINY = "{depth: 2, levels: 2, hidden_channels: 8}"


def spec_file(
    tmp_path, name, models=("glow", "nxn_shift"), seeds=(0,), steps=20, extra="", overrides=None, budget=None
):
    """A sweep of tiny flows on the digits, ``steps`` steps (an evaluation every 10) or ``budget``."""
    overrides = overrides or {m: TINY for m in models}
    text = (
        f"""\
name: {name}
models: [{", ".join(models)}]
datasets: [digits]
seeds: [{", ".join(map(str, seeds))}]
budget: {budget or f"{{steps: {steps}}}"}
train: {{batch_size: 32, evaluations: {4 if budget else steps // 10}}}
overrides:
"""
        + "\n".join(f"  {m}: {o}" for m, o in overrides.items())
        + """
latency: {batch_sizes: [1, 4], rounds: 2, warmup: 1}
"""
        + textwrap.dedent(extra)
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- planning, no Ray
def test_grid_variants_are_the_product_over_the_models_that_have_each_key(tmp_path):
    spec = spec_file(
        tmp_path,
        "abl",
        models=("glow", "realnvp"),
        seeds=(0, 1),
        extra="""\
        grid: {actnorm: [true, false], learned_prior: [false, true]}
        """,
        overrides={"glow": TINY, "realnvp": "{levels: 2, n_blocks: 1, hidden_channels: 8}"},
    )
    configs = plan_sweep(spec).configs
    # glow has both keys: 2 x 2 variants x 2 seeds; realnvp has neither: its card x 2 seeds
    assert len(configs) == 2 * 2 * 2 + 2
    ids = [c.trial_id for c in configs]
    assert len(set(ids)) == len(ids)
    assert "glow-digits-actnorm=false,learned_prior=true-seed1" in ids and "realnvp-digits-seed0" in ids
    glow = {c.variant for c in configs if c.model == "glow"}
    assert glow == {
        "actnorm=true,learned_prior=false",
        "actnorm=true,learned_prior=true",
        "actnorm=false,learned_prior=false",
        "actnorm=false,learned_prior=true",
    }
    off = next(c for c in configs if c.variant == "actnorm=false,learned_prior=true")
    assert off.hparams["actnorm"] is False and off.hparams["learned_prior"] is True
    assert len({c.config_hash() for c in configs}) == len(configs)


def _units(spec_path):
    planned = plan_sweep(spec_path)
    return planned.spec, planned.units


def test_grid_trials_are_handed_out_longest_first(tmp_path):
    spec = spec_file(
        tmp_path,
        "order",
        models=("glow", "nxn_shift"),
        overrides={"glow": TINY, "nxn_shift": "{depth: 2, levels: 2, hidden_channels: 32}"},
    )
    spec, units = _units(spec)
    search = SweepSearch(spec, units)
    first, second = search.suggest("a"), search.suggest("b")
    assert first["trial_id"].startswith("nxn_shift") and second["trial_id"].startswith("glow")  # wider: longer
    from ray.tune.search import Searcher

    assert search.suggest("c") == Searcher.FINISHED  # a grid sweep has nothing to wait for


def _lr_search(tmp_path, num_samples: int):
    """A search group over the learning rate, glow on the digits, seeds 0 and 1: (spec, its unit)."""
    spec = spec_file(
        tmp_path,
        "s",
        models=("glow",),
        seeds=(0, 1),
        extra=f"""\
        search:
          num_samples: {num_samples}
          space: {{lr: {{loguniform: [1.0e-4, 3.0e-2]}}}}
        """,
    )
    spec, (unit,) = _units(spec)
    return spec, unit


def test_search_samples_then_the_best_on_every_seed(tmp_path):
    spec, unit = _lr_search(tmp_path, 3)
    units = [unit]
    assert unit.search and unit.id == "search-glow-digits" and len(unit.configs) == 2
    search = SweepSearch(spec, units)
    samples = [search.suggest(f"t{i}") for i in range(3)]
    assert [s["phase"] for s in samples] == ["search"] * 3
    # Tune's config names the trial; the trial it runs is the unit's first seed's with the sampled values
    trials = [trial_of(s, unit) for s in samples]
    assert [t.seed for t in trials] == [0, 0, 0] and [t.lr for t in trials] == [s["search"]["lr"] for s in samples]
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == 3 and all(i.startswith("glow-digits-search") for i in ids)
    assert search.suggest("t3") is None  # finals wait for the search to end
    # the best reached the budget; the lower value of a sample stopped early does not count
    results = [{"val_bpd": 4.0, "status": "ok"}, {"val_bpd": 3.0, "status": "ok"}, {"val_bpd": 2.0, "step": 10}]
    for i, result in enumerate(results):
        search.on_trial_complete(f"t{i}", result)
    finals = sorted((trial_of(search.suggest(f"f{i}"), unit) for i in range(2)), key=lambda f: f.trial_id)
    assert sorted(f.trial_id for f in finals) == ["glow-digits-seed0", "glow-digits-seed1"]
    assert {f.lr for f in finals} == {trials[1].lr}
    assert {f.seed for f in finals} == {0, 1}
    assert [f.model_dump() for f in finals] == [  # the planned trials but for the best sample's values
        c.model_copy(update={"lr": trials[1].lr}).model_dump() for c in sorted(unit.configs, key=lambda c: c.trial_id)
    ]


def test_a_tune_trials_row_is_built_from_the_unit_its_config_names(tmp_path):
    """A failed final trial of a search group: its row is the unit's trial with the group's best
    values (Tune's config names the trial, it does not hold it). A config of the older layout, which
    held the trial, is not read back: its unit runs again."""
    _, unit = _lr_search(tmp_path, 2)
    failed = Result(
        metrics={"config": tune_config(unit, "final", "glow-digits-seed1", {"lr": 0.004}), "node": "n1"},
        checkpoint=None,
        error=RuntimeError("the worker died"),
        path=str(tmp_path),
    )
    older_layout = {"trial": unit.configs[0].model_dump(), "unit": unit.id, "unit_hash": unit.hash, "phase": "final"}
    older = Result(metrics={"config": older_layout}, checkpoint=None, error=RuntimeError("x"), path=str(tmp_path))
    store = RecordStore(tmp_path / "out")
    found = collect([failed, older], {unit.id: unit}, store, tmp_path / "figures", tmp_path / "weights")
    ((trial,),) = found.values()
    row = trial["row"]
    assert (row["trial_id"], row["seed"], row["lr"], row["phase"]) == ("glow-digits-seed1", 1, 0.004, "final")
    assert row["status"] == "failed" and "the worker died" in row["reason"] and row["node"] == "n1"
    assert row["config_hash"] != unit.configs[1].config_hash()  # the searched lr is part of what ran
    assert store.load(unit) is None  # a final trial failed: the unit is not finished


def test_a_search_sample_id_is_stable_and_unique():
    base = TrialConfig(model="glow", dataset="digits", trial_id="glow-digits-seed0")
    values = {"lr": 0.001234, "hidden_channels": 16}
    assert sample_id(base, 3, values) == sample_id(base, 3, dict(reversed(values.items())))
    assert sample_id(base, 3, values) != sample_id(base, 4, values)
    assert sample_id(base, 3, values) != sample_id(base, 3, values | {"lr": 0.001235})
    assert sample_id(base, 3, values).startswith("glow-digits-search3-")


def test_units_hash_what_runs(tmp_path):
    spec, units = _units(spec_file(tmp_path, "h", seeds=(0, 1)))
    assert [u.id for u in units] == [
        "glow-digits-seed0",
        "glow-digits-seed1",
        "nxn_shift-digits-seed0",
        "nxn_shift-digits-seed1",
    ]
    assert all(isinstance(u, Unit) and u.hash == u.configs[0].config_hash() for u in units)
    _, wider = _units(
        spec_file(
            tmp_path,
            "h",
            seeds=(0, 1),
            overrides={"glow": "{depth: 2, levels: 2, hidden_channels: 16}", "nxn_shift": TINY},
        )
    )
    changed = [u.id for u, w in zip(units, wider, strict=True) if u.hash != w.hash]
    assert changed == ["glow-digits-seed0", "glow-digits-seed1"]


def test_a_second_driver_of_the_same_sweep_is_refused_at_once(tmp_path):
    from flowbench.errors import FlowbenchError
    from flowbench.locks import exclusive_lock

    spec = spec_file(tmp_path, "owned")
    with exclusive_lock(tmp_path / "results" / "owned", "flowbench sweep owned"):
        with pytest.raises(FlowbenchError, match=r"in use by flowbench sweep owned \(pid \d+"):
            run_sweep(spec, tmp_path / "results")
    assert not (tmp_path / "results" / "owned" / "sweep.json").exists()  # nothing of the owner's touched


# --------------------------------------------------------------------------- real sweeps
@pytest.fixture(scope="module")
def local_ray():
    import ray

    start_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def child_runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def final_checkpoint(experiment: Path, trial_id: str) -> Path:
    (checkpoint,) = (experiment / trial_id).glob("checkpoint_*")
    return checkpoint


def attempts(checkpoint: Path, with_time: bool = False) -> list:
    lines = [json.loads(line) for line in (checkpoint / "attempts.jsonl").read_text().splitlines()]
    return [(a["how"], a["at"]) if with_time else a["how"] for a in lines]


WIDER = "{depth: 2, levels: 2, hidden_channels: 12}"


@pytest.mark.slow
def test_sweep_end_to_end_rerun_and_card_change(tmp_path, local_ray, monkeypatch):
    """Equal training FLOPs for two models of unequal cost (n×n 1.5x Glow's FLOPs per image), two
    seeds, evaluated at the same four fractions of the budget, drawn by the CLI's live bar; then the
    same command again, then a card change."""
    import tqdm

    from flowbench.cli.progress import SweepProgress, headline, opening_line, planned_trials

    budget = 1.0e8
    spec = spec_file(
        tmp_path, "e2e", seeds=(0, 1), budget=f"{{flops: {budget}}}", overrides={"glow": TINY, "nxn_shift": WIDER}
    )
    frames = []

    class Watched(tqdm.tqdm):  # the bar's own state at every redraw, drawn as on a terminal
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | {"disable": False})

        def refresh(self, *args, **kwargs):
            frames.append((self.n, self.total, self.postfix))
            return super().refresh(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Watched)
    planned = plan_sweep(spec)
    opening = opening_line(planned, planned_trials(planned), set(), 2)
    assert opening.startswith(
        "sweep e2e: 4 trials (2 models × 1 data sets × 2 seeds), budget 1e+08 flops each, 2 slots"
    )
    assert " training FLOPs to run, about " in opening
    progress = SweepProgress(planned, planned_trials(planned), 0)
    outcome = run_sweep(spec, tmp_path / "results", callbacks=(progress.callback,), planned=planned)
    progress.close()
    assert frames[-1] == (4 * budget, 4 * budget, "4/4 trials, best val " + frames[-1][2].split("best val ")[1])
    assert all(a[0] <= b[0] for a, b in zip(frames, frames[1:], strict=False))  # the bar never goes back
    drawn = [f[2] for f in frames if f[2] is not None]  # tqdm's own first frame comes before any postfix
    assert drawn[-1].startswith("4/4 trials") and any(p.startswith("2/4") for p in drawn)
    (lead,) = headline(outcome.trials)
    assert lead.startswith("digits: ") and " ahead of " in lead
    out = tmp_path / "results" / "e2e"
    trials = read_table(out / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == [
        "glow-digits-seed0",
        "glow-digits-seed1",
        "nxn_shift-digits-seed0",
        "nxn_shift-digits-seed1",
    ]
    assert (trials.status == "ok").all() and (trials.phase == "final").all()
    assert trials.val_bpd.between(0, 16).all() and trials.test_bpd.between(0, 16).all()
    assert (trials.num_params > 0).all()
    step_flops = trials.set_index("trial_id").flops_per_image * 32
    assert step_flops["nxn_shift-digits-seed0"] > 1.4 * step_flops["glow-digits-seed0"]
    for row in trials.itertuples():  # the budget met within the trial's last step
        assert budget <= row.train_flops < budget + step_flops[row.trial_id]
    # every trial evaluated at the same training FLOPs, k/4 of the budget, within one of its steps
    curves = read_table(out / "curves.parquet", "curves")
    assert curves.groupby("trial_id").milestone.apply(list).tolist() == [[1, 2, 3, 4]] * 4
    for k, at in curves.groupby("milestone"):
        target = k / 4 * budget
        assert ((at.train_flops >= target) & (at.train_flops < target + at.trial_id.map(step_flops))).all()
        assert at.train_flops.max() - at.train_flops.min() < step_flops.max()
        assert (at.budget_fraction == at.train_flops / budget).all()
    assert curves.groupby("trial_id").step.max().to_dict() == trials.set_index("trial_id").steps.to_dict()

    # the report along the budget: each pair at each milestone, Holm over them (by scipy and statsmodels here)
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    md = (out / "report.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    by = curves.set_index(["milestone", "model", "seed"]).val_bpd
    tests = [stats.ttest_rel(by[k, "glow"].sort_index(), by[k, "nxn_shift"].sort_index()) for k in (1, 2, 3, 4)]
    holm = multipletests([t.pvalue for t in tests], method="holm")[1]
    along = next(r for r in rows if r[:4] == ["digits", "", "glow", "nxn_shift"] and len(r) == 8)
    for k, (cell, p) in enumerate(zip(along[4:], holm, strict=True), 1):
        diff = (by[k, "glow"].sort_index() - by[k, "nxn_shift"].sort_index()).mean()
        assert cell.startswith(f"{diff:+.3f} ({p:.3f})"), (cell, diff, p)
    # each bits/dim claim's comparison says over which budgets it holds
    claims = [line for line in md.splitlines() if line.startswith("- (a1) the same comparison on digits")]
    assert len(claims) == 1 and "along the budget (validation bits/dim): " in claims[0]
    assert "(4 milestones, Holm over the 4 comparisons of digits)" in claims[0]
    # seeds needed: the power two seeds had to detect 0.01 bits/dim, by statsmodels here (NaN where its
    # noncentral t's lower tail fails: then a Monte-Carlo estimate)
    from statsmodels.stats.power import TTestPower

    final = trials.pivot(index="seed", columns="model", values="test_bpd")
    sd = (final["glow"] - final["nxn_shift"]).to_numpy().std(ddof=1)
    expected = TTestPower().power(0.01 / sd, 2, 0.05, alternative="two-sided")
    if np.isnan(expected):
        samples = np.random.default_rng(0).normal(0.01, sd, size=(40_000, 2))
        expected = (stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05).mean()
    seeds = next(r for r in rows if r[:5] == ["digits", "", "glow", "nxn_shift", "2"])
    assert seeds[6] == f"{sd:.3f}" and float(seeds[8]) == pytest.approx(expected, abs=0.015)
    eff = outcome.efficiency
    assert eff["trials_run"] == 4 and eff["slots"] == 2 and 0 < eff["efficiency"] <= 1
    assert json.loads((out / "sweep.json").read_text())["last_run"] == eff
    assert (out / "figures" / "samples-glow-digits-seed0.png").is_file()
    # Tune keeps every trial's last result and a summary of each number it reported in the driver's
    # memory for the whole sweep: it got what its scheduler and searcher use (and the driver's
    # provenance stamp), while the curves and records above came from the trials' checkpoints
    experiment = json.loads((out / "sweep.json").read_text())["experiment"]
    for result in stored_results(str(out / "tune"), experiment):
        reported = set(result.metrics) | set(result.metrics_dataframe.columns)
        assert len(result.metrics_dataframe) == 5  # four evaluations and the record
        # trial_id and hostname: Tune's own, on every result
        expected = {"val_bpd", "train_flops", "status", "node", "trial_id", "hostname"}
        assert reported & {*RECORD_COLUMNS, *CURVE_METRICS} == expected

    client, parents, children = child_runs(outcome.mlflow_uri, "e2e")
    exp = client.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert [p.info.run_name for p in parents] == ["sweep:e2e"] and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["efficiency"] == pytest.approx(eff["efficiency"])
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"e2e.yaml", "sweep.json", "report.md", "trials.parquet"} <= parent_files
    assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)
    child = children[0]
    logged = [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")]
    assert logged == curves[curves.trial_id == child.info.run_name].step.tolist()
    assert "samples.png" in [a.path for a in client.list_artifacts(child.info.run_id)]

    # the table from MLflow alone has exactly the Parquet table's columns and values
    from flowbench.results.from_mlflow import tables_from_mlflow

    mlflow_trials, mlflow_curves = tables_from_mlflow(outcome.mlflow_uri, "e2e")
    assert list(mlflow_trials.columns) == list(trials.columns)
    pd.testing.assert_frame_equal(
        mlflow_trials.sort_values("trial_id").reset_index(drop=True),
        trials.sort_values("trial_id").reset_index(drop=True),
        check_dtype=False,
    )
    assert sorted(mlflow_curves.step.tolist()) == sorted(curves.step.tolist())

    # the latency phase: four trials on two slots, then every ok trial's selected weights timed (2 kinds × 2
    # batch sizes) by one Ray task that held all the node's CPUs, after the last trial had finished
    import ray

    latency = read_table(out / "latency.parquet", "latency")
    assert len(latency) == 4 * 2 * 2 and set(latency.weights) == {"selected"}
    assert sorted(set(latency.trial_id)) == sorted(trials.trial_id) and set(latency.batch_size) == {1, 4}
    assert (latency.threads == int(ray.cluster_resources()["CPU"])).all() and latency.device.nunique() == 1
    assert (latency.times_ms.map(len) == 2).all() and (latency.median_ms > 0).all()
    assert pd.to_datetime(latency.started_at).min() >= pd.to_datetime(trials.finished_at).max()
    assert "## Inference latency" in md and "needs successful trials of emerging" in md  # (d1), (d2) untested

    # the same command again: every unit has its record, nothing runs, nothing is timed again
    records = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    timed = (out / "latency.parquet").stat().st_mtime_ns
    again = run_sweep(spec, tmp_path / "results")
    assert again.efficiency["trials_run"] == 0 and again.efficiency["efficiency"] is None and not again.changed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == records
    assert (out / "latency.parquet").stat().st_mtime_ns == timed
    assert len(child_runs(outcome.mlflow_uri, "e2e")[2]) == 4

    # a latency table lacking rows (a phase stopped before it wrote, a trial added): only those are timed
    from flowbench.results.tables import write_table

    write_table(latency[latency.model == "glow"], out / "latency.parquet", "latency")
    again = run_sweep(spec, tmp_path / "results")
    assert again.efficiency["trials_run"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == records
    resumed = read_table(out / "latency.parquet", "latency").set_index(["trial_id", "kind", "batch_size"]).sort_index()
    before = latency.set_index(["trial_id", "kind", "batch_size"]).sort_index()
    assert sorted(resumed.index) == sorted(before.index)
    glow = [i for i in before.index if i[0].startswith("glow")]
    assert resumed.loc[glow, "started_at"].equals(before.loc[glow, "started_at"])  # kept, not timed again
    assert (resumed.drop(index=glow).started_at > before.started_at.max()).all()

    # flowbench latency: the same weights timed again at one thread, another device's rows beside the sweep's
    from flowbench.cli import main

    assert main(["latency", str(out), "--threads", "1", "--rounds", "2", "--warmup", "0", "--batch-sizes", "1"]) == 0
    both = read_table(out / "latency.parquet", "latency")
    assert both.device.nunique() == 2 and len(both) == 16 + 4 * 2
    assert both[both.threads == 1].batch_size.eq(1).all()
    from flowbench.results.latency import latency_pairs

    pairs = latency_pairs(both)  # glow against nxn_shift per device, kind and batch size: never across devices
    assert len(pairs) == 2 * 2 + 2 * 1 and set(pairs.device) == set(both.device)
    assert all(device in (out / "report.md").read_text() for device in both.device.unique())

    # glow's configuration changes: exactly its two trials run again, the old records archived
    wider = spec_file(
        tmp_path, "e2e", seeds=(0, 1), budget=f"{{flops: {budget}}}", overrides={"glow": WIDER, "nxn_shift": WIDER}
    )
    changed = run_sweep(wider, tmp_path / "results")
    assert changed.changed == ["glow-digits-seed0", "glow-digits-seed1"] and changed.efficiency["trials_run"] == 2
    archived = sorted(p.name for p in changed.archive.glob("records/*.json"))
    assert archived == ["glow-digits-seed0.json", "glow-digits-seed1.json"]
    new = read_table(out / "trials.parquet", "trials").set_index("trial_id")
    old = trials.set_index("trial_id")
    assert all(
        json.loads(h)["hidden_channels"] == 12 for h in new.loc[["glow-digits-seed0", "glow-digits-seed1"], "hparams"]
    )
    kept = ["nxn_shift-digits-seed0", "nxn_shift-digits-seed1"]
    assert (new.loc[kept, "finished_at"] == old.loc[kept, "finished_at"]).all()
    client, _, children = child_runs(outcome.mlflow_uri, "e2e")  # the old glow runs: deleted (restorable)
    assert sorted(c.info.run_name for c in children) == sorted(new.index)
    assert {
        json.loads(c.data.params["hparams"])["hidden_channels"] for c in children if c.data.params["model"] == "glow"
    } == {12}


@pytest.mark.slow
def test_diverging_trial_is_recorded_while_the_sweep_goes_on(tmp_path, local_ray):
    spec = spec_file(
        tmp_path,
        "div",
        extra="max_failures: 0\n",
        overrides={"glow": "{depth: 2, levels: 2, hidden_channels: 8, lr: 1.0e4, grad_clip: null}", "nxn_shift": TINY},
    )
    outcome = run_sweep(spec, tmp_path / "results")
    status = dict(zip(outcome.trials.model, outcome.trials.status, strict=True))
    assert status == {"glow": "diverged", "nxn_shift": "ok"}
    reason = outcome.trials.set_index("model").reason["glow"]
    assert "loss became nan or inf at step" in reason


@pytest.mark.slow
def test_search_groups_run_side_by_side_then_the_best_on_every_seed(tmp_path, local_ray, caplog):
    spec = spec_file(
        tmp_path,
        "search",
        models=("glow", "nxn_shift"),
        seeds=(0, 1),
        steps=30,
        extra="""\
        search:
          num_samples: 3
          space: {lr: {loguniform: [1.0e-4, 3.0e-2]}}
          asha: {grace_period: 10, reduction_factor: 2}
        """,
    )
    with caplog.at_level(logging.INFO, logger="flowbench.sweep.search"):
        outcome = run_sweep(spec, tmp_path / "results")
    t = outcome.trials
    assert t.trial_id.is_unique
    search, final = t[t.phase == "search"], t[t.phase == "final"]
    assert len(search) == 6 and search.groupby("model").lr.nunique().to_dict() == {"glow": 3, "nxn_shift": 3}
    assert set(search.status) <= {"ok", "stopped"}
    assert (search[search.status == "stopped"].steps < 30).all()
    # "stopped" is ASHA's decision, as the scheduler took it: exactly the samples it stopped
    asha = {m.group(1) for r in caplog.records if (m := re.match(r"ASHA stops (\S+) at step", r.getMessage()))}
    assert set(search[search.status == "stopped"].trial_id) == asha
    assert sorted(final.trial_id) == [
        "glow-digits-seed0",
        "glow-digits-seed1",
        "nxn_shift-digits-seed0",
        "nxn_shift-digits-seed1",
    ]
    assert (final.status == "ok").all()
    for model, group in search.groupby("model"):
        reached = group[group.status == "ok"]
        best_lr = reached.loc[reached.val_bpd.idxmin(), "lr"]  # selected on validation, not on test
        assert final[final.model == model].lr.tolist() == pytest.approx([best_lr, best_lr])
    # the two groups shared the slots: some glow trial trained while some nxn_shift trial did
    # (spans from Tune's own results: each trial's start in its worker to its last report)
    experiment = json.loads((outcome.results_dir / "sweep.json").read_text())["experiment"]
    spans: dict[str, list[tuple[float, float]]] = {}
    for result in stored_results(str(outcome.results_dir / "tune"), experiment):
        unit, last = result.config["unit"], result.metrics
        spans.setdefault(unit, []).append(tuple(last["busy"]))
        # what Tune keeps of every trial all sweep long: a config that names the trial, and of the
        # numbers it keeps statistics of, the searcher's and ASHA's only (besides its own)
        assert set(result.config) <= {"trial_id", "unit", "unit_hash", "phase", "cost", "search"}
        ours = {k for k, v in last.items() if isinstance(v, numbers.Number) and k not in AUTO_RESULT_KEYS}
        assert ours <= {"val_bpd", "step", INTERRUPTED, "done", "should_checkpoint"}, ours  # the last two: Tune's
    assert sorted(spans) == ["search-glow-digits", "search-nxn_shift-digits"]
    assert any(
        a0 < b1 and b0 < a1 for a0, a1 in spans["search-glow-digits"] for b0, b1 in spans["search-nxn_shift-digits"]
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
