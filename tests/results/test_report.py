"""Parquet → report round trip, and refusal of foreign, corrupted or old tables."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flowbench import FlowbenchError
from flowbench.cli import main
from flowbench.record import RECORD_COLUMNS
from flowbench.results.report import NXN_GLOW, SPLITS, build_report, report_from_dir
from flowbench.results.tables import SCHEMA_VERSION, read_table, write_table
from flowbench.trial.latency import KINDS
from tests.results.test_latency import timed
from tests.results.test_table2 import synthetic


def curves_for(trials):
    rows = []
    for t in trials.itertuples():
        rows += [
            dict(
                sweep="s",
                trial_id=t.trial_id,
                model=t.model,
                variant=t.variant,
                dataset=t.dataset,
                seed=t.seed,
                config_hash="h",
                step=step,
                train_flops=step * 5e7,
                val_bpd=t.val_bpd + 1 / step,
                train_bpd=t.test_bpd,
                milestone=step // 10,
                budget_fraction=step / 20,
            )
            for step in (10, 20)
        ]
    return pd.DataFrame(rows)


def test_parquet_to_report_round_trip(tmp_path, capsys):
    trials = synthetic()
    write_table(trials, tmp_path / "trials.parquet", "trials")
    write_table(curves_for(trials), tmp_path / "curves.parquet", "curves")
    latency = [
        timed("cpu: A", m, [[2.0, 2.2, 2.1]] * 3, k, dataset="cifar10") for m in ("glow", "nxn_shift") for k in KINDS
    ]
    write_table(pd.DataFrame([row for rows in latency for row in rows]), tmp_path / "latency.parquet", "latency")
    assert main(["report", str(tmp_path)]) == 0
    table2 = read_table(tmp_path / "table2.parquet", "table2")
    glow = table2.set_index(["model", "variant", "dataset"]).loc[("glow", "", "cifar10")]
    assert glow.test_bpd_mean == pytest.approx(3.1) and glow.paper_bpd == 3.35  # paper figure from the model card
    md = (tmp_path / "report.md").read_text()
    glow_row = next(line for line in md.splitlines() if line.startswith("| glow "))
    assert "3.10 ± 0.25" in glow_row and "3.35" in glow_row and "4.10 ± 1.27" in glow_row
    nxn_row = next(line for line in md.splitlines() if line.startswith("| nxn_shift "))
    assert "3.50 ± 0.25" in nxn_row and "| 3.50" in nxn_row
    assert SPLITS in md and NXN_GLOW in md and "equal budget of 1e+09 flops per trial" in md
    cost = next(
        line for line in md.splitlines() if line.startswith("| glow ") and "| embedded" in line and "2e+06" in line
    )
    assert "| 50 " in cost and "| 60 " in cost  # effective and allocated parameters
    assert "p_holm" in md and "## The paper's claims" in md and "not tested by this sweep" in md
    timing = next(line for line in md.splitlines() if line.startswith("| cpu: A ") and "| glow " in line)
    assert "| density " in timing and "| 2.1 " in timing and "| 3 " in timing  # median ms, over 3 checkpoints
    html = (tmp_path / "report.html").read_text()
    assert "<table" in html and 'src="data:image/png;base64,' in html and "The paper&#x27;s claims" in html
    assert 'src="http' not in html and "src='" not in html  # self-contained
    for plot in ("curves-cifar10.png", "curves-embedded.png", "bpd-vs-params.png", "latency.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 1000


def test_report_points_to_a_sibling_ablation_report(tmp_path):
    trials = synthetic()
    main_dir, ablations = tmp_path / "table2-cpu", tmp_path / "ablations"
    build_report(main_dir, trials, curves_for(trials))
    assert "ablations" not in (main_dir / "report.md").read_text()
    build_report(ablations, trials, curves_for(trials))
    assert "../ablations/report.md" not in (ablations / "report.md").read_text()  # not to itself
    build_report(main_dir, trials, curves_for(trials))
    assert "../ablations/report.md" in (main_dir / "report.md").read_text()
    assert '<a href="../ablations/report.html">' in (main_dir / "report.html").read_text()


def test_report_regenerates_identically(tmp_path):
    trials = synthetic()
    write_table(trials, tmp_path / "trials.parquet", "trials")
    write_table(curves_for(trials), tmp_path / "curves.parquet", "curves")
    report_from_dir(tmp_path)
    first = read_table(tmp_path / "table2.parquet", "table2")
    md = (tmp_path / "report.md").read_text()
    report_from_dir(tmp_path)
    pd.testing.assert_frame_equal(read_table(tmp_path / "table2.parquet", "table2"), first)
    assert (tmp_path / "report.md").read_text() == md


def test_foreign_parquet_is_refused(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "trials.parquet")
    with pytest.raises(FlowbenchError, match="not a flowbench trials table"):
        read_table(tmp_path / "trials.parquet", "trials")


def test_other_kind_and_other_version_are_refused(tmp_path):
    write_table(synthetic(), tmp_path / "t.parquet", "trials")
    with pytest.raises(FlowbenchError, match=r"not a flowbench curves table \(trials\)"):
        read_table(tmp_path / "t.parquet", "curves")
    table = pq.read_table(tmp_path / "t.parquet")
    for version in (1, SCHEMA_VERSION + 1):  # 1: the tables before validation-selected results
        meta = {b"flowbench": json.dumps({"kind": "trials", "schema_version": version}).encode()}
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / "v.parquet")
        with pytest.raises(
            FlowbenchError,
            match=f"schema version {version}, this flowbench reads version {SCHEMA_VERSION} .*re-run the sweep",
        ):
            read_table(tmp_path / "v.parquet", "trials")


def test_the_committed_reference_run_is_read_or_refused_in_one_line(tmp_path, capsys):
    """results/table2-cpu as committed: a schema-1 table (before validation-selected results) is refused
    with one line saying what to do; once re-run, it reads with exactly the record's columns."""
    committed = Path(__file__).parents[2] / "results" / "table2-cpu"
    shutil.copy2(committed / "trials.parquet", tmp_path / "trials.parquet")
    version = json.loads(pq.read_metadata(tmp_path / "trials.parquet").metadata[b"flowbench"])["schema_version"]
    if version == SCHEMA_VERSION:
        assert list(read_table(tmp_path / "trials.parquet", "trials").columns) == RECORD_COLUMNS
        return
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"schema version {version}, this flowbench reads" in err and len(err.strip().splitlines()) == 1


def test_a_trials_table_holds_exactly_the_records_columns(tmp_path):
    trials = synthetic()
    with pytest.raises(ValueError, match=r"\['extra'\] are not declared in flowbench.record.TrialRecord"):
        write_table(trials.assign(extra=1), tmp_path / "t.parquet", "trials")
    write_table(trials[list(reversed(trials.columns))], tmp_path / "t.parquet", "trials")
    assert list(read_table(tmp_path / "t.parquet", "trials").columns) == RECORD_COLUMNS  # declared order


def test_corrupted_parquet_is_refused_and_nothing_is_half_written(tmp_path, capsys):
    write_table(synthetic(), tmp_path / "trials.parquet", "trials")
    data = (tmp_path / "trials.parquet").read_bytes()
    (tmp_path / "trials.parquet").write_bytes(data[: len(data) // 2])
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "trials.parquet: corrupted or not a Parquet file" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("report.*")) and not (tmp_path / "table2.parquet").exists()


def test_a_table_lacking_required_columns_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="needs columns"):
        write_table(pd.DataFrame({"model": ["glow"]}), tmp_path / "t.parquet", "trials")
    assert not list(tmp_path.iterdir())


def test_missing_results_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no trials table there; run the sweep first" in capsys.readouterr().err


def test_build_report_without_sample_figures_still_writes(tmp_path):
    trials = synthetic()
    paths = build_report(tmp_path, trials, curves_for(trials))
    assert paths["md"].exists() and "Samples" not in paths["md"].read_text()


def test_curves_without_milestones_report_that_they_have_none(tmp_path):
    """Runs of a flowbench before milestones read back from MLflow: no milestone, no evaluation count."""
    from flowbench.results.report import NO_MILESTONES

    trials = synthetic().assign(evaluations=0, eval_images=0)
    paths = build_report(tmp_path, trials, curves_for(trials).assign(milestone=float("nan")))
    md = paths["md"].read_text()
    assert f"Validation bits/dim at each milestone ({NO_MILESTONES})" in md
    assert "## Paired comparisons along the budget" in md and "## The paper's claims" in md


def test_the_report_names_trials_short_of_their_budget_and_an_interrupted_sweeps_unfinished(tmp_path):
    from tests.results.test_table2 import short_budget_trials

    trials = short_budget_trials()
    paths = build_report(tmp_path, trials, curves_for(trials), unfinished=["glow--cifar10-seed5"])
    for text in (paths["md"].read_text(), paths["html"].read_text()):
        intro, table2 = text.split("Table 2 (test bits/dim")[:2]
        assert "Incomplete" in intro and "1 planned trial(s) unfinished (glow--cifar10-seed5)" in intro
        assert (
            "1 trial(s) did not spend the whole budget and are left out of this table, the paired comparisons "
            "and the claims: nxn_shift--cifar10-seed2 (ok: 6e+08 of 1e+09 flops)" in table2.split("Validation")[0]
        )
    again = build_report(tmp_path, trials.iloc[:5], curves_for(trials.iloc[:5]))["md"].read_text()
    assert "Incomplete" not in again and "whole budget" not in again
